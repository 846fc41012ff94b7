"""The public entry points: ``transform``, ``shard`` and the seed's ``shard_model``.

Each is a few lines over ``fx_shard.pipeline.Pipeline`` (the one pipeline)
and ``fx_shard.xla`` (the one door to torch_xla).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import nn

from fx_shard import styles, xla
from fx_shard.axes import FSDP_AXIS, Axis
from fx_shard.check import check as self_check
from fx_shard.errors import FxShardError, PlanError
from fx_shard.pipeline import Pipeline
from fx_shard.plan import ShardPlan, resolve_tp_axis
from fx_shard.split_linear import SplitLinear
from fx_shard.styles import Colwise

__all__ = ["shard", "shard_model", "transform"]

logger = logging.getLogger(__name__)


def transform(
    model: nn.Module,
    plan: ShardPlan | Mapping | str | None = None,
    *,
    mesh_shape: Mapping[str, int],
    tp_axis: Axis | None = None,
    example_inputs: tuple | None = None,
    example_kwargs: Mapping | None = None,
    fused: str | None = None,
) -> nn.Module:
    """Capture, plan and rewrite ``model`` for a mesh of ``mesh_shape``; no XLA needed.

    Returns a GraphModule when the model traces whole; otherwise a copy of
    the model with every largest sub-tree that traces rewritten as a
    GraphModule, the rest planned module by module (``root.meta["sharding"]``
    lists what stayed opaque and why). Either way the calling convention is
    the model's own. Works on any device, ``meta`` included (nothing is
    allocated); the caller's model is left as it was.

    ``example_inputs`` / ``example_kwargs`` give the passes tensor ranks and
    feature sizes, which some rewrites need (``qkv.split(d, dim=2)`` is a
    split of the last dimension only if the tensor is 3-D).

    ``fused`` chooses how fused QKV / gate_up layers are sharded: ``"split"``
    (the default) into one linear per part, or ``"interleave"``: kept one
    matmul with rows reordered per device (falls back to split where it
    cannot keep heads whole), and separate column-parallel layers of one
    input computed as one matmul too (fewer all-reduces in training; see
    ``FuseSiblingLinears``).

    A model ``transform`` already rewrote is returned as a copy with its
    records, not rewritten again (so ``shard(transform(m, plan, ...), mesh)``
    places ``transform``'s result): give ``plan=None`` (or the same plan) and
    the same mesh; asking for anything else is a ``PlanError``.
    """
    pipeline = Pipeline(mesh_shape, tp_axis, fused)
    return pipeline.transform(model, plan, example_inputs, example_kwargs)


def shard(
    model: nn.Module,
    mesh,
    plan: ShardPlan | Mapping | str | None = None,
    *,
    tp_axis: Axis | None = None,
    example_inputs: tuple | None = None,
    example_kwargs: Mapping | None = None,
    fused: str | None = None,
    check: bool | None = None,
) -> nn.Module:
    """``transform`` for ``mesh``, then place the result on the XLA device, sharded.

    Returns a recompiled GraphModule computing ``model``'s function; run it
    eagerly under SPMD or hand it to ``torch.compile(..., backend="openxla")``.

    ``check``: run the self-check (``fx_shard.check``: the sharded model
    against ``model`` on the example inputs) and raise ``FxShardError``,
    naming the first module that diverges, when they disagree. ``None`` (the
    default) runs it when example inputs are given and ``model`` has real
    parameters (not ``meta``); ``True`` always (example inputs required);
    ``False`` never. The result shows in ``fx_shard.report``.
    """
    checking = _checks(check, model, example_inputs, example_kwargs)
    gm = transform(
        model, plan, mesh_shape=xla.mesh_shape_of(mesh), tp_axis=tp_axis,
        example_inputs=example_inputs, example_kwargs=example_kwargs, fused=fused,
    )
    gm = xla.materialize(gm, mesh)
    if checking:
        result = self_check(gm, model, example_inputs or (), example_kwargs)
        if not result.ok:
            raise FxShardError(
                f"the sharded {type(model).__name__} does not compute what the original does:\n{result}\n"
                "The cause lies in the first diverging module or in the code between it and the last agreeing one: "
                "fx_shard's bug, please report it with this message. To go on, plan the layers there as 'replicate' "
                "({'<path>': 'replicate'}); shard(..., check=False) returns the sharded model unchecked, for "
                "fx_shard.report to show what was done"
            )
    return gm


def _checks(check: bool | None, model: nn.Module, example_inputs: tuple | None, example_kwargs: Mapping | None) -> bool:
    """Whether ``shard`` runs the self-check: as ``check`` says, or by default when it can (inputs, real parameters)."""
    given = example_inputs is not None or bool(example_kwargs)
    if check is None:
        return given and not any(p.is_meta for p in model.parameters())
    if check and not given:
        raise FxShardError(
            "shard(..., check=True) runs the model on its example inputs, and none were given: pass "
            "example_inputs= (and example_kwargs=) the model runs with, or check=None / False"
        )
    return check


def shard_model(model: nn.Module, mesh) -> None:
    """Drop-in for vLLM's ``tpu_distributed_utils.shard_model``: shard in place by layer class name.

    ``model`` is already on the XLA device. QKV (and, unlike vLLM, merged
    gate_up) layers become ``SplitLinear`` with each part's weight rows
    sharded; every other layer as its style's parameter specs say
    (column-parallel weights and biases on the output features, row-parallel
    weights on the input features, embeddings and LM heads by vocabulary
    rows). Layers are matched through their base classes, so subclasses count.
    """
    mesh_shape = xla.mesh_shape_of(mesh)
    if mesh_shape.get(FSDP_AXIS, 1) > 1:
        raise PlanError(
            f"shard_model shards over the tensor-parallel axis only, as vLLM's does, but mesh {mesh_shape} has "
            f"an {FSDP_AXIS!r} axis; use fx_shard.shard, which shards every parameter over it too, or a mesh "
            "without it (make_mesh(tp=..., dp=...))"
        )
    axis = resolve_tp_axis(mesh_shape)
    elsewhere = next(((n, t.device) for n, t in model.named_parameters() if t.device.type != "xla"), None)
    if elsewhere is not None:
        raise FxShardError(
            f"{type(model).__name__}.{elsewhere[0]} is on {elsewhere[1]}; shard_model shards in place a model already "
            "on the XLA device, as vLLM's does: move it first with model.to(fx_shard.xla_device()), or use "
            "fx_shard.shard, which places a CPU model itself"
        )
    for name, module in list(model.named_modules()):
        rule = styles.for_class(module)
        if rule is None or rule[0].shards is None:
            continue
        style = rule[0]
        if style.fused:
            names = style.part_names(len(module.output_sizes))
            # Split on the host, as vLLM does, so each part owns its storage on the device.
            device = module.weight.device
            split = SplitLinear.from_fused(module.cpu(), names, module.output_sizes).to(device)
            parent, _, field = name.rpartition(".")
            setattr(model.get_submodule(parent), field, split)
            targets, style = [getattr(split, n) for n in names], styles.get(Colwise.name)
        else:
            targets = [module]
        for layer in targets:
            for param, spec in style.param_specs(layer, axis).items():
                xla.mark(getattr(layer, param), mesh, spec)
        logger.info("shard_model: %s (%s) -> %s", name, rule[1], rule[0].name)
