"""Each pass: eager reference, rewrite, numerics, exact structure, lint, idempotence, no-match."""

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.testing import FileCheck

from fx_shard.capture import capture, linear_like_modules
from fx_shard.layers import SplitLinear
from fx_shard.ops import batched_matmul, einsum_attention
from fx_shard.passes import (
    AnnotateSharding,
    AttentionToEinsum,
    FitHeadsToMesh,
    FuseSiblingLinears,
    InsertShardingConstraints,
    InterleaveFusedLinear,
    KeepGroupedFused,
    RewireFusedConsumers,
    SplitFusedLinear,
)
from fx_shard.plan import ShardPlan
from fx_shard.sharding import SHARDING_KEY, sharding_of
from tests.toy import FalconQKV, FusedAttention, GQAttention, GroupedQKV, HeadsAttention, VllmBlock, seeded


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
    gm = annotated(model, {"qkv": "qkv"})
    SplitFusedLinear()(gm)
    assert call_targets(gm) == ["qkv.q", "qkv.k", "qkv.v"] * 2
    x = torch.randn(4, 8)
    torch.testing.assert_close(gm(x), model(x))
    assert SHARDING_KEY in next(iter(gm.graph.find_nodes(op="call_module"))).meta


def split_for(model, plan, example):
    gm = annotated(model, plan)
    from fx_shard.capture import propagate_shapes

    propagate_shapes(gm, example)
    SplitFusedLinear()(gm)
    return gm


def fused_cats(gm) -> list:
    """The cats that join all parts of one split layer (the model's own cats are not counted)."""
    found = []
    for cat in gm.graph.find_nodes(op="call_function", target=torch.cat):
        owners = [sharding_of(a if a.op == "call_module" else a.args[0]) for a in cat.args[0]]
        parents = {r.part_of for r in owners if r is not None and r.part_of}
        if len(parents) == 1 and len(owners) == len(gm.get_submodule(parents.pop()).part_names):
            found.append(cat)
    return found


@pytest.mark.parametrize("layout", ["timm", "index", "unbind_axis", "split_int", "split_list", "chunk", "slices"])
def test_rewire_removes_the_concatenation(layout):
    model = seeded(HeadsAttention, layout)
    x = torch.randn(2, 6, 32)
    gm = split_for(model, {"qkv": "qkv", "proj": "rowwise"}, (x,))
    assert len(fused_cats(gm)) == 1
    assert RewireFusedConsumers()(gm).modified
    gm.graph.lint()
    assert fused_cats(gm) == []
    torch.testing.assert_close(gm(x), model(x))
    code = gm.code
    assert not RewireFusedConsumers()(gm).modified and gm.code == code


def test_rewire_keeps_unrecognised_consumers_and_says_so():
    model = seeded(HeadsAttention, "unknown")
    x = torch.randn(2, 6, 32)
    gm = split_for(model, {"qkv": "qkv", "proj": "rowwise"}, (x,))
    assert RewireFusedConsumers()(gm).modified  # only the notes
    assert len(fused_cats(gm)) == 1
    torch.testing.assert_close(gm(x), model(x))
    notes = {n.target: sharding_of(n).notes for n in gm.graph.find_nodes(op="call_module") if n.target.startswith("qkv.")}
    assert set(notes) == {"qkv.q", "qkv.k", "qkv.v"}
    assert all(len(v) == 1 and v[0].startswith("the concatenation of the parts stays: consumer not recognised (%split") for v in notes.values())
    assert not RewireFusedConsumers()(gm).modified


def test_rewire_without_shapes_leaves_rank_dependent_splits():
    # split(C, dim=2) is a split of the features only if the tensor is 3-D: unknown without example inputs.
    model = seeded(HeadsAttention, "split_int")
    gm = annotated(model, {"qkv": "qkv", "proj": "rowwise"})
    SplitFusedLinear()(gm)
    RewireFusedConsumers()(gm)
    assert len(fused_cats(gm)) == 1
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(gm(x), model(x))


