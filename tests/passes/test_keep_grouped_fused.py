"""KeepGroupedFused: a fused QKV laid out per KV group stays whole where whole groups fit, else is split by group."""

import pytest
import torch

from fx_shard.fused import join_parts
from fx_shard.passes import FitHeadsToMesh, KeepGroupedFused, RewireFusedConsumers, SplitFusedLinear
from fx_shard.sharding import Layout, sharding_of
from tests.passes.helpers import annotated, call_targets, grouped_annotated
from tests.toy import QKV_32, FalconQKV, FusedAttention, GroupedQKV, HeadsAttention, seeded


def test_keep_grouped_fused_qkv_when_whole_groups_fit():
    model, x = seeded(GroupedQKV), torch.randn(2, 5, 64)
    gm = grouped_annotated(model, x, tp=2)
    code = gm.code
    assert KeepGroupedFused({"tp": 2})(gm).modified
    assert gm.code == code  # records only: the graph keeps its own layout
    record = sharding_of(next(n for n in gm.graph.find_nodes(op="call_module") if n.target == "qkv"))
    assert (record.style, record.layout, record.specs) == ("qkv", Layout.GROUPED, {"weight": ("tp", None)})
    assert not SplitFusedLinear()(gm).modified
    torch.testing.assert_close(gm(x), model(x))
    assert not KeepGroupedFused({"tp": 2})(gm).modified


@pytest.mark.parametrize("layout", [GroupedQKV, FalconQKV])
@pytest.mark.parametrize("tp", [4, 8])
def test_grouped_qkv_with_fewer_groups_than_devices_is_split_by_group(layout, tp):
    model, x = seeded(layout), torch.randn(2, 5, 64)
    gm = grouped_annotated(model, x, tp)
    code = gm.code
    assert KeepGroupedFused({"tp": tp})(gm).modified and gm.code == code
    record = sharding_of(next(n for n in gm.graph.find_nodes(op="call_module") if n.target == "qkv"))
    assert (record.style, record.groups, record.layout) == ("qkv", 2, Layout.SPLIT)
    assert SplitFusedLinear()(gm).modified
    assert call_targets(gm) == ["qkv.q", "qkv.k", "qkv.v", "dense"]
    split = gm.get_submodule("qkv")
    # q gathers group 0's 4 heads then group 1's; k (and v) one head per group. hd = 8, per group 6 heads of rows.
    fused = model.qkv.weight
    torch.testing.assert_close(split.q.weight, torch.cat([fused[0:32], fused[48:80]]), rtol=0, atol=0)
    torch.testing.assert_close(split.k.weight, torch.cat([fused[32:40], fused[80:88]]), rtol=0, atol=0)
    torch.testing.assert_close(split.v.weight, torch.cat([fused[40:48], fused[88:96]]), rtol=0, atol=0)
    torch.testing.assert_close(gm(x), model(x))
    assert RewireFusedConsumers()(gm).modified
    assert not gm.graph.find_nodes(op="call_function", target=join_parts)  # every read goes to the parts
    gm.graph.lint()
    torch.testing.assert_close(gm(x), model(x))
    assert FitHeadsToMesh({"tp": tp})(gm).modified
    records = {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module")}
    assert records["qkv.q"].specs == {"weight": ("tp", None)}
    assert records["qkv.k"].specs == records["qkv.v"].specs == {"weight": ("tp:2", None)}
    assert list(gm.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(gm.state_dict()[key], value, rtol=0, atol=0)
    torch.manual_seed(1)
    other = grouped_annotated(layout().eval(), x, tp)
    for p in (KeepGroupedFused({"tp": tp}), SplitFusedLinear()):
        p(other)
    other.load_state_dict(model.state_dict())  # the fused checkpoint splits by group again
    torch.testing.assert_close(other(x), model(x))


@pytest.mark.parametrize("layout", [GroupedQKV, FalconQKV])
@pytest.mark.parametrize("tp", [2, 4])
def test_keep_grouped_fused_twice_changes_nothing(layout, tp):
    # Kept whole (tp=2) or marked for a split by group (tp=4): a second run finds the record already decided.
    model, x = seeded(layout), torch.randn(2, 5, 64)
    gm = grouped_annotated(model, x, tp)
    assert KeepGroupedFused({"tp": tp})(gm).modified
    code = gm.code
    record = sharding_of(next(n for n in gm.graph.find_nodes(op="call_module") if n.target == "qkv"))
    assert not KeepGroupedFused({"tp": tp})(gm).modified
    assert gm.code == code
    assert sharding_of(next(n for n in gm.graph.find_nodes(op="call_module") if n.target == "qkv")) == record


def test_grouped_split_keeps_the_join_for_unknown_consumers():
    class Odd(GroupedQKV):
        def forward(self, x):
            B, N, C = x.shape
            qkv = self.qkv(x).view(B, N, self.kv, self.g + 2, self.hd)
            return self.dense(qkv[:, :, :, 1:5].reshape(B, N, C))  # rows across the q/k boundary

    model, x = seeded(Odd), torch.randn(2, 5, 64)
    gm = grouped_annotated(model, x, tp=4)
    for p in (KeepGroupedFused({"tp": 4}), SplitFusedLinear(), RewireFusedConsumers()):
        p(gm)
    assert len(gm.graph.find_nodes(op="call_function", target=join_parts)) == 1
    assert "consumer not recognised" in sharding_of(next(n for n in gm.graph.nodes if n.target == "qkv.q")).notes[-1]
    torch.testing.assert_close(gm(x), model(x))


def test_keep_grouped_fused_ignores_contiguous_layouts():
    gm = annotated(seeded(FusedAttention), {"qkv": QKV_32, "proj": "rowwise"})
    assert not KeepGroupedFused({"tp": 4})(gm).modified


@pytest.mark.parametrize("layout", ["timm", "chunk"])
def test_keep_grouped_fused_leaves_contiguous_qkv_records_and_graph_alone(layout):
    # timm's reshape(B, N, 3, H, hd) also ends in three dims, but its [q | k | v] is not per KV group.
    model, x = seeded(HeadsAttention, layout), torch.randn(2, 6, 32)
    gm = annotated(model, {"qkv": QKV_32, "proj": "rowwise"})
    code = gm.code
    before = {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module")}
    assert not KeepGroupedFused({"tp": 4})(gm).modified
    assert gm.code == code
    assert {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module")} == before
    torch.testing.assert_close(gm(x), model(x))
