"""AnnotateSharding: each resolved record lands on its layer's node; nothing else changes."""

import torch

from fx_shard.capture import capture, linear_like_modules
from fx_shard.passes import AnnotateSharding
from fx_shard.plan import ShardPlan
from fx_shard.sharding import SHARDING_KEY, sharding_of
from tests.passes.helpers import annotated
from tests.toy import VllmBlock, seeded


def test_annotate_records_every_layer_and_is_idempotent():
    gm = annotated(seeded(VllmBlock))
    styles = {n.target: sharding_of(n).style for n in gm.graph.find_nodes(op="call_module")}
    assert styles == {"qkv_proj": "qkv", "o_proj": "rowwise", "gate_up_proj": "merged_colwise", "down_proj": "rowwise"}
    code = gm.code
    records = {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module")}
    again = AnnotateSharding(records)(gm)
    assert not again.modified and gm.code == code


def test_annotate_writes_metadata_only():
    model = seeded(VllmBlock)
    x = torch.randn(2, 5, 32)
    gm = capture(model)
    code = gm.code
    records = ShardPlan.coerce(None).resolve(linear_like_modules(gm), {"tp": 4}, "tp")
    assert AnnotateSharding(records)(gm).modified
    gm.graph.lint()
    assert gm.code == code
    assert {n.target: n.meta[SHARDING_KEY] for n in gm.graph.nodes if SHARDING_KEY in n.meta} == dict(records)
    torch.testing.assert_close(gm(x), model(x))


def test_annotate_leaves_layers_without_a_record_alone():
    gm = capture(seeded(VllmBlock))
    code = gm.code
    records = ShardPlan.coerce(None).resolve(linear_like_modules(gm), {"tp": 4}, "tp")
    assert not AnnotateSharding({"not_a_layer": records["qkv_proj"]})(gm).modified
    assert gm.code == code and not [n for n in gm.graph.nodes if SHARDING_KEY in n.meta]
    assert AnnotateSharding({"qkv_proj": records["qkv_proj"]})(gm).modified
    assert [n.target for n in gm.graph.nodes if SHARDING_KEY in n.meta] == ["qkv_proj"]