def test_rewire_vllm_tuple_outputs_and_silu_and_mul():
    model = seeded(VllmBlock)
    x = torch.randn(2, 5, 32)
    gm = split_for(model, None, (x,))
    assert RewireFusedConsumers()(gm).modified
    assert fused_cats(gm) == []
    FileCheck().check_count("torch.cat(", 1, exactly=True).run(gm.code)  # the model's own cat([k, v])
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("layout", ["timm", "split_int"])
def test_attention_to_einsum(layout):
    model = seeded(HeadsAttention, layout)
    x = torch.randn(2, 6, 32)
    gm = capture(model)
    assert AttentionToEinsum()(gm).modified
    gm.graph.lint()
    torch.testing.assert_close(gm(x), model(x))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention not in targets and operator.matmul not in targets
    expected = {"timm": (batched_matmul, 2), "split_int": (einsum_attention, 1)}[layout]
    assert targets.count(expected[0]) == expected[1]
    code = gm.code
    assert not AttentionToEinsum()(gm).modified and gm.code == code


def test_attention_to_einsum_leaves_other_graphs_alone():
    gm = capture(seeded(VllmBlock))
    code = gm.code
    assert not AttentionToEinsum()(gm).modified and gm.code == code


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


def test_fitting_axes_takes_whole_axes_then_a_block_of_the_next():
    from fx_shard.sharding import axis_size, fitting_axes, local_shape

    assert fitting_axes(("tp",), 8, {"tp": 8}) == ("tp",)
    assert fitting_axes(("tp",), 2, {"tp": 8}) == ("tp:2",)
    assert fitting_axes(("tp",), 6, {"tp": 8}) == ("tp:2",)  # the largest block count both divide
    assert fitting_axes(("tp",), 3, {"tp": 8}) == ()
    assert fitting_axes(("tp",), 2, {"tp": 8}, partial=False) == ()
    assert fitting_axes(("kv", "tp"), 2, {"kv": 2, "tp": 4}) == ("kv",)
    assert fitting_axes(("kv", "tp"), 4, {"kv": 2, "tp": 4}) == ("kv", "tp:2")
    assert axis_size({"kv": 2, "tp": 8}, ("kv", "tp:2")) == 4
    assert local_shape((16, 64), ("tp:2", None), {"tp": 8}) == (8, 64)


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


@pytest.mark.parametrize("model_name", ["llama", "llama-vllm"])
def test_insert_sharding_constraints_after_gathered_head(model_name):
    from fx_shard import models
    from fx_shard.constraint import ShardingConstraint

    model = models.build(model_name)
    (ids,) = models.example_inputs(model_name)
    plan = {"lm_head": {"style": "lm_head", "gather_output": True}}
    gm = annotated(model, plan)
    assert InsertShardingConstraints()(gm).modified
    gm.graph.lint()
    (constraint,) = [n for n in gm.graph.find_nodes(op="call_module") if isinstance(gm.get_submodule(n.target), ShardingConstraint)]
    assert constraint.target == "lm_head_output_constraint" and constraint.args[0].target == "lm_head"
    assert gm.get_submodule(constraint.target).spec == ()
    torch.testing.assert_close(gm(ids), model(ids))  # identity until materialized on XLA
    code = gm.code
    assert not InsertShardingConstraints()(gm).modified and gm.code == code


def test_no_constraint_unless_asked():
    gm = annotated(seeded(VllmBlock))
    code = gm.code
    assert not InsertShardingConstraints()(gm).modified and gm.code == code


