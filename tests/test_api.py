"""transform: the whole graph rewrite without XLA, on real and meta tensors."""

import operator

import pytest
import torch

import fx_shard
from fx_shard import models
from fx_shard.errors import CaptureError
from fx_shard.layers import SplitLinear
from fx_shard.models.plans import PLANS
from fx_shard.sharding import SHARDING_KEY, ModelSharding


@pytest.mark.parametrize("name", models.MODELS)
def test_transform_keeps_function_and_state_dict(name):
    model = models.build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = models.example_inputs(name)
    gm = fx_shard.transform(model, PLANS[name], mesh_shape={"tp": 4}, example_inputs=inputs)
    torch.testing.assert_close(gm(*inputs), model(*inputs))
    # Nothing left that costs collectives under SPMD: no concatenated q/k/v or gate/up, no sdpa, no matmul.
    assert not [c for c in gm.graph.find_nodes(op="call_function", target=torch.cat) if _joins_parts(c)]
    targets = {n.target for n in gm.graph.nodes}
    assert not targets & {torch.nn.functional.scaled_dot_product_attention, operator.matmul, torch.matmul, "matmul"}
    after = gm.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    # The caller's model is untouched: same modules, same values.
    assert not any(isinstance(m, SplitLinear) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    passes = ("AnnotateSharding", "SplitFusedLinear", "RewireFusedConsumers", "FitHeadsToMesh", "AttentionToEinsum",
              "InsertShardingConstraints")
    assert gm.meta[SHARDING_KEY] == ModelSharding({"tp": 4}, "tp", passes)


def _joins_parts(cat) -> bool:
    inputs = [a.args[0] if a.target is operator.getitem else a for a in cat.args[0]]
    return any(SHARDING_KEY in a.meta and a.meta[SHARDING_KEY].part_of for a in inputs)


@pytest.mark.parametrize("name", models.MODELS)
def test_transform_on_meta_materializes_nothing(name):
    model = models.build(name, device="meta")
    gm = fx_shard.transform(model, PLANS[name], mesh_shape={"tp": 8})
    tensors = list(gm.parameters()) + list(gm.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    sharded = [n for n in gm.graph.find_nodes(op="call_module") if SHARDING_KEY in n.meta and n.meta[SHARDING_KEY].specs]
    assert sharded


def test_every_built_in_linear_is_planned():
    for name in models.MODELS:
        gm = fx_shard.transform(models.build(name, device="meta"), PLANS[name], mesh_shape={"tp": 8})
        records = [n.meta[SHARDING_KEY] for n in gm.graph.find_nodes(op="call_module") if SHARDING_KEY in n.meta]
        uncovered = [r for r in records if r.source == "no rule covers it"]
        assert not uncovered, name


def test_vllm_llama_is_split_by_class_rules():
    gm = fx_shard.transform(models.build("llama-vllm", device="meta"), mesh_shape={"x": 4, "y": 1})
    targets = [n.target for n in gm.graph.find_nodes(op="call_module")]
    assert "model.layers.0.self_attn.qkv_proj.q" in targets
    assert "model.layers.0.mlp.gate_up_proj.1" in targets
    record = next(n.meta[SHARDING_KEY] for n in gm.graph.find_nodes(op="call_module") if n.target.endswith("o_proj"))
    assert record.specs == {"weight": (None, "x")} and record.source == "class rule RowParallelLinear"


def test_untraceable_model_names_itself():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(CaptureError, match=r"torch.fx could not trace Branchy: TraceError"):
        fx_shard.transform(Branchy(), mesh_shape={"tp": 2})
