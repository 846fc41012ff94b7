"""Styles as units: each built-in style's specs and checks, the registry, and a new style added in one file."""

import pytest
import torch
from torch import nn

import fx_shard
from fx_shard import styles
from fx_shard.errors import PlanError
from fx_shard.layers import MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear
from fx_shard.styles import LayerPlan, Replicate, Style


class KeepWhole(Replicate):
    """A style defined outside fx_shard: replicated, under a name of its own. Defining it registers it."""

    name = "keep_whole_for_test"
    hf_styles = {"keep_whole_for_test_hf": {}}


def test_built_in_styles_in_order():
    assert fx_shard.STYLES == ("colwise", "rowwise", "qkv", "merged_colwise", "vocab", "lm_head", "replicate")
    assert styles.names()[: len(fx_shard.STYLES)] == fx_shard.STYLES


@pytest.mark.parametrize(
    "style, specs",
    [
        ("colwise", {"weight": ("tp", None), "bias": ("tp",)}),
        ("rowwise", {"weight": (None, "tp")}),
        ("lm_head", {"weight": ("tp", None), "bias": ("tp",)}),
        ("replicate", {}),
    ],
)
def test_param_specs_of_a_linear(style, specs):
    assert styles.get(style).param_specs(nn.Linear(8, 16), "tp") == specs


def test_param_specs_of_a_transposed_linear_flip():
    from transformers.pytorch_utils import Conv1D

    assert styles.get("colwise").param_specs(Conv1D(16, 8), "tp") == {"weight": (None, "tp"), "bias": ("tp",)}
    assert styles.get("rowwise").param_specs(Conv1D(16, 8), "tp") == {"weight": ("tp", None)}


def test_fused_styles_own_their_parts():
    qkv, merged = styles.get("qkv"), styles.get("merged_colwise")
    assert (qkv.fused, qkv.part_names(3), merged.fused, merged.part_names(3)) == (True, ("q", "k", "v"), True, ("0", "1", "2"))
    layer = QKVParallelLinear(32, 8, 4, 2)
    assert qkv.check("attn.qkv", layer, LayerPlan("qkv"), 2, "tp") == (32, 16, 16)
    with pytest.raises(PlanError, match=r"part size \(of \[32, 16, 16\]\) \(16\) of attn.qkv are not divisible by mesh axis 'tp' \(32\)"):
        qkv.check("attn.qkv", layer, LayerPlan("qkv"), 32, "tp")
    assert merged.check("mlp.gate_up", MergedColumnParallelLinear(8, [12, 12]), LayerPlan("merged_colwise"), 4, "tp") == (12, 12)


def test_each_style_names_its_vllm_class_and_hugging_face_styles():
    assert styles.for_class(RowParallelLinear(8, 8))[0] is styles.get("rowwise")
    assert styles.for_class(ParallelLMHead(64, 8)) == (styles.get("lm_head"), "ParallelLMHead")
    assert styles.for_class(nn.Linear(2, 2)) is None
    assert styles.from_hf("colwise_rep") == LayerPlan("colwise", gather_output=True)
    assert styles.from_hf("packed_colwise") == LayerPlan("merged_colwise")
    assert styles.from_hf("embedding_rowwise") == LayerPlan("vocab")
    assert styles.from_hf("moe_tp_experts") is None


def test_styles_check_the_layers_they_take():
    with pytest.raises(PlanError, match=r"style 'colwise' does not apply to embedding emb \(Embedding\); use one of vocab, replicate"):
        styles.get("colwise").check("emb", nn.Embedding(8, 4), LayerPlan("colwise"), 2, "tp")
    with pytest.raises(PlanError, match=r"style 'vocab' applies to embeddings, not to fc \(Linear\); use 'lm_head' or 'colwise'"):
        styles.get("vocab").check("fc", nn.Linear(4, 8), LayerPlan("vocab"), 2, "tp")
    with pytest.raises(PlanError, match=r"fc: gather_output applies to styles colwise and lm_head, not 'rowwise'"):
        styles.get("rowwise").check("fc", nn.Linear(4, 8), LayerPlan("rowwise", gather_output=True), 2, "tp")


def test_collectives_per_call_are_the_styles():
    assert {s.name: dict(s.collectives_per_call) for s in styles.registered() if s.collectives_per_call} == {
        "rowwise": {"all-reduce": 1}, "vocab": {"all-reduce": 1},
    }


def test_a_style_defined_in_one_file_is_usable_everywhere():
    """``KeepWhole`` above is the whole change: plans, records, the report and Hugging Face plans know it."""
    assert styles.get("keep_whole_for_test") is not None and isinstance(styles.get("keep_whole_for_test"), Style)
    assert styles.from_hf("keep_whole_for_test_hf") == LayerPlan("keep_whole_for_test")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    gm = fx_shard.transform(model, {"0": "keep_whole_for_test", "2": "rowwise"}, mesh_shape={"tp": 2})
    records = gm.meta["sharding"].layers
    assert (records["0"].style, records["0"].specs, records["2"].specs) == ("keep_whole_for_test", {}, {"weight": (None, "tp")})
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x), model(x))
    assert "keep_whole_for_test" in fx_shard.report(gm)
    with pytest.raises(PlanError, match=r"unknown style 'keep_whole'; styles: colwise, rowwise, .*keep_whole_for_test"):
        fx_shard.ShardPlan({"0": "keep_whole"})
