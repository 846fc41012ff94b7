"""SplitFusedLinear: one linear per part of a fused QKV or gate_up layer."""

import operator

import pytest
import torch
from torch import nn
from torch.testing import FileCheck

from fx_shard.passes import RewireFusedConsumers, SplitFusedLinear
from fx_shard.sharding import SHARDING_KEY, sharding_of
from fx_shard.split_linear import SplitLinear
from tests.passes.helpers import annotated, call_targets, fused_cats, split_for
from tests.toy import QKV_32, FusedAttention, GPT2Like, VllmBlock, seeded


def test_split_fused_nn_linear():
    model = seeded(FusedAttention)
    x = torch.randn(2, 5, 32)
    gm = annotated(model, {"qkv": QKV_32, "proj": "rowwise"})
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


@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_split_vllm_layers_twice_changes_nothing(skip_bias_add):
    # The parts are colwise layers returning (output, bias) too: a second run must not take them for fused layers.
    model = seeded(VllmBlock, skip_bias_add=skip_bias_add)
    gm = annotated(model)
    SplitFusedLinear()(gm)
    code, targets = gm.code, call_targets(gm)
    assert not SplitFusedLinear()(gm).modified
    assert gm.code == code and call_targets(gm) == targets
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(gm(x), model(x))


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
    # A checkpoint without the fused tensor is reported by its own key, not the parts'.
    fused_key = next(k for k in expected if k.endswith("qkv_proj.weight"))
    incomplete = {k: v for k, v in expected.items() if k != fused_key}
    result = gm_fresh.load_state_dict(incomplete, strict=False)
    assert result.missing_keys == [fused_key]
    with pytest.raises(RuntimeError, match=rf'Missing key\(s\) in state_dict: "{fused_key}"'):
        gm_fresh.load_state_dict(incomplete)


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
    gm = annotated(model, {"qkv": {"style": "qkv", "output_sizes": [8, 8, 8]}})
    SplitFusedLinear()(gm)
    assert call_targets(gm) == ["qkv.q", "qkv.k", "qkv.v"] * 2
    x = torch.randn(4, 8)
    torch.testing.assert_close(gm(x), model(x))
    assert SHARDING_KEY in next(iter(gm.graph.find_nodes(op="call_module"))).meta


def test_split_conv1d_fused_qkv_keeps_function_and_checkpoint_layout():
    model = seeded(GPT2Like)
    x = torch.randn(2, 5, 32)
    gm = split_for(model, {"c_attn": QKV_32, "c_proj": "rowwise"}, (x,))
    records = {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module")}
    # Conv1D stores (in, out): column-parallel shards dim 1, row-parallel dim 0.
    assert records["c_attn.q"].specs == {"weight": (None, "tp"), "bias": ("tp",)}
    assert records["c_proj"].specs == {"weight": ("tp", None)}
    assert gm.get_submodule("c_attn.k").weight.shape == (32, 32)
    RewireFusedConsumers()(gm)
    assert fused_cats(gm) == []
    torch.testing.assert_close(gm(x), model(x))
    assert {k: v.shape for k, v in gm.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    torch.testing.assert_close(gm.state_dict()["c_attn.weight"], model.c_attn.weight, rtol=0, atol=0)
