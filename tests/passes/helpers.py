"""Helpers shared by the pass tests: annotate a toy model, list its layers, split it with shapes known."""

import copy

import torch
from torch import fx, nn

from fx_shard.capture import capture, linear_like_modules, propagate_shapes
from fx_shard.passes import AnnotateSharding, SplitFusedLinear
from fx_shard.plan import ShardPlan
from fx_shard.sharding import sharding_of


def annotated(model: nn.Module, plan=None) -> fx.GraphModule:
    gm = capture(model)
    records = ShardPlan.coerce(plan).resolve(linear_like_modules(gm), {"tp": 4}, "tp")
    assert AnnotateSharding(records)(gm).modified
    return gm


def call_targets(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.find_nodes(op="call_module")]


def split_for(model, plan, example):
    gm = annotated(model, plan)
    propagate_shapes(gm, example)
    SplitFusedLinear()(gm)
    return gm


def fused_cats(gm) -> list:
    """The cats that join all parts of one split layer (the model's own cats are not counted)."""
    found = []
    for cat in gm.graph.find_nodes(op="call_function", target=torch.cat):
        sources = [a if a.op == "call_module" else a.args[0] if a.args else None for a in cat.args[0]]
        owners = [sharding_of(n) if isinstance(n, fx.Node) else None for n in sources]
        parents = {r.part_of for r in owners if r is not None and r.part_of}
        if len(parents) == 1 and len(owners) == len(gm.get_submodule(parents.pop()).part_names):
            found.append(cat)
    return found


def grouped_annotated(model: nn.Module, x: torch.Tensor, tp: int) -> fx.GraphModule:
    gm = capture(copy.deepcopy(model))
    propagate_shapes(gm, (x,))
    plan = {"qkv": {"style": "qkv", "num_heads": 8, "num_kv_heads": 2}, "dense": "rowwise"}
    AnnotateSharding(ShardPlan(plan).resolve(linear_like_modules(gm), {"tp": tp}, "tp"))(gm)
    return gm
