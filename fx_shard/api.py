"""The pipeline: capture -> plan -> passes -> materialize, and the seed's ``shard_model``."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

import torch
from torch import fx, nn

from fx_shard.capture import Captured, capture_parts, is_linear_like, linear_like_modules, propagate_shapes, record_part_inputs
from fx_shard.hf import hf_plan, use_einsum_attention
from fx_shard.layers import SplitLinear, class_style, out_features
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
from fx_shard.errors import FxShardError, PlanError
from fx_shard.infer import Inferred, infer_from_export, infer_plan
from fx_shard.passes.fit_heads_to_mesh import fit_to_heads
from fx_shard.plan import LayerPlan, ShardPlan, first_match, resolve_tp_axis
from fx_shard.sharding import SHARDING_KEY, Axis, ModelSharding, PassDiff, ShardingRecord, axis_size
from fx_shard.xla import materialize, mesh_shape_of

__all__ = ["FUSED_STRATEGIES", "pass_names", "run_passes", "shard", "shard_model", "transform"]

FUSED_STRATEGIES = ("split", "interleave")

logger = logging.getLogger(__name__)


def transform(
    model: nn.Module,
    plan: ShardPlan | Mapping | str | None = None,
    *,
    mesh_shape: Mapping[str, int],
    tp_axis: Axis | None = None,
    example_inputs: tuple | None = None,
    example_kwargs: Mapping | None = None,
    fused: str = "split",
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
    into one linear per part, or ``"interleave"``: kept one matmul with rows
    reordered per device (falls back to split where it cannot keep heads whole),
    and separate column-parallel layers of one input computed as one matmul
    too (fewer all-reduces in training; see ``FuseSiblingLinears``).
    """
    if fused not in FUSED_STRATEGIES:
        raise PlanError(f"fused={fused!r} is not a strategy; choose one of {', '.join(FUSED_STRATEGIES)}")
    axis = resolve_tp_axis(mesh_shape, tp_axis)
    _check_host_model(model)
    captured = capture_parts(copy.deepcopy(model))
    root = captured.root
    if example_inputs is not None or example_kwargs:
        _propagate_part_shapes(captured, tuple(example_inputs or ()), dict(example_kwargs or {}))
    shard_plan = ShardPlan.coerce(plan)
    model_plan = hf_plan(root) if shard_plan.auto else {}
    inferred = {}
    if shard_plan.auto:
        for prefix, gm in captured.parts.items():
            inferred.update(infer_plan(gm, axis_size(mesh_shape, axis), prefix))
    layers = _linear_layers(captured)
    in_graphs = {_join(prefix, t) for prefix, gm in captured.parts.items() for t in linear_like_modules(gm)}
    unplanned = [
        p for p in layers
        if p not in in_graphs and shard_plan.match(p) is None and class_style(layers[p]) is None and first_match(model_plan, p) is None
    ]
    if shard_plan.auto and unplanned:
        inferred.update(_infer_opaque(model, unplanned, captured.opaque, example_inputs, example_kwargs, axis_size(mesh_shape, axis)))
    records = shard_plan.resolve(layers, mesh_shape, axis, inferred, model_plan)
    diff = []
    for prefix, gm in captured.parts.items():
        diff += run_passes(gm, _under(records, prefix), mesh_shape, fused, prefix)
    opaque_layers = {path: _fit_opaque(root, path, r, mesh_shape) for path, r in records.items() if path not in in_graphs}
    use_einsum_attention(root)
    summary = ModelSharding(dict(mesh_shape), axis, pass_names(fused), opaque_layers, captured.opaque, tuple(diff))
    if isinstance(root, fx.GraphModule):
        root.meta[SHARDING_KEY] = summary
    else:
        root.meta = {SHARDING_KEY: summary}
    return root


def _passes(records: Mapping[str, ShardingRecord], mesh_shape: Mapping[str, int], fused: str) -> list:
    """The pass pipeline, in order: annotate, fused layers, consumers, heads, attention, constraints."""
    return [
        AnnotateSharding(records),
        KeepGroupedFused(mesh_shape),
        *([InterleaveFusedLinear(mesh_shape)] if fused == "interleave" else []),
        SplitFusedLinear(),
        RewireFusedConsumers(),
        FitHeadsToMesh(mesh_shape),
        *([FuseSiblingLinears(mesh_shape)] if fused == "interleave" else []),
        AttentionToEinsum(),
        InsertShardingConstraints(),
    ]


def pass_names(fused: str = "split") -> tuple[str, ...]:
    """The names of the passes ``transform`` runs, in order."""
    return tuple(type(p).__name__ for p in _passes({}, {}, fused))


def run_passes(
    gm: fx.GraphModule, records: Mapping[str, ShardingRecord], mesh_shape: Mapping[str, int], fused: str = "split", part: str = ""
) -> list[PassDiff]:
    """Run the pipeline on one graph with its layers' ``records``; what each pass changed."""
    diff = []
    for p in _passes(records, mesh_shape, fused):
        before = _describe_nodes(gm)
        p(gm)
        diff.append(_diff(type(p).__name__, part, before, _describe_nodes(gm)))
    return diff


