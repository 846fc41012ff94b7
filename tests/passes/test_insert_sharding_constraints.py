"""InsertShardingConstraints: a ShardingConstraint after each layer whose record asks for one."""

import pytest
import torch

from fx_shard import models
from fx_shard.constraint import ShardingConstraint
from fx_shard.passes import InsertShardingConstraints
from tests.passes.helpers import annotated
from tests.toy import VllmBlock, seeded


@pytest.mark.parametrize("model_name", ["llama", "llama-vllm"])
def test_insert_sharding_constraints_after_gathered_head(model_name):
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
