"""ShardPlan: precedence, resolution into records, and the errors a user sees."""

import pytest
from torch import nn

from fx_shard import LayerPlan, PlanError, ShardPlan
from fx_shard.layers import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from fx_shard.plan import resolve_tp_axis

MESH = {"tp": 4}


def test_exact_name_beats_pattern_beats_class_rule():
    plan = ShardPlan({"*.a": "rowwise", "m.a": "colwise", "re:m\\.[bc]": "rowwise"})
    modules = {"m.a": nn.Linear(8, 8), "m.b": ColumnParallelLinear(8, 8), "x.a": nn.Linear(8, 8), "m.c": RowParallelLinear(8, 8)}
    records = plan.resolve(modules, MESH, "tp")
    assert records["m.a"].style == "colwise" and records["m.a"].source == "plan entry 'm.a'"
    assert records["x.a"].style == "rowwise" and records["x.a"].source == "plan entry '*.a'"
    assert records["m.b"].style == "rowwise"  # the regex entry outranks the class rule
    assert records["m.c"].specs == {"weight": (None, "tp")}


def test_first_matching_pattern_wins():
    plan = ShardPlan({"layers.*": "rowwise", "*.proj": "colwise"})
    records = plan.resolve({"layers.proj": nn.Linear(8, 8), "out.proj": nn.Linear(8, 8)}, MESH, "tp")
    assert records["layers.proj"].style == "rowwise"
    assert records["out.proj"].style == "colwise"


def test_class_rules_cover_subclasses_and_specs_follow_style():
    class MyQKV(QKVParallelLinear):
        pass

    records = ShardPlan().resolve({"attn.qkv": MyQKV(32, 8, 4, 2), "plain": nn.Linear(8, 8)}, MESH, "tp")
    qkv = records["attn.qkv"]
    assert (qkv.style, qkv.source, qkv.output_sizes) == ("qkv", "class rule QKVParallelLinear", (32, 16, 16))
    assert qkv.specs == {"weight": ("tp", None), "bias": ("tp",)}
    assert records["plain"].style == "replicate" and records["plain"].specs == {}
    assert records["plain"].source == "no rule covers it"


def test_class_rules_can_be_turned_off():
    records = ShardPlan(class_rules=False).resolve({"o": RowParallelLinear(8, 8)}, MESH, "tp")
    assert records["o"].style == "replicate"


def test_qkv_sizes_from_head_counts():
    plan = ShardPlan({"qkv": {"style": "qkv", "num_heads": 8, "num_kv_heads": 2}})
    record = plan.resolve({"qkv": nn.Linear(64, 96)}, MESH, "tp")["qkv"]
    assert record.output_sizes == (64, 16, 16)


def test_round_trip_through_dict_and_repr_shows_precedence():
    plan = ShardPlan({"*.q": "colwise", "k": LayerPlan("qkv", output_sizes=(4, 2, 2))})
    again = ShardPlan.from_dict(plan.to_dict())
    assert again.to_dict() == plan.to_dict() == {
        "entries": {"*.q": "colwise", "k": {"style": "qkv", "output_sizes": (4, 2, 2)}},
        "class_rules": True,
        "auto": False,
    }
    assert "exact name > first matching pattern > class rules > auto > replicate" in repr(plan)


def test_unknown_style_is_named():
    with pytest.raises(PlanError, match=r"plan entry '\*\.q_proj': unknown style 'colwize'; styles: colwise"):
        ShardPlan({"*.q_proj": "colwize"})


def test_entry_matching_nothing_is_an_error_with_suggestions():
    plan = ShardPlan({"layers.0.attn.q_prj": "colwise"})
    with pytest.raises(PlanError) as info:
        plan.resolve({"layers.0.attn.q_proj": nn.Linear(8, 8)}, MESH, "tp")
    assert "match no linear-like layer: 'layers.0.attn.q_prj'" in str(info.value)
    assert "did you mean layers.0.attn.q_proj?" in str(info.value)


