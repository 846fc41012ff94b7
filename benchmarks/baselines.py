"""The strategies fx_shard is measured against, built from fx_shard's own pieces.

- ``fused``: the plan's styles with every fused layer (``qkv``,
  ``merged_colwise``) sharded as one column-parallel weight; no rewriting.
- ``seed``: vLLM's ``shard_model`` way: fused layers split into parts whose
  outputs are concatenated again (``SplitFusedLinear`` alone), attention as
  the model wrote it.
- ``fx_shard``: the full pipeline (``fx_shard.shard``).
"""

from __future__ import annotations

import copy

from torch import fx, nn
from torch.fx.passes.infra.pass_manager import PassManager

import fx_shard
from fx_shard.capture import capture, linear_like_modules, propagate_shapes
from fx_shard.passes import AnnotateSharding, SplitFusedLinear
from fx_shard.plan import ShardPlan, resolve_tp_axis
from fx_shard.sharding import SHARDING_KEY, ModelSharding
from fx_shard.xla import materialize, mesh_shape_of

STRATEGIES = ("fused", "seed", "fx_shard")


def shard_with(strategy: str, model: nn.Module, mesh, plan: dict, example_inputs: tuple) -> fx.GraphModule:
    """``model`` sharded on ``mesh`` the way ``strategy`` does it."""
    if strategy == "fx_shard":
        return fx_shard.shard(model, mesh, plan, example_inputs=example_inputs)
    mesh_shape = mesh_shape_of(mesh)
    axis = resolve_tp_axis(mesh_shape)
    gm = capture(copy.deepcopy(model))
    propagate_shapes(gm, example_inputs)
    records = _plan(strategy, plan).resolve(linear_like_modules(gm), mesh_shape, axis)
    passes = [AnnotateSharding(records)] + ([SplitFusedLinear()] if strategy == "seed" else [])
    gm = PassManager(passes)(gm).graph_module
    gm.meta[SHARDING_KEY] = ModelSharding(mesh_shape, axis, tuple(type(p).__name__ for p in passes))
    return materialize(gm, mesh)


def _plan(strategy: str, plan: dict) -> ShardPlan:
    base = ShardPlan(plan)
    if strategy == "seed":
        return base
    fused = {p: "colwise" for p, layer in base.entries.items() if layer.style in ("qkv", "merged_colwise")}
    # Layers the class rules make fused (vLLM-style models) are named by pattern too.
    fused.update({"*.qkv_proj": "colwise", "*.gate_up_proj": "colwise"} if not plan else {})
    return ShardPlan({**plan, **fused})
