"""RewireFusedConsumers: the parts of a split layer go straight to the code that split the fused output."""

import pytest
import torch
from torch.testing import FileCheck

from fx_shard.passes import RewireFusedConsumers, SplitFusedLinear
from fx_shard.sharding import sharding_of
from tests.passes.helpers import annotated, fused_cats, split_for
from tests.toy import QKV_32, HeadsAttention, VllmBlock, seeded


@pytest.mark.parametrize("layout", ["timm", "index", "unbind_axis", "split_int", "split_list", "chunk", "slices",
                                    "joined_bias", "added_bias"])
def test_rewire_removes_the_concatenation(layout):
    model = seeded(HeadsAttention, layout)
    x = torch.randn(2, 6, 32)
    gm = split_for(model, {"qkv": QKV_32, "proj": "rowwise"}, (x,))
    assert len(fused_cats(gm)) == 1
    assert RewireFusedConsumers()(gm).modified
    gm.graph.lint()
    assert fused_cats(gm) == []
    torch.testing.assert_close(gm(x), model(x))
    code = gm.code
    assert not RewireFusedConsumers()(gm).modified and gm.code == code
    if layout == "joined_bias":  # each part adds its own bias; the joined one is gone (no slice of it to shard)
        FileCheck().check_not("torch.cat(").check_count("torch.add(", 3, exactly=True).run(code)
    if layout == "added_bias":  # each part adds its slice of the bias
        FileCheck().check_count("extra_bias[slice(", 3, exactly=True).run(code)


def test_rewire_keeps_unrecognised_consumers_and_says_so():
    model = seeded(HeadsAttention, "unknown")
    x = torch.randn(2, 6, 32)
    gm = split_for(model, {"qkv": QKV_32, "proj": "rowwise"}, (x,))
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
    gm = annotated(model, {"qkv": QKV_32, "proj": "rowwise"})
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


def test_rewire_vllm_lints_and_is_idempotent():
    model = seeded(VllmBlock)
    x = torch.randn(2, 5, 32)
    gm = split_for(model, None, (x,))
    RewireFusedConsumers()(gm)
    gm.graph.lint()
    code = gm.code
    assert not RewireFusedConsumers()(gm).modified and gm.code == code
    torch.testing.assert_close(gm(x), model(x))


UNSPLIT = {  # a model, its plan, its input shape, and how many cats the model itself has
    "fused_not_split": (lambda: seeded(VllmBlock), None, (2, 5, 32), 1),
    "colwise_qkv": (lambda: seeded(HeadsAttention, "chunk"), {"qkv": "colwise", "proj": "rowwise"}, (2, 6, 32), 0),
}


@pytest.mark.parametrize("case", list(UNSPLIT))
def test_rewire_leaves_unsplit_layers_and_the_models_own_cats_alone(case):
    # Fused layers not split (yet), a plain colwise qkv, the model's own cat([k, v]): nothing to rewire.
    build, plan, shape, own_cats = UNSPLIT[case]
    model, x = build(), torch.randn(*shape)
    gm = annotated(model, plan)
    code = gm.code
    records = {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module")}
    assert not RewireFusedConsumers()(gm).modified
    assert gm.code == code
    assert {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module")} == records
    FileCheck().check_count("torch.cat(", own_cats, exactly=True).run(gm.code)
    torch.testing.assert_close(gm(x), model(x))