def test_glob_matching_nothing_suggests_globs_that_match():
    # Compared with whole names, '*.q_projj' is close to none; compared with globs the layers answer to, it is.
    modules = {f"model.layers.{i}.attn.{p}": nn.Linear(8, 8) for i in range(4) for p in ("q_proj", "o_proj")}
    with pytest.raises(PlanError) as info:
        ShardPlan({"*.q_projj": "colwise", "model.layers.*.attn.o_prj": "rowwise"}).resolve(modules, MESH, "tp")
    lines = str(info.value).splitlines()
    assert lines[1] == "  '*.q_projj': did you mean *.q_proj, *.o_proj, *.attn.q_proj?"
    assert lines[2] == "  'model.layers.*.attn.o_prj': did you mean model.layers.*.attn.o_proj, model.layers.*.attn.q_proj, *.attn.o_proj?"
    # Each suggestion is a plan key that would match.
    for suggestion in ("*.q_proj", "*.o_proj", "*.attn.q_proj", "*.attn.o_proj", "model.layers.*.attn.o_proj"):
        assert ShardPlan({suggestion: "colwise"}).resolve(modules, MESH, "tp")


def test_indivisible_dimension_names_module_value_and_way_out():
    with pytest.raises(PlanError, match=r"output features \(6\) of mlp.fc are not divisible by mesh axis 'tp' \(4\); use a mesh axis of 1, 2, 3"):
        ShardPlan({"mlp.fc": "colwise"}).resolve({"mlp.fc": nn.Linear(8, 6)}, MESH, "tp")


def test_qkv_sizes_that_do_not_add_up():
    layer = QKVParallelLinear(32, 8, 4, 2)
    layer.output_sizes = [32, 16, 8]
    with pytest.raises(PlanError, match=r"attn.qkv \(QKVParallelLinear\): output_sizes \[32, 16, 8\] do not add up to its 64"):
        ShardPlan().resolve({"attn.qkv": layer}, MESH, "tp")


def test_style_must_fit_the_layer():
    with pytest.raises(PlanError, match=r"style 'colwise' does not apply to embedding emb \(Embedding\)"):
        ShardPlan({"emb": "colwise"}).resolve({"emb": nn.Embedding(16, 8)}, MESH, "tp")


@pytest.mark.parametrize(
    ("mesh", "given", "axis"),
    [
        ({"x": 8, "y": 1}, None, "x"),
        ({"dp": 2, "model": 4}, "model", "model"),
        ({"dp": 2, "tp": 4}, None, "tp"),
        ({"a": 1}, None, "a"),
        ({"kv": 2, "tp": 4}, None, ("kv", "tp")),
        ({"dp": 2, "kv": 2, "tp": 2}, None, ("kv", "tp")),
        # make_mesh's FSDP meshes: a data axis is never the tensor-parallel one, even when tp has size 1
        ({"fsdp": 2, "tp": 4}, None, "tp"),
        ({"dp": 2, "fsdp": 2, "tp": 2}, None, "tp"),
        ({"fsdp": 8, "tp": 1}, None, "tp"),
        ({"dp": 8, "tp": 1}, None, "tp"),
        ({"fsdp": 2, "kv": 2, "tp": 2}, None, ("kv", "tp")),
    ],
)
def test_tp_axis(mesh, given, axis):
    assert resolve_tp_axis(mesh, given) == axis


def test_tp_axis_errors():
    with pytest.raises(PlanError, match=r"mesh axis 'tp' does not exist; the mesh has axes \['x', 'y'\]"):
        resolve_tp_axis({"x": 4, "y": 2}, "tp")
    with pytest.raises(PlanError, match=r"cannot tell the tensor-parallel axis of mesh \{'a': 2, 'b': 2\}; pass tp_axis="):
        resolve_tp_axis({"a": 2, "b": 2})
    with pytest.raises(PlanError, match=r"mesh axis 'kv' does not exist; the mesh has axes \['tp'\]"):
        resolve_tp_axis({"tp": 4}, ("kv", "tp"))
