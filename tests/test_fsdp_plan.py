"""fx_shard.fsdp: every parameter's spec on a mesh with an ``fsdp`` axis (no XLA needed)."""

import pytest

import fx_shard
from fx_shard.fsdp import fsdp_spec
from fx_shard.models import build
from fx_shard.models.plans import PLANS
from fx_shard.report import parameter_bytes
from fx_shard.sharding import model_sharding

MESH = {"fsdp": 2, "tp": 4}


@pytest.mark.parametrize(
    ("spec", "shape", "expected"),
    [
        (("tp", None), (128, 64), ("tp", "fsdp")),  # column-parallel: the input dimension
        ((None, "tp"), (64, 128), ("fsdp", "tp")),  # row-parallel: the output dimension
        (("tp:2", None), (16, 64), ("tp:2", "fsdp")),  # k/v over a sub-axis
        (None, (64,), ("fsdp",)),  # a norm weight or a replicated bias
        (None, (256, 64), ("fsdp", None)),  # replicated 2-D: the first dimension that divides
        (None, (3, 64), (None, "fsdp")),
    ],
)
def test_fsdp_goes_on_a_whole_dimension_that_divides(spec, shape, expected):
    assert fsdp_spec(spec, shape, MESH) == (expected, None)


def test_fsdp_spec_says_why_it_leaves_a_parameter():
    assert fsdp_spec(("tp", None), (128, 63), MESH) == (("tp", None), "fsdp=2 divides no whole dimension of (128, 63) (63)")
    assert fsdp_spec(None, (7,), MESH) == (None, "fsdp=2 divides no whole dimension of (7,) (7)")
    assert fsdp_spec(("tp", "dp"), (8, 8), {"dp": 2, "fsdp": 2, "tp": 2}) == (
        ("tp", "dp"), "every dimension of (8, 8) is sharded already (tp, dp)"
    )
    for mesh in ({"tp": 8}, {"dp": 2, "tp": 4}, {"fsdp": 1, "tp": 8}):  # no fsdp axis: nothing changes
        assert fsdp_spec(("tp", None), (128, 64), mesh) == (("tp", None), None)


def test_llama_on_fsdp_x_tp_shards_every_parameter_over_both_axes():
    gm = fx_shard.transform(build("llama"), PLANS["llama"], mesh_shape=MESH)
    summary = model_sharding(gm)
    block = {path.removeprefix("model.layers.0."): dict(r.specs) for path, r in summary.layers.items() if ".0." in path}
    assert block == {
        "self_attn.q_proj": {"weight": ("tp", "fsdp")},
        "self_attn.k_proj": {"weight": ("tp:2", "fsdp")},  # 2 KV heads: over half the tp devices
        "self_attn.v_proj": {"weight": ("tp:2", "fsdp")},
        "self_attn.o_proj": {"weight": ("fsdp", "tp")},
        "mlp.gate_proj": {"weight": ("tp", "fsdp")},
        "mlp.up_proj": {"weight": ("tp", "fsdp")},
        "mlp.down_proj": {"weight": ("fsdp", "tp")},
    }
    assert dict(summary.layers["model.embed_tokens"].specs) == {"weight": ("tp", "fsdp")}
    assert dict(summary.layers["lm_head"].specs) == {"weight": ("tp", "fsdp")}
    norms = [f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
    assert summary.unplanned == {name: ("fsdp",) for name in [*norms, "model.norm.weight"]}
    # The graph's nodes keep the tensor-parallel specs the passes planned with.
    (node,) = [n for n in gm.graph.nodes if n.target == "model.layers.0.mlp.down_proj"]
    assert node.meta["sharding"].specs == {"weight": (None, "tp")}
    text = fx_shard.report(gm)
    assert "model.norm                                      weight (64) (fsdp)" in text
    assert "Parameters in no planned layer (replicated)" not in text
    total, per_device, ideal = parameter_bytes(gm)
    assert total == 410_880
    # Everything over 8 devices but k/v (2 KV heads: over 4 devices, each piece on 2) and the 5 norms (fsdp only).
    kv, norms = 4 * 16 * 64 * 4, 5 * 64 * 4
    assert per_device == ideal == (total - kv - norms) // 8 + kv // 4 + norms // 2 == 53_888
    assert per_device <= 1.05 * total / 8


def test_the_auto_plan_shards_llama_alike():
    planned = model_sharding(fx_shard.transform(build("llama"), PLANS["llama"], mesh_shape=MESH))
    auto = model_sharding(fx_shard.transform(build("llama"), "auto", mesh_shape=MESH))
    assert {p: r.specs for p, r in auto.layers.items()} == {p: r.specs for p, r in planned.layers.items()}
    assert auto.unplanned == planned.unplanned


def test_fsdp_notes_what_it_cannot_shard():
    gm = fx_shard.transform(build("llama"), PLANS["llama"], mesh_shape={"fsdp": 3, "tp": 2})
    summary = model_sharding(gm)
    q = summary.layers["model.layers.0.self_attn.q_proj"]
    assert dict(q.specs) == {"weight": ("tp", None)}
    assert q.notes[-1] == "weight not sharded over fsdp: fsdp=3 divides no whole dimension of (64, 64) (64)"
    assert summary.unplanned == {}  # 64-wide norms: replicated
    assert "Parameters in no planned layer (replicated)" in fx_shard.report(gm)
    assert parameter_bytes(gm)[1] == parameter_bytes(fx_shard.transform(build("llama"), PLANS["llama"], mesh_shape={"tp": 2}))[1]


def test_meshes_without_fsdp_keep_the_tensor_parallel_specs():
    plain = model_sharding(fx_shard.transform(build("llama"), PLANS["llama"], mesh_shape={"tp": 4}))
    data = model_sharding(fx_shard.transform(build("llama"), PLANS["llama"], mesh_shape={"dp": 2, "tp": 4}))
    assert plain.unplanned == data.unplanned == {}
    assert {p: (r.specs, r.notes) for p, r in plain.layers.items()} == {p: (r.specs, r.notes) for p, r in data.layers.items()}
    assert plain.layers["model.layers.0.mlp.down_proj"].specs == {"weight": (None, "tp")}
