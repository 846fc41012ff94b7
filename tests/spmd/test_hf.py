"""Hugging Face models (transformers 5.x, random weights): plan="auto", captured part by part."""

import pytest
import torch
from conftest import relative_error

import fx_shard
from fx_shard.collectives import collectives
from fx_shard.sharding import SHARDING_KEY, layer_parameters
from tests.hf_models import build_hf, hf_inputs

ZERO = {"all-gather": 0, "reduce-scatter": 0, "all-to-all": 0, "collective-permute": 0}


def on_device(kwargs: dict) -> dict:
    return {k: v.to(fx_shard.xla_device()) if torch.is_tensor(v) else v for k, v in kwargs.items()}


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_decoders_with_their_own_plans(name, mesh, devices):
    model, kwargs = build_hf(name), hf_inputs()
    root = fx_shard.shard(model, mesh, "auto", example_kwargs=kwargs)
    summary = root.meta[SHARDING_KEY]
    assert type(root) is type(model) and "model.layers.0.self_attn" in summary.opaque
    assert isinstance(root.get_submodule("model.layers.0.mlp"), torch.fx.GraphModule)
    # 2 all-reduces per decoder layer (attention through transformers' registry as einsum), 1 for the embedding.
    assert dict(collectives(root, **kwargs)) == {"all-reduce": 5, **ZERO}
    with torch.no_grad():
        assert relative_error(root(**on_device(kwargs)).logits, model(**kwargs).logits) <= 1e-4
    matrices = [(path, record) for path, record, pname, p in layer_parameters(root) if pname == "weight" and ".layers." in path]
    assert len(matrices) == 14
    # Every decoder matrix is sharded; k/v (2 KV heads, which do not split 4 or 8 ways) over "tp:2",
    # each KV head on the block of devices holding its q heads, with the reason.
    kv = {record.specs["weight"] for path, record in matrices if path.endswith(("k_proj", "v_proj"))}
    assert all(record.specs for _, record in matrices)
    assert kv == {("tp" if devices == 2 else "tp:2", None)}


def test_decoder_on_a_kv_mesh_shards_every_matrix(devices):
    model, kwargs = build_hf("llama"), hf_inputs()
    root = fx_shard.shard(model, fx_shard.make_mesh(kv=2), "auto", example_kwargs=kwargs)
    assert all(r.specs for path, r, pname, _ in layer_parameters(root) if pname == "weight" and ".layers." in path)
    assert dict(collectives(root, **kwargs)) == {"all-reduce": 5, **ZERO}
    with torch.no_grad():
        assert relative_error(root(**on_device(kwargs)).logits, model(**kwargs).logits) <= 1e-4


def test_gpt2_without_a_plan_is_inferred_from_an_exported_graph(mesh, devices):
    # GPT-2 ships no tensor-parallel plan and its attention does not trace: the plan for it comes from torch.export.
    model, kwargs = build_hf("gpt2"), hf_inputs()
    root = fx_shard.shard(model, mesh, "auto", example_kwargs=kwargs)
    records = {path: record for path, record, pname, _ in layer_parameters(root) if pname == "weight"}
    assert records["transformer.h.0.attn.c_attn"].style == "qkv"
    assert records["transformer.h.0.attn.c_attn"].specs == {"weight": (None, "tp"), "bias": ("tp",)}  # Conv1D: (in, out)
    assert records["transformer.h.0.attn.c_proj"].specs == {"weight": ("tp", None)}
    assert records["transformer.wte"].style == "vocab" and records["lm_head"].style == "lm_head"
    assert all(r.specs for path, r in records.items() if ".h." in path)
    counts = collectives(root, **kwargs)
    # The fused c_attn stays fused inside the opaque attention: its split costs collective-permutes, no all-gather.
    assert counts["all-reduce"] == 5 and counts["all-gather"] == 0
    with torch.no_grad():
        assert relative_error(root(**on_device(kwargs)).logits, model(**kwargs).logits) <= 1e-4
