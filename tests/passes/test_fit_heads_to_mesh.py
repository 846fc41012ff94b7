"""FitHeadsToMesh: a column-parallel projection shards over only as many devices as its heads divide."""

import pytest
import torch

from fx_shard.capture import capture, linear_like_modules
from fx_shard.passes import AnnotateSharding, FitHeadsToMesh
from fx_shard.plan import ShardPlan
from fx_shard.sharding import sharding_of
from tests.passes.helpers import annotated
from tests.toy import FusedAttention, GQAttention, seeded

GQA_PLAN = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}


@pytest.mark.parametrize(("devices", "kv_heads", "kv_axis"), [(2, 2, "tp"), (4, 2, "tp:2"), (8, 2, "tp:2"), (4, 1, None)])
def test_fit_heads_on_a_1d_mesh_shards_kv_over_device_blocks(devices, kv_heads, kv_axis):
    gm = capture(seeded(GQAttention, kv_heads=kv_heads))
    plan = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}
    AnnotateSharding(ShardPlan(plan).resolve(linear_like_modules(gm), {"tp": devices}, "tp"))(gm)
    assert FitHeadsToMesh({"tp": devices})(gm).modified == (kv_axis != "tp")
    records = {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module")}
    assert records["q_proj"].specs == {"weight": ("tp", None)}
    what = f"{kv_heads} heads (head_dim 4) do not divide mesh axes ('tp',) ({devices})"
    for target in ("k_proj", "v_proj"):
        if kv_axis is None:  # one KV head shares no factor with the mesh: replicated
            assert (records[target].style, records[target].specs) == ("replicate", {})
            assert records[target].notes == (f"{what}: replicated, so attention needs no collective",)
        else:  # each KV head on the block of consecutive devices that holds its q heads
            assert records[target].specs == {"weight": (kv_axis, None)}
            if kv_axis != "tp":
                assert records[target].notes == (
                    f"{what}: sharded over ('tp:2',) (2) only, blocks of consecutive devices sharing a piece, "
                    "so attention needs no collective",
                )
    code = gm.code
    assert not FitHeadsToMesh({"tp": devices})(gm).modified and gm.code == code


def test_fit_heads_shards_kv_over_the_kv_axis_of_a_2d_mesh():
    gm = capture(seeded(GQAttention))
    mesh = {"kv": 2, "tp": 4}
    plan = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}
    AnnotateSharding(ShardPlan(plan).resolve(linear_like_modules(gm), mesh, ("kv", "tp")))(gm)
    assert FitHeadsToMesh(mesh)(gm).modified
    records = {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module")}
    assert records["q_proj"].specs == {"weight": (("kv", "tp"), None)}
    assert records["o_proj"].specs == {"weight": (None, ("kv", "tp"))}
    for target in ("k_proj", "v_proj"):
        assert (records[target].style, records[target].specs) == ("colwise", {"weight": ("kv", None)})
        assert records[target].notes == (
            "2 heads (head_dim 4) do not divide mesh axes ('kv', 'tp') (8): sharded over ('kv',) (2) only, "
            "so attention needs no collective",
        )
    assert not FitHeadsToMesh(mesh)(gm).modified


def test_fit_heads_changes_records_only():
    model, x = seeded(GQAttention), torch.randn(2, 5, 32)
    gm = capture(model)
    AnnotateSharding(ShardPlan(GQA_PLAN).resolve(linear_like_modules(gm), {"tp": 8}, "tp"))(gm)
    code = gm.code
    before = {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module")}
    assert FitHeadsToMesh({"tp": 8})(gm).modified
    gm.graph.lint()
    assert gm.code == code
    after = {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module")}
    assert [t for t in before if after[t] != before[t]] == ["k_proj", "v_proj"]
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("case", ["heads_divide", "no_heads_reshape"])
def test_fit_heads_leaves_fitting_or_headless_layers_alone(case):
    # 4 KV heads on 4 devices fit as they are; a fused qkv split with no (..., heads, head_dim) view has no heads to fit.
    if case == "heads_divide":
        gm = capture(seeded(GQAttention, kv_heads=4))
        AnnotateSharding(ShardPlan(GQA_PLAN).resolve(linear_like_modules(gm), {"tp": 4}, "tp"))(gm)
    else:
        gm = annotated(seeded(FusedAttention), {"qkv": "colwise", "proj": "rowwise"})
    code = gm.code
    before = {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module")}
    assert not FitHeadsToMesh({"tp": 4})(gm).modified
    assert gm.code == code
    assert {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module")} == before