def test_split_conv1d_fused_qkv_keeps_function_and_checkpoint_layout():
    from transformers.pytorch_utils import Conv1D

    class GPT2Like(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj = Conv1D(3 * 32, 32), Conv1D(32, 32)

        def forward(self, x):
            q, k, v = self.c_attn(x).split(32, dim=2)
            return self.c_proj(q * k + v)

    model = seeded(GPT2Like)
    x = torch.randn(2, 5, 32)
    gm = split_for(model, {"c_attn": "qkv", "c_proj": "rowwise"}, (x,))
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


@pytest.mark.parametrize("name", ["gpt2", "vit", "llama-vllm"])
def test_interleave_keeps_fused_layers_one_matmul(name):
    from fx_shard import models
    from fx_shard.models.plans import PLANS
    from fx_shard.ops import fused_part

    model, inputs = models.build(name), models.example_inputs(name)
    gm = capture(copy.deepcopy(model))
    from fx_shard.capture import propagate_shapes

    propagate_shapes(gm, inputs)
    AnnotateSharding(ShardPlan(PLANS[name]).resolve(linear_like_modules(gm), {"tp": 4}, "tp"))(gm)
    assert InterleaveFusedLinear({"tp": 4})(gm).modified
    gm.graph.lint()
    torch.testing.assert_close(gm(*inputs), model(*inputs))
    records = {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module") if sharding_of(n)}
    interleaved = sorted(t for t, r in records.items() if r.interleaved)
    # vLLM's QKV has 2 KV heads: 4 devices would cut them, so it is left for the split; gate_up is interleaved.
    expected = {"gpt2": ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"],
                "vit": ["blocks.0.attn.qkv", "blocks.1.attn.qkv"],
                "llama-vllm": ["model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.gate_up_proj"]}[name]
    assert interleaved == expected
    assert all(r.notes[-1] == "kept fused: rows interleaved for 4 devices" for t, r in records.items() if r.interleaved)
    code = gm.code
    assert not InterleaveFusedLinear({"tp": 4})(gm).modified and gm.code == code
    # Split skips interleaved layers; rewiring then removes every join of parts.
    SplitFusedLinear()(gm)
    RewireFusedConsumers()(gm)
    assert not [c for c in gm.graph.find_nodes(op="call_function", target=torch.cat)
                if all(a.op == "call_function" and a.target is fused_part for a in c.args[0])]
    torch.testing.assert_close(gm(*inputs), model(*inputs))
    expected_sd = model.state_dict()
    assert list(gm.state_dict()) == list(expected_sd)
    for key, value in gm.state_dict().items():
        torch.testing.assert_close(value, expected_sd[key], rtol=0, atol=0)


def grouped_annotated(model: nn.Module, x: torch.Tensor, tp: int) -> fx.GraphModule:
    from fx_shard.capture import propagate_shapes

    gm = capture(copy.deepcopy(model))
    propagate_shapes(gm, (x,))
    plan = {"qkv": {"style": "qkv", "num_heads": 8, "num_kv_heads": 2}, "dense": "rowwise"}
    AnnotateSharding(ShardPlan(plan).resolve(linear_like_modules(gm), {"tp": tp}, "tp"))(gm)
    return gm


def test_keep_grouped_fused_qkv_when_whole_groups_fit():
    model, x = seeded(GroupedQKV), torch.randn(2, 5, 64)
    gm = grouped_annotated(model, x, tp=2)
    code = gm.code
    assert KeepGroupedFused({"tp": 2})(gm).modified
    assert gm.code == code  # records only: the graph keeps its own layout
    record = sharding_of(next(n for n in gm.graph.find_nodes(op="call_module") if n.target == "qkv"))
    assert (record.style, record.interleaved, record.specs) == ("qkv", True, {"weight": ("tp", None)})
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
    assert (record.style, record.groups, record.interleaved) == ("qkv", 2, False)
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
    from fx_shard.layers import join_parts

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
    from fx_shard.layers import join_parts

    assert len(gm.graph.find_nodes(op="call_function", target=join_parts)) == 1
    assert "consumer not recognised" in sharding_of(next(n for n in gm.graph.nodes if n.target == "qkv.q")).notes[-1]
    torch.testing.assert_close(gm(x), model(x))


def test_join_and_split_parts_are_inverse():
    from fx_shard.layers import join_parts, split_parts

    fused = torch.arange(2 * 12 * 3).reshape(2, 12, 3)
    for dim in (1, -2):
        parts = split_parts(fused, [8, 2, 2], groups=2, dim=dim)
        assert [p.shape[1] for p in parts] == [8, 2, 2]
        assert torch.equal(parts[1], torch.cat([fused[:, 4:5], fused[:, 10:11]], 1))
        assert torch.equal(join_parts(parts, groups=2, dim=dim), fused)


def test_keep_grouped_fused_ignores_contiguous_layouts():
    gm = annotated(seeded(FusedAttention), {"qkv": "qkv", "proj": "rowwise"})
    assert not KeepGroupedFused({"tp": 4})(gm).modified


@pytest.mark.parametrize(("tp", "groups"), [(2, [("q_proj", "k_proj", "v_proj")]), (4, [("k_proj", "v_proj")])])
def test_fuse_sibling_linears_one_matmul_per_input_and_spec(tp, groups):
    from fx_shard.layers import join_parts
    from fx_shard.ops import fused_part
    from fx_shard.sharding import recorded_layers

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


def test_fuse_sibling_linears_leaves_lone_or_unlike_layers():
    gm = annotated(seeded(VllmBlock))  # vLLM layers return tuples: not plain nn.Linear
    assert not FuseSiblingLinears({"tp": 4})(gm).modified