def _describe_nodes(gm: fx.GraphModule) -> dict[str, str]:
    """Each node as ``name = op target(args)``, to see what a pass added, removed or rewrote."""
    described = {}
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else torch.fx.node._get_qualified_name(node.target)
        args = ", ".join(map(str, node.args)) + "".join(f", {k}={v}" for k, v in node.kwargs.items())
        described[node.name] = f"{node.name} = {target}({args})"
    return described


def _diff(pass_name: str, part: str, before: dict[str, str], after: dict[str, str]) -> PassDiff:
    return PassDiff(
        pass_name, part,
        added=tuple(after[n] for n in after if n not in before),
        removed=tuple(before[n] for n in before if n not in after),
        rewritten=tuple((before[n], after[n]) for n in after if n in before and before[n] != after[n]),
    )


def _check_host_model(model: nn.Module) -> None:
    """fx_shard places parameters itself: a model already on an accelerator (or sharded) is refused."""
    for name, param in model.named_parameters():
        if param.device.type not in ("cpu", "meta"):
            raise FxShardError(
                f"{type(model).__name__}.{name} is already on {param.device}; fx_shard.shard and transform take a "
                "model on the CPU or the meta device and place it themselves (for a model already on the XLA "
                "device, use fx_shard.shard_model, which shards in place)"
            )


def _infer_opaque(
    model: nn.Module, paths: list[str], opaque: Mapping[str, str], args: tuple | None, kwargs: Mapping | None, ways: int
) -> dict[str, Inferred]:
    """Inferred decisions for layers outside every graph, from the graph ``torch.export`` captures."""
    if args is None and not kwargs:
        kwargs = getattr(model, "dummy_inputs", None)
        if not isinstance(kwargs, Mapping):
            where = ", ".join(sorted(opaque)[:3])
            raise PlanError(
                f"plan='auto' needs example inputs for the layers torch.fx could not trace (in {where}): "
                f"{', '.join(paths[:4])}{' ...' if len(paths) > 4 else ''}; pass example_inputs= or example_kwargs="
            )
    try:
        inferred = infer_from_export(model, tuple(args or ()), dict(kwargs or {}), ways)
    except Exception as e:  # the layers stay replicated, and the report says why
        why = f"inferred: replicated, torch.export could not capture {type(model).__name__} either ({type(e).__name__})"
        logger.info("%s: %s", why, e)
        return {p: Inferred(LayerPlan("replicate"), why) for p in paths}
    return {p: d for p, d in inferred.items() if p in paths}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _under(records: Mapping[str, ShardingRecord], prefix: str) -> dict[str, ShardingRecord]:
    """The records of layers inside the part at ``prefix``, keyed relative to it."""
    if not prefix:
        return dict(records)
    return {k[len(prefix) + 1:]: r for k, r in records.items() if k.startswith(prefix + ".")}


def _linear_layers(captured: Captured) -> dict[str, nn.Module]:
    """Every linear-like layer the model calls: graph order inside parts, module order outside."""
    layers = {_join(p, t): m for p, gm in captured.parts.items() for t, m in linear_like_modules(gm).items()}
    inside = tuple(p + "." for p in captured.parts if p)
    for path, module in captured.root.named_modules():
        if "" not in captured.parts and is_linear_like(module) and not path.startswith(inside):
            layers.setdefault(path, module)
    return layers


def _propagate_part_shapes(captured: Captured, args: tuple, kwargs: dict) -> None:
    if "" in captured.parts:
        gm = captured.parts[""]
        names = [n.target for n in gm.graph.find_nodes(op="placeholder")]
        propagate_shapes(gm, args + tuple(kwargs[n] for n in names[len(args):] if n in kwargs))
        return
    for path, inputs in record_part_inputs(captured, args, kwargs).items():
        propagate_shapes(captured.parts[path], inputs)


def _fit_opaque(root: nn.Module, path: str, record: ShardingRecord, mesh_shape: Mapping[str, int]) -> ShardingRecord:
    """Keep heads whole in a layer outside any graph, with the head size its attention module declares."""
    owner = root.get_submodule(path.rpartition(".")[0])
    head_dim = getattr(owner, "head_dim", None)
    module = root.get_submodule(path)
    fitted = fit_to_heads(path, record, out_features(module), head_dim, mesh_shape) if record.style == "colwise" else None
    return fitted or record


def shard(
    model: nn.Module,
    mesh,
    plan: ShardPlan | Mapping | str | None = None,
    *,
    tp_axis: Axis | None = None,
    example_inputs: tuple | None = None,
    example_kwargs: Mapping | None = None,
    fused: str = "split",
) -> nn.Module:
    """``transform`` for ``mesh``, then place the result on the XLA device, sharded.

    Returns a recompiled GraphModule computing ``model``'s function; run it
    eagerly under SPMD or hand it to ``torch.compile(..., backend="openxla")``.
    """
    gm = transform(
        model, plan, mesh_shape=mesh_shape_of(mesh), tp_axis=tp_axis,
        example_inputs=example_inputs, example_kwargs=example_kwargs, fused=fused,
    )
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
