"""FuseSiblingLinears: column-parallel layers that read the same input become one matmul."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fx_shard.capture import capture, linear_like_modules
from fx_shard.fused import join_parts
from fx_shard.ops import fused_part
from fx_shard.passes import AnnotateSharding, FitHeadsToMesh, FuseSiblingLinears
from fx_shard.plan import ShardPlan
from fx_shard.sharding import recorded_layers
from tests.passes.helpers import annotated, call_targets
from tests.toy import GQAttention, VllmBlock, seeded

GQA_PLAN = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}


def fitted_gqa(model, tp: int):
    gm = capture(copy.deepcopy(model))
    AnnotateSharding(ShardPlan(GQA_PLAN).resolve(linear_like_modules(gm), {"tp": tp}, "tp"))(gm)
    FitHeadsToMesh({"tp": tp})(gm)
    return gm


@pytest.mark.parametrize(("tp", "groups"), [(2, [("q_proj", "k_proj", "v_proj")]), (4, [("k_proj", "v_proj")])])
def test_fuse_sibling_linears_one_matmul_per_input_and_spec(tp, groups):
    model, x = seeded(GQAttention), torch.randn(2, 5, 32)
    gm = capture(copy.deepcopy(model))
    plan = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}
    AnnotateSharding(ShardPlan(plan).resolve(linear_like_modules(gm), {"tp": tp}, "tp"))(gm)
    FitHeadsToMesh({"tp": tp})(gm)
    before = {t: r for t, r in recorded_layers(gm)}
    assert FuseSiblingLinears({"tp": tp})(gm).modified
    fused = {n.args[0][0].target.rpartition(".")[0]: n for n in gm.graph.find_nodes(op="call_function", target=join_parts)}
    assert [tuple(w.target.rpartition(".")[0] for w in fused[g[0]].args[0]) for g in groups] == groups
    assert len(gm.graph.find_nodes(op="call_function", target=fused_part)) == sum(map(len, groups))
    # Every layer keeps its record (on its weight's get_attr when fused), with a note; the function is unchanged.
    after = dict(recorded_layers(gm))
    assert after.keys() == before.keys()
    for target in (t for g in groups for t in g):
        assert after[target].specs == before[target].specs and "one matmul with its siblings" in after[target].notes[-1]
    torch.testing.assert_close(gm(x), model(x))
    assert list(gm.state_dict()) == list(model.state_dict())
    code = gm.code
    assert not FuseSiblingLinears({"tp": tp})(gm).modified and gm.code == code


@pytest.mark.parametrize(("tp", "left"), [(2, ["o_proj"]), (4, ["q_proj", "o_proj"])])
def test_fuse_sibling_linears_graph_lints_with_one_linear_per_group(tp, left):
    model, x = seeded(GQAttention), torch.randn(2, 5, 32)
    gm = fitted_gqa(model, tp)
    assert FuseSiblingLinears({"tp": tp})(gm).modified
    gm.graph.lint()
    assert call_targets(gm) == left  # the fused layers are no longer called as modules
    assert len(gm.graph.find_nodes(op="call_function", target=F.linear)) == 1
    assert len(gm.graph.find_nodes(op="call_function", target=join_parts)) == 1  # weights only: no bias
    torch.testing.assert_close(gm(x), model(x))


def test_fuse_sibling_linears_leaves_lone_or_unlike_layers():
    gm = annotated(seeded(VllmBlock))  # vLLM layers return tuples: not plain nn.Linear
    assert not FuseSiblingLinears({"tp": 4})(gm).modified


@pytest.mark.parametrize("case", ["vllm_tuples", "kv_replicated"])
def test_fuse_sibling_linears_no_match_leaves_graph_and_records_alone(case):
    # One KV head on 4 devices is replicated: q is the only colwise reader of x, so it has no sibling.
    if case == "vllm_tuples":
        model, x = seeded(VllmBlock), torch.randn(2, 5, 32)
        gm = annotated(model)
    else:
        model, x = seeded(GQAttention, kv_heads=1), torch.randn(2, 5, 32)
        gm = fitted_gqa(model, 4)
    code, targets, before = gm.code, call_targets(gm), dict(recorded_layers(gm))
    assert not FuseSiblingLinears({"tp": 4})(gm).modified
    assert gm.code == code and call_targets(gm) == targets and dict(recorded_layers(gm)) == before
    assert not gm.graph.find_nodes(op="call_function", target=join_parts)
    torch.testing.assert_close(gm(x), model(x))
