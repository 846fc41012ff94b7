"""Each pass: eager reference, rewrite, numerics, exact structure, lint, idempotence, no-match."""

import operator

import pytest
import torch
from torch import fx, nn
from torch.testing import FileCheck

from fx_shard.capture import capture, linear_like_modules
from fx_shard.layers import SplitLinear
from fx_shard.passes import AnnotateSharding, SplitFusedLinear
from fx_shard.plan import ShardPlan
from fx_shard.sharding import SHARDING_KEY, sharding_of
from tests.toy import FusedAttention, VllmBlock, seeded


def annotated(model: nn.Module, plan=None) -> fx.GraphModule:
    gm = capture(model)
    records = ShardPlan.coerce(plan).resolve(linear_like_modules(gm), {"tp": 4}, "tp")
    assert AnnotateSharding(records)(gm).modified
    return gm


def call_targets(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.find_nodes(op="call_module")]


def test_annotate_records_every_layer_and_is_idempotent():
    gm = annotated(seeded(VllmBlock))
    styles = {n.target: sharding_of(n).style for n in gm.graph.find_nodes(op="call_module")}
    assert styles == {"qkv_proj": "qkv", "o_proj": "rowwise", "gate_up_proj": "merged_colwise", "down_proj": "rowwise"}
    code = gm.code
    records = {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module")}
    again = AnnotateSharding(records)(gm)
    assert not again.modified and gm.code == code


def test_split_fused_nn_linear():
    model = seeded(FusedAttention)
    x = torch.randn(2, 5, 32)
    gm = annotated(model, {"qkv": "qkv", "proj": "rowwise"})
    res = SplitFusedLinear()(gm)
    assert res.modified
    gm.graph.lint()
    torch.testing.assert_close(gm(x), model(x))
    assert call_targets(gm) == ["qkv.q", "qkv.k", "qkv.v", "proj"]
    FileCheck().check_count("torch.cat(", 1, exactly=True).run(gm.code)
    assert isinstance(gm.qkv, SplitLinear)
    parts = {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module") if n.target.startswith("qkv.")}
    for name, record in parts.items():
        assert record.style == "colwise" and record.part_of == "qkv"
        assert record.specs == {"weight": ("tp", None), "bias": ("tp",)}
        assert record.source == f"qkv part {name[-1]!r} (plan entry 'qkv')"
    assert gm.get_submodule("qkv.k").weight.shape == (32, 32)
    code = gm.code
    assert not SplitFusedLinear()(gm).modified and gm.code == code


@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_split_fused_vllm_layers_with_bias_tuples(skip_bias_add):
    model = seeded(VllmBlock, skip_bias_add=skip_bias_add)
    x = torch.randn(2, 5, 32)
    gm = annotated(model)
    assert SplitFusedLinear()(gm).modified
    gm.graph.lint()
    torch.testing.assert_close(gm(x), model(x))
    assert call_targets(gm) == ["qkv_proj.q", "qkv_proj.k", "qkv_proj.v", "o_proj", "gate_up_proj.0", "gate_up_proj.1", "down_proj"]
    # The model's own cat, plus qkv and gate_up re-joined; the bias only when the model reads it.
    FileCheck().check_count("torch.cat(", 3 + (1 if skip_bias_add else 0), exactly=True).run(gm.code)
    assert gm.get_submodule("qkv_proj.k").weight.shape == (16, 32)
    assert not any(n.target is operator.getitem and not n.users for n in gm.graph.nodes if n.op == "call_function" and "qkv" in n.name)


def test_split_keeps_state_dict_keys_and_values():
    model = seeded(VllmBlock)
    gm = annotated(model)
    SplitFusedLinear()(gm)
    expected = model.state_dict()
    actual = gm.state_dict()
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    fresh = seeded(VllmBlock)
    for p in fresh.parameters():
        p.data.zero_()
    gm_fresh = annotated(fresh)
    SplitFusedLinear()(gm_fresh)
    gm_fresh.load_state_dict(expected)
    x = torch.randn(3, 32)
    torch.testing.assert_close(gm_fresh(x), model(x))


def test_split_leaves_unfused_graph_alone():
    model = seeded(FusedAttention)
    gm = annotated(model, {"qkv": "colwise", "proj": "rowwise"})
    code = gm.code
    assert not SplitFusedLinear()(gm).modified
    assert gm.code == code and call_targets(gm) == ["qkv", "proj"]


def test_split_module_called_twice_is_split_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            return self.qkv(x) + self.qkv(2 * x)

    model = seeded(Twice)
    gm = annotated(model, {"qkv": "qkv"})
    SplitFusedLinear()(gm)
    assert call_targets(gm) == ["qkv.q", "qkv.k", "qkv.v"] * 2
    x = torch.randn(4, 8)
    torch.testing.assert_close(gm(x), model(x))
    assert SHARDING_KEY in next(iter(gm.graph.find_nodes(op="call_module"))).meta
