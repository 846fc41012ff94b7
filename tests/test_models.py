"""The built-in models: whole-model fx tracing, determinism, meta builds, vLLM/HF equivalence."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from fx_shard import layers, models
from fx_shard.models import GPT2, Llama, LlamaConfig, VllmLlama

_LEAF_TYPES = (
    nn.Linear,
    nn.Embedding,
    layers.LinearBase,
    layers.VocabParallelEmbedding,  # ParallelLMHead is a subclass
)


class LeafTracer(fx.Tracer):
    """Keeps linear-like layers (and the default torch.nn leaves) as ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAF_TYPES) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.GraphModule:
    graph = LeafTracer().trace(model)
    return fx.GraphModule(model, graph, model.__class__.__name__)


def _linear_targets(gm: fx.GraphModule) -> list[str]:
    return [
        n.target
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _LEAF_TYPES)
    ]


# The linear-like call_module targets of block 0, in graph order, and the ones outside blocks.
_BLOCK0 = {
    "llama": (
        "model.layers.0.",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
        ["model.embed_tokens", "lm_head"],
    ),
    "llama-vllm": (
        "model.layers.0.",
        ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
        ["model.embed_tokens", "lm_head"],
    ),
    "gpt2": (
        "transformer.h.0.",
        ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
        ["transformer.wte", "transformer.wpe", "lm_head"],
    ),
    "vit": (
        "blocks.0.",
        ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
        ["head"],
    ),
}

_OUTPUT_SHAPES = {
    "llama": (2, 16, 256),
    "llama-vllm": (2, 16, 256),
    "gpt2": (2, 16, 256),
    "vit": (2, 10),
}


def test_models_listed() -> None:
    assert models.MODELS == ("llama", "llama-vllm", "gpt2", "vit")


@pytest.mark.parametrize("name", models.MODELS)
def test_output_shape_and_eval_float32(name: str) -> None:
    model = models.build(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        out = model(*models.example_inputs(name))
    assert out.shape == _OUTPUT_SHAPES[name]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", models.MODELS)
def test_traces_whole_and_matches_eager(name: str) -> None:
    model = models.build(name)
    gm = _trace(model)
    gm.graph.lint()
    inputs = models.example_inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs))
    # a different sequence length and batch through the same graph
    if name != "vit":
        other = models.example_inputs(name, batch=3, seq_len=7, seed=1)
        with torch.no_grad():
            torch.testing.assert_close(gm(*other), model(*other))


@pytest.mark.parametrize("name", models.MODELS)
def test_plain_symbolic_trace(name: str) -> None:
    """The default tracer also succeeds (it traces through fx_shard.layers)."""
    model = models.build(name)
    gm = fx.symbolic_trace(model)
    inputs = models.example_inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs))


@pytest.mark.parametrize("name", models.MODELS)
def test_traced_linear_targets(name: str) -> None:
    prefix, block, outside = _BLOCK0[name]
    model = models.build(name)
    targets = _linear_targets(_trace(model))
    assert [t[len(prefix):] for t in targets if t.startswith(prefix)] == block
    assert [t for t in targets if ".0." not in t and ".1." not in t] == outside
    assert len(targets) == 2 * len(block) + len(outside)  # 2 layers / blocks by default


def test_vllm_llama_linear_classes() -> None:
    gm = _trace(models.build("llama-vllm"))
    kinds = {t: type(gm.get_submodule(t)).__name__ for t in _linear_targets(gm)}
    assert kinds["model.embed_tokens"] == "VocabParallelEmbedding"
    assert kinds["model.layers.1.self_attn.qkv_proj"] == "QKVParallelLinear"
    assert kinds["model.layers.1.self_attn.o_proj"] == "RowParallelLinear"
    assert kinds["model.layers.1.mlp.gate_up_proj"] == "MergedColumnParallelLinear"
    assert kinds["model.layers.1.mlp.down_proj"] == "RowParallelLinear"
    assert kinds["lm_head"] == "ParallelLMHead"


@pytest.mark.parametrize("name", models.MODELS)
def test_deterministic_build(name: str) -> None:
    state = torch.random.get_rng_state()
    a = models.build(name, seed=3).state_dict()
    b = models.build(name, seed=3).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = models.build(name, seed=4).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", models.MODELS)
