"""plan="auto": styles from the data flow, equal to the hand-written plans, never from names."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_shard
from fx_shard import models
from fx_shard.models.plans import PLANS
from fx_shard.sharding import SHARDING_KEY


def styles(gm) -> dict[str, str]:
    return {n.target: n.meta[SHARDING_KEY].style for n in gm.graph.find_nodes(op="call_module") if SHARDING_KEY in n.meta}


def timm_vit():
    import timm

    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=8, num_classes=10)
    return model.eval(), (torch.randn(2, 3, 16, 16),)


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("tp", [2, 8])
def test_auto_equals_the_hand_written_plan(name, tp):
    model, inputs = models.build(name), models.example_inputs(name)
    auto = fx_shard.transform(model, "auto", mesh_shape={"tp": tp}, example_inputs=inputs)
    explicit = fx_shard.transform(model, PLANS[name], mesh_shape={"tp": tp}, example_inputs=inputs)
    assert styles(auto) == styles(explicit)
    torch.testing.assert_close(auto(*inputs), model(*inputs))


def test_auto_reasons_name_the_partner():
    model, inputs = models.build("llama"), models.example_inputs("llama")
    gm = fx_shard.transform(model, "auto", mesh_shape={"tp": 2}, example_inputs=inputs)
    sources = {n.target: n.meta[SHARDING_KEY].source for n in gm.graph.find_nodes(op="call_module") if SHARDING_KEY in n.meta}
    attn = "model.layers.1.self_attn."
    assert sources[attn + "k_proj"] == f"inferred: column-parallel into {attn}o_proj"
    assert sources[attn + "o_proj"] == f"inferred: row-parallel after {attn}q_proj, {attn}k_proj, {attn}v_proj"
    assert sources["model.embed_tokens"] == "inferred: embedding of a model input (vocabulary rows)"
    assert sources["lm_head"] == "inferred: projects to the model's output, widening"


def test_auto_on_timm_vision_transformer():
    model, inputs = timm_vit()
    gm = fx_shard.transform(model, "auto", mesh_shape={"tp": 4}, example_inputs=inputs)
    found = styles(gm)
    assert {k: v for k, v in found.items() if k.startswith("blocks.1.")} == {
        "blocks.1.attn.qkv.q": "colwise", "blocks.1.attn.qkv.k": "colwise", "blocks.1.attn.qkv.v": "colwise",
        "blocks.1.attn.proj": "rowwise", "blocks.1.mlp.fc1": "colwise", "blocks.1.mlp.fc2": "rowwise",
    }
    assert found["head"] == "replicate"
    torch.testing.assert_close(gm(*inputs), model(*inputs))


class OddNames(nn.Module):
    """A pre-norm block whose layers are named nothing like q/k/v/o or up/down."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm_a, self.norm_b = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.alpha = nn.Linear(dim, 3 * dim)
        self.beta = nn.Linear(dim, dim)
        self.gamma = nn.Linear(dim, 4 * dim)
        self.delta = nn.Linear(dim, 4 * dim)
        self.epsilon = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        a, b, c = self.alpha(self.norm_a(x)).chunk(3, dim=-1)
        a, b, c = (t.view(B, N, self.heads, -1).transpose(1, 2) for t in (a, b, c))
        x = x + self.beta(F.scaled_dot_product_attention(a, b, c).transpose(1, 2).reshape(B, N, C))
        h = self.norm_b(x)
        return x + self.epsilon(F.gelu(self.gamma(h)) * self.delta(h))


def test_names_never_decide():
    torch.manual_seed(0)
    model, x = OddNames().eval(), torch.randn(2, 5, 32)
    gm = fx_shard.transform(model, "auto", mesh_shape={"tp": 4}, example_inputs=(x,))
    assert styles(gm) == {
        "alpha.q": "colwise", "alpha.k": "colwise", "alpha.v": "colwise", "beta": "rowwise",
        "gamma": "colwise", "delta": "colwise", "epsilon": "rowwise",
    }
    torch.testing.assert_close(gm(x), model(x))


def test_auto_replicates_what_does_not_divide_and_says_why():
    torch.manual_seed(0)
    model, x = OddNames(dim=36, heads=4).eval(), torch.randn(2, 5, 36)
    gm = fx_shard.transform(model, "auto", mesh_shape={"tp": 8}, example_inputs=(x,))
    records = {n.target: n.meta[SHARDING_KEY] for n in gm.graph.find_nodes(op="call_module") if SHARDING_KEY in n.meta}
    assert records["alpha"].style == "replicate"
    assert records["alpha"].source == "inferred: replicated, 108 output features do not split 8 ways"
    torch.testing.assert_close(gm(x), model(x))


