"""The pipeline: capture -> plan -> passes -> materialize, and the seed's ``shard_model``."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

from torch import fx, nn
from torch.fx.passes.infra.pass_manager import PassManager

from fx_shard.capture import capture, linear_like_modules, propagate_shapes
from fx_shard.layers import SplitLinear, class_style
from fx_shard.passes import (
    AnnotateSharding,
    AttentionToEinsum,
    FitHeadsToMesh,
    InsertShardingConstraints,
    RewireFusedConsumers,
    SplitFusedLinear,
)
from fx_shard.infer import infer_plan
from fx_shard.plan import ShardPlan, resolve_tp_axis
from fx_shard.sharding import SHARDING_KEY, ModelSharding, axis_size
from fx_shard.xla import materialize, mesh_shape_of

__all__ = ["shard", "shard_model", "transform"]

logger = logging.getLogger(__name__)


def transform(
    model: nn.Module,
    plan: ShardPlan | Mapping | str | None = None,
    *,
    mesh_shape: Mapping[str, int],
    tp_axis: str | None = None,
    example_inputs: tuple | None = None,
) -> fx.GraphModule:
    """Capture, plan and rewrite ``model`` for a mesh of ``mesh_shape``; no XLA needed.

    Works on any device, ``meta`` included (nothing is allocated). The caller's
    model is left as it was: the graph is built over a deep copy.
    ``example_inputs`` (a tuple of positional inputs) give the passes tensor
    ranks and feature sizes, which some rewrites need (``qkv.split(d, dim=2)``
    is a split of the last dimension only if the tensor is 3-D).
    """
    axis = resolve_tp_axis(mesh_shape, tp_axis)
    gm = capture(copy.deepcopy(model))
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    shard_plan = ShardPlan.coerce(plan)
    inferred = infer_plan(gm, axis_size(mesh_shape, axis)) if shard_plan.auto else None
    records = shard_plan.resolve(linear_like_modules(gm), mesh_shape, axis, inferred)
    passes = [
        AnnotateSharding(records),
        SplitFusedLinear(),
        RewireFusedConsumers(),
        FitHeadsToMesh(mesh_shape),
        AttentionToEinsum(),
        InsertShardingConstraints(),
    ]
    gm = PassManager(passes, run_checks_after_each_pass=True)(gm).graph_module
    gm.meta[SHARDING_KEY] = ModelSharding(dict(mesh_shape), axis, tuple(type(p).__name__ for p in passes))
    return gm


def shard(
    model: nn.Module,
    mesh,
    plan: ShardPlan | Mapping | str | None = None,
    *,
    tp_axis: str | None = None,
    example_inputs: tuple | None = None,
) -> fx.GraphModule:
    """``transform`` for ``mesh``, then place the result on the XLA device, sharded.

    Returns a recompiled GraphModule computing ``model``'s function; run it
    eagerly under SPMD or hand it to ``torch.compile(..., backend="openxla")``.
    """
    gm = transform(model, plan, mesh_shape=mesh_shape_of(mesh), tp_axis=tp_axis, example_inputs=example_inputs)
    return materialize(gm, mesh)


def shard_model(model: nn.Module, mesh) -> None:
    """Drop-in for vLLM's ``tpu_distributed_utils.shard_model``: shard in place by layer class name.

    ``model`` is already on the XLA device. QKV (and, unlike vLLM, merged
    gate_up) layers become ``SplitLinear`` with each part's weight rows
    sharded; column-parallel weights are sharded on dim 0 (their bias too),
    row-parallel weights on dim 1; embeddings and LM heads by vocabulary rows.
    Layers are matched through their base classes, so subclasses count.
    """
    from fx_shard.xla import _torch_xla

    xs = _torch_xla().distributed.spmd
    axis = resolve_tp_axis(mesh_shape_of(mesh))
    for name, module in list(model.named_modules()):
        rule = class_style(module)
        if rule is None or rule[0] == "replicate":
            continue
        style = rule[0]
        if style in ("qkv", "merged_colwise"):
            names = ("q", "k", "v") if style == "qkv" else tuple(str(i) for i in range(len(module.output_sizes)))
            # Split on the host, as vLLM does, so each part owns its storage on the device.
            device = module.weight.device
            split = SplitLinear.from_fused(module.cpu(), names, module.output_sizes).to(device)
            parent, _, field = name.rpartition(".")
            setattr(model.get_submodule(parent), field, split)
            targets = [getattr(split, n) for n in names]
        else:
            targets = [module]
        for layer in targets:
            weight_spec = (None, axis) if style == "rowwise" else (axis, None)
            xs.mark_sharding(layer.weight, mesh, weight_spec)
            if getattr(layer, "bias", None) is not None and style != "rowwise":
                xs.mark_sharding(layer.bias, mesh, (axis,))
        logger.info("shard_model: %s (%s) -> %s", name, rule[1], style)