def test_example_inputs_deterministic(name: str) -> None:
    (a,), (b,) = models.example_inputs(name, seed=5), models.example_inputs(name, seed=5)
    assert torch.equal(a, b)
    assert a.shape[0] == 2


@pytest.mark.parametrize("name", models.MODELS)
def test_meta_build(name: str) -> None:
    model = models.build(name, device="meta")
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)
    gm = _trace(model)
    (x,) = models.example_inputs(name)
    assert gm(x.to("meta")).shape == _OUTPUT_SHAPES[name]


@pytest.mark.parametrize("name", models.MODELS)
def test_meta_build_materializes(name: str) -> None:
    """meta build -> to_empty -> tie_weights / reset_buffers -> load weights == a real build."""
    real = models.build(name, seed=2)
    model = models.build(name, seed=7, device="meta").to_empty(device="cpu")
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # to_empty unties shared Parameters
    models.reset_buffers(model)
    model.load_state_dict(real.state_dict())
    inputs = models.example_inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), real(*inputs))


def test_non_persistent_buffers() -> None:
    llama, gpt2 = models.build("llama"), models.build("gpt2")
    assert "model.rotary_emb.cos_cached" not in llama.state_dict()
    assert "model.rotary_emb.cos_cached" in dict(llama.named_buffers())
    assert "transformer.position_ids" not in gpt2.state_dict()
    vllm = models.build("llama-vllm")
    assert not any("cos_sin_cache" in k for k in vllm.state_dict())
    assert vllm.model.layers[0].self_attn.rotary_emb.cos_sin_cache.shape == (64, 8)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": True}, {"vocab_size": 200}, {"num_key_value_heads": 8}],
    ids=["default", "tied", "padded-vocab", "mha"],
)
def test_vllm_load_from_hf_style(overrides: dict) -> None:
    config = LlamaConfig(**overrides)
    torch.manual_seed(0)
    plain = Llama(config).eval()
    torch.manual_seed(1)
    vllm = VllmLlama(config).eval()
    assert vllm.load_from_hf_style(plain) is vllm
    (ids,) = models.example_inputs("llama", **overrides)
    with torch.no_grad():
        expected = plain(ids)
        torch.testing.assert_close(vllm(ids), expected)
        torch.testing.assert_close(_trace(vllm)(ids), expected)
    vocab = config.vocab_size
    padded = vllm.model.embed_tokens.weight
    assert padded.shape[0] % 64 == 0 and padded.shape[0] >= vocab
    assert not padded[vocab:].any()
    if config.tie_word_embeddings:
        assert vllm.lm_head.weight is vllm.model.embed_tokens.weight


def test_vllm_load_rejects_other_config() -> None:
    plain = Llama(LlamaConfig(num_hidden_layers=1))
    with pytest.raises(ValueError, match="configs differ"):
        VllmLlama(LlamaConfig()).load_from_hf_style(plain)


def test_llama_vllm_build_matches_llama() -> None:
    (ids,) = models.example_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(models.build("llama-vllm", seed=9)(ids), models.build("llama", seed=9)(ids))


def test_gpt2_tied_head() -> None:
    model = models.build("gpt2")
    assert isinstance(model, GPT2)
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = models.build("gpt2", tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_default_sizes_divide_meshes() -> None:
    for name in models.MODELS:
        config = models.make_config(name)
        assert config.hidden_size == 64
        assert config.num_attention_heads == 8
        assert config.num_hidden_layers == 2
    llama = models.make_config("llama")
    assert (llama.num_key_value_heads, llama.head_dim, llama.intermediate_size) == (2, 8, 128)
    assert models.make_config("gpt2").intermediate_size == 256
    assert models.make_config("vit").intermediate_size == 256


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'bert'"):
        models.build("bert")
    with pytest.raises(ValueError, match="has no field hiden_size"):
        models.build("llama", hiden_size=32)
    with pytest.raises(ValueError, match="not a multiple"):
        models.build("llama", num_key_value_heads=3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        models.example_inputs("gpt2", seq_len=65)