def test_explicit_entries_and_class_rules_win_over_inference():
    model, inputs = models.build("llama"), models.example_inputs("llama")
    plan = fx_shard.ShardPlan({"lm_head": "replicate"}, auto=True)
    found = styles(fx_shard.transform(model, plan, mesh_shape={"tp": 2}, example_inputs=inputs))
    assert found["lm_head"] == "replicate" and found["model.layers.0.mlp.up_proj"] == "colwise"


class ShapeBranchy(nn.Module):
    """Branches on a shape: torch.fx cannot trace it, torch.export can (shapes are static there)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = self.down(torch.relu(self.up(x)))
        return h if x.shape[0] > 1 else -h


def test_opaque_layers_are_inferred_from_an_exported_graph():
    torch.manual_seed(0)
    model, x = ShapeBranchy().eval(), torch.randn(4, 8)
    with pytest.raises(fx_shard.PlanError, match=r"plan='auto' needs example inputs for the layers torch.fx could not trace \(in \): up, down; pass example_inputs= or example_kwargs="):
        fx_shard.transform(model, "auto", mesh_shape={"tp": 2})
    root = fx_shard.transform(model, "auto", mesh_shape={"tp": 2}, example_inputs=(x,))
    layers = root.meta[SHARDING_KEY].layers
    assert (layers["up"].style, layers["down"].style) == ("colwise", "rowwise")
    assert layers["down"].source == "inferred: row-parallel after up"
    torch.testing.assert_close(root(x), model(x))


def test_layers_export_cannot_capture_either_stay_replicated_with_the_reason_and_a_warning():
    from tests.test_api import Branchy

    with pytest.warns(UserWarning, match=r"fx_shard: plan='auto' leaves 2 layers of Branchy replicated \(up, down\): "
                                         r"torch.export could not capture Branchy either \(GuardOnDataDependentSymNode"):
        root = fx_shard.transform(Branchy(), "auto", mesh_shape={"tp": 2}, example_inputs=(torch.randn(4, 8),))
    layers = root.meta[SHARDING_KEY].layers
    assert {layers[p].style for p in ("up", "down")} == {"replicate"}
    # The exception's own first line, so the report says why (not just its class).
    assert layers["up"].source.startswith(
        "inferred: replicated, torch.export could not capture Branchy either "
        "(GuardOnDataDependentSymNode: Could not guard on data-dependent expression"
    )


def test_auto_on_gpt2_without_inputs_plans_from_its_dummy_inputs_without_a_cache():
    from tests.hf_models import build_hf, hf_inputs

    model = build_hf("gpt2")
    root = fx_shard.transform(model, "auto", mesh_shape={"tp": 4})  # export runs on dummy_inputs, use_cache=False
    layers = root.meta[SHARDING_KEY].layers
    assert (layers["transformer.h.0.attn.c_attn"].style, layers["transformer.h.0.attn.c_proj"].style) == ("qkv", "rowwise")
    assert all(r.specs for p, r in layers.items() if ".h." in p)
    torch.testing.assert_close(root(**hf_inputs()).logits, model(**hf_inputs()).logits)


class _SoftmaxModuleAttention(torch.nn.Module):
    """timm Swin's attention: the scores through an nn.Softmax module."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.qkv, self.proj, self.softmax, self.heads = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), \
            torch.nn.Softmax(dim=-1), heads

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.softmax((q * 0.25) @ k.transpose(-2, -1))
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def test_an_nn_softmax_over_the_keys_keeps_the_heads_local():
    model, x = _SoftmaxModuleAttention(), torch.randn(2, 5, 32)
    root = fx_shard.transform(model, "auto", mesh_shape={"tp": 2}, example_inputs=(x,))
    layers = root.meta[SHARDING_KEY].layers
    assert [layers[f"qkv.{p}"].style for p in "qkv"] == ["colwise"] * 3 and layers["proj"].style == "rowwise"
    torch.testing.assert_close(root(x), model(x))


@pytest.mark.parametrize("kv_heads", [2, 3])
@pytest.mark.parametrize("repeat", ["expand", "interleave"])
def test_a_heads_view_with_2_or_3_kv_heads_is_heads_not_fused_parts(repeat, kv_heads):
    """``view(b, t, 2, head_dim)`` then attention (Meta's Llama, gpt-fast): k/v are plain column-parallel
    layers; 2 or 3 parts would need the axis taken apart (unbind, [i]) as a fused layer's is."""
    from tests.toy import RepeatedKvAttention, seeded

    model, x = seeded(RepeatedKvAttention, repeat, dim=48, heads=6, kv_heads=kv_heads), torch.randn(2, 5, 48)
    root = fx_shard.transform(model, "auto", mesh_shape={"tp": kv_heads}, example_inputs=(x,))
    layers = root.meta[SHARDING_KEY].layers
    assert {path: r.style for path, r in layers.items()} == {"wq": "colwise", "wk": "colwise", "wv": "colwise", "wo": "rowwise"}
    torch.testing.assert_close(root(x), model(x))
