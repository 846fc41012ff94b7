"""The pipeline, declared once: capture -> plan -> rewrite -> summarize.

``fx_shard.transform`` / ``shard``, the ``torch.compile`` backend and the
benchmarks all run a ``Pipeline``; nothing else assembles passes. ::

    capture    the model as GraphModules (whole, or part by part), shapes from example inputs
    plan       one ShardingRecord per linear-like layer (ShardPlan precedence, the model's own plan,
               inference); layers outside every graph fitted to whole heads here, as no pass sees them
    rewrite    PASSES on each graph, in order
    summarize  ModelSharding on the root: every layer's record, the pass diff, what stayed opaque;
               on an fsdp mesh every parameter's spec gains the fsdp axis here (fx_shard.fsdp)

The pass order and why (each pass reads what the ones before it wrote):

1. ``AnnotateSharding``: records onto the layers' nodes; everything after reads them.
2. ``KeepGroupedFused``: decides, before anything splits, which fused QKV stay one matmul (per KV group).
3. ``InterleaveFusedLinear`` (``fused="interleave"``): the other fused layers kept one matmul, rows reordered.
4. ``SplitFusedLinear``: what is still fused becomes one linear per part, joined by a ``cat``.
5. ``RewireFusedConsumers``: consumers read the parts, so the ``cat`` goes (needs 3/4's joins).
6. ``FitHeadsToMesh``: column-parallel records narrowed to whole heads; after 4, so each part
   (q vs. k/v with fewer KV heads) is fitted on its own.
7. ``FuseSiblingLinears`` (``fused="interleave"``): column layers of one input as one matmul;
   after 6, so siblings are grouped by their final specs.
8. ``AttentionToEinsum``: attention in a form XLA partitions over heads.
9. ``InsertShardingConstraints``: pins outputs records ask for; last, on the final nodes.
"""

from __future__ import annotations

import copy
import gc
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase

from fx_shard.axes import Axis, Spec, axis_size, spec_text
from fx_shard.capture import (
    Captured,
    capture_parts,
    generate_code,
    is_linear_like,
    linear_like_modules,
    propagate_shapes,
    record_part_inputs,
)
from fx_shard.errors import FxShardError, PlanError
from fx_shard.fsdp import shard_over_fsdp
from fx_shard.geometry import out_features
from fx_shard.heads import fit_to_heads
from fx_shard.hf import hf_plan, use_einsum_attention
from fx_shard.infer import infer_from_export, infer_plan, inferred
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
from fx_shard.patterns import PENDING_SHAPES
from fx_shard.plan import Decision, ShardPlan, check_mesh_shape, decide, resolve_tp_axis
from fx_shard.sharding import (
    SHARDING_KEY,
    ModelSharding,
    PassDiff,
    ShardingRecord,
    SourceKind,
    recorded_layers,
    transformed,
)
from fx_shard.styles import Colwise, Replicate
from fx_shard.timing import timed

__all__ = ["FUSED_STRATEGIES", "PASSES", "Pipeline"]

logger = logging.getLogger(__name__)

FUSED_STRATEGIES = ("split", "interleave")

# The passes in order (see the module docstring for why), each with the strategies it runs under.
PASSES: tuple[tuple[type[PassBase], tuple[str, ...]], ...] = (
    (AnnotateSharding, FUSED_STRATEGIES),
    (KeepGroupedFused, FUSED_STRATEGIES),
    (InterleaveFusedLinear, ("interleave",)),
    (SplitFusedLinear, FUSED_STRATEGIES),
    (RewireFusedConsumers, FUSED_STRATEGIES),
    (FitHeadsToMesh, FUSED_STRATEGIES),
    (FuseSiblingLinears, ("interleave",)),
    (AttentionToEinsum, FUSED_STRATEGIES),
    (InsertShardingConstraints, FUSED_STRATEGIES),
)


@dataclass
class Pipeline:
    """fx_shard's one pipeline for a mesh of ``mesh_shape``; no XLA needed.

    ``fused`` chooses how fused QKV / gate_up layers are sharded: ``"split"``
    (the default, also for None) into one linear per part, or ``"interleave"``:
    kept one matmul with rows reordered per device, and separate
    column-parallel layers of one input computed as one matmul too. ``only``
    runs a subset of the passes (by name, still in the declared order): the
    benchmarks' baselines use it. ``timings`` holds the seconds of each phase
    of the last run.

    A model this pipeline already rewrote (it has ``root.meta["sharding"]``)
    is not rewritten again: ``transform`` returns a copy with its records
    (see ``_keep_transformed``).
    """

    mesh_shape: Mapping[str, int]
    tp_axis: Axis | None = None
    fused: str | None = None
    only: Sequence[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # What the caller asked for, before defaults: a transformed model is kept only if it was made so.
    _asked: dict[str, object] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._asked = {"tp_axis": self.tp_axis, "fused": self.fused}
        self.fused = "split" if self.fused is None else self.fused
        if self.fused not in FUSED_STRATEGIES:
            raise PlanError(f"fused={self.fused!r} is not a strategy; choose one of {', '.join(FUSED_STRATEGIES)}")
        self.mesh_shape = check_mesh_shape(self.mesh_shape)
        self.tp_axis = resolve_tp_axis(self.mesh_shape, self.tp_axis)
        unknown = sorted(set(self.only or ()) - {cls.__name__ for cls, _ in PASSES})
        if unknown:
            raise PlanError(f"unknown passes {unknown}; the passes are {', '.join(cls.__name__ for cls, _ in PASSES)}")

    @property
    def ways(self) -> int:
        """How many ways the tensor-parallel axis splits a dimension."""
        return axis_size(self.mesh_shape, self.tp_axis)

    def pass_names(self) -> tuple[str, ...]:
        """The names of the passes this pipeline runs, in order."""
        return tuple(cls.__name__ for cls in self._pass_classes())

    def _pass_classes(self) -> Iterator[type[PassBase]]:
        for cls, strategies in PASSES:
            if self.fused in strategies and (self.only is None or cls.__name__ in self.only):
                yield cls

    def _passes(self, records: Mapping[str, ShardingRecord]) -> list[PassBase]:
        made = []
        for cls in self._pass_classes():
            if cls is AnnotateSharding:
                made.append(cls(records))
            elif cls in (KeepGroupedFused, InterleaveFusedLinear, FitHeadsToMesh, FuseSiblingLinears):
                made.append(cls(self.mesh_shape))
            else:
                made.append(cls())
        return made

    # -- the phases ---------------------------------------------------------------------------------

    def transform(
        self,
        model: nn.Module,
        plan: ShardPlan | Mapping | str | None = None,
        example_inputs: tuple | None = None,
        example_kwargs: Mapping | None = None,
    ) -> nn.Module:
        """Capture, plan and rewrite a copy of ``model``; see ``fx_shard.transform``."""
        self.timings = {}
        done = transformed(model)
        if done is not None:
            return self._keep_transformed(model, done, plan)
        _check_host_model(model)
        shard_plan = ShardPlan.coerce(plan)
        with _gc_paused():
            with timed(self.timings, "copy"):
                model_copy = copy.deepcopy(model)
            with timed(self.timings, "capture"):
                captured = capture_parts(model_copy, example_inputs, example_kwargs)
            if example_inputs is not None or example_kwargs:
                with timed(self.timings, "shapes"):
                    _defer_part_shapes(captured, tuple(example_inputs or ()), dict(example_kwargs or {}))
            with timed(self.timings, "plan"):
                records, outside = self._plan(model, captured, shard_plan, example_inputs, example_kwargs)
            diff = []
            for prefix, gm in captured.parts.items():
                diff += self.rewrite(gm, _under(records, prefix), prefix)
            with timed(self.timings, "summarize"):
                kept = use_einsum_attention(captured.root)
                notes = (f"attention: {kept}",) if kept else ()
                outside_records = {p: records[p] for p in outside}
                self.summarize(captured.root, captured.parts, outside_records, captured.opaque, diff, shard_plan, notes)
            if not _on_meta(captured.root):
                with timed(self.timings, "code"):
                    generate_code(captured.root)
            return captured.root

    def transform_captured(
        self,
        gm: fx.GraphModule,
        root: nn.Module,
        plan: ShardPlan | Mapping | str | None,
        capture: Callable[[fx.GraphModule], Mapping[str, str]],
    ) -> fx.GraphModule:
        """Capture, plan and rewrite a graph of ``root`` captured elsewhere (dynamo's), in place.

        ``capture`` makes the graph's linear-like layers ``call_module`` nodes
        in place and returns the layers it could not, with the reason
        (``capture_dynamo.DynamoCapture``). Each plan entry must name a
        linear-like layer of ``root``, while this graph (one of several, with
        graph breaks) may hold only some of them.
        """
        self.timings = {}
        if transformed(root) is not None:
            raise FxShardError(
                f"{type(root).__name__} was already rewritten by fx_shard.transform / shard (root.meta['sharding']); "
                "compile it with torch.compile(model, backend='openxla') (fx_shard.shard's result is sharded already), "
                "or give fx_shard.backend the original model"
            )
        shard_plan = ShardPlan.coerce(plan)
        every_layer = {path: m for path, m in root.named_modules() if is_linear_like(m)}
        # Raises PlanError for entries matching no layer.
        every_record = shard_plan.resolve(every_layer, self.mesh_shape, self.tp_axis)
        if not shard_plan.auto:
            _warn_if_nothing_planned(root, every_record)
        with _gc_paused():
            with timed(self.timings, "capture"):
                opaque = capture(gm)
            layers = linear_like_modules(gm)
            here = ShardPlan(
                {p: layer for p, layer in shard_plan.entries.items() if any(ShardPlan({p: layer}).match(n) for n in layers)},
                class_rules=shard_plan.class_rules, auto=shard_plan.auto,
            )
            with timed(self.timings, "plan"):
                model_plan = hf_plan(root) if here.auto else {}
                found = infer_plan(gm, self.ways) if here.auto else {}
                records = here.resolve(layers, self.mesh_shape, self.tp_axis, found, model_plan)
            diff = self.rewrite(gm, records)
            self.summarize(gm, {"": gm}, {}, opaque, diff, shard_plan)
        logger.info("fx_shard: %d layers planned in a captured graph, %d left inlined", len(records), len(opaque))
        return gm

    def rewrite(self, gm: fx.GraphModule, records: Mapping[str, ShardingRecord], part: str = "") -> list[PassDiff]:
        """Run the passes on one graph with its layers' ``records``; what each pass changed.

        The graph is linted after each pass. A captured graph is lazy (a pass's ``recompile`` only
        marks its code stale), so its Python code is generated once, after the last pass; for a model
        on the meta device (planned to be reported on, or to load a checkpoint into), only when first
        needed (a call, ``.code``, ``load_sharded``).
        """
        diff = []
        with timed(self.timings, "diff"):
            before = _snapshot(gm)
        for p in self._passes(records):
            name = type(p).__name__
            with timed(self.timings, f"pass {name}"):
                p(gm)
            with timed(self.timings, "diff"):
                after = _snapshot(gm)
                diff.append(_diff(name, part, before, after))
            changed = diff[-1]
            logger.info(
                "pass %s: +%d -%d ~%d nodes%s", name, len(changed.added), len(changed.removed), len(changed.rewritten),
                f" in {part}" if part else "",
            )
            before = after
        return diff

    def summarize(
        self,
        root: nn.Module,
        parts: Mapping[str, fx.GraphModule],
        outside: Mapping[str, ShardingRecord],
        opaque: Mapping[str, str],
        diff: list[PassDiff],
        plan: ShardPlan | None = None,
        notes: tuple[str, ...] = (),
    ) -> ModelSharding:
        """Leave the ``ModelSharding`` on ``root.meta["sharding"]``: every layer's record, one home."""
        layers: dict[str, ShardingRecord] = {}
        for prefix, gm in parts.items():
            gm.meta.pop(PENDING_SHAPES, None)  # shapes no plan or pass needed: never computed
            for target, record in recorded_layers(gm):
                layers.setdefault(f"{prefix}.{target}" if prefix else target, record)
        layers.update(outside)
        _check_tied(root, layers)
        layers, unplanned = shard_over_fsdp(root, layers, self.mesh_shape)
        if logger.isEnabledFor(logging.INFO):
            for path, record in layers.items():
                specs = ", ".join(f"{name} {spec_text(spec)}" for name, spec in record.specs.items()) or "replicated"
                logger.info("layer %s: %s, %s; %s", path, record.style, specs, record.source)
        summary = ModelSharding(
            self.mesh_shape, self.tp_axis, self.pass_names(), layers, dict(opaque), tuple(diff), frozenset(outside),
            plan=plan.to_dict() if plan is not None else None, fused=self.fused, notes=notes, unplanned=unplanned,
        )
        if not hasattr(root, "meta"):
            root.meta = {}
        root.meta[SHARDING_KEY] = summary
        return summary

    def _plan(
        self, model: nn.Module, captured: Captured, shard_plan: ShardPlan, args: tuple | None, kwargs: Mapping | None
    ) -> tuple[dict[str, ShardingRecord], list[str]]:
        """Every linear-like layer's record, and the paths of those outside every graph."""
        root = captured.root
        model_plan = hf_plan(root) if shard_plan.auto else {}
        found: dict[str, Decision] = {}
        if shard_plan.auto:
            for prefix, gm in captured.parts.items():
                found.update(infer_plan(gm, self.ways, prefix))
        layers = _linear_layers(captured)
        in_graphs = {_join(prefix, t) for prefix, gm in captured.parts.items() for t in linear_like_modules(gm)}
        outside = [p for p in layers if p not in in_graphs]
        undecided = [p for p in outside if decide(shard_plan, p, layers[p], model_plan).kind is SourceKind.DEFAULT]
        if shard_plan.auto and undecided:
            found.update(_infer_outside(model, undecided, captured.opaque, args, kwargs, self.ways))
        records = shard_plan.resolve(layers, self.mesh_shape, self.tp_axis, found, model_plan)
        _warn_if_nothing_planned(model, records)
        for path in outside:  # no pass sees these layers: their heads are fitted here, before any rewrite
            records[path] = _fit_outside(root, path, records[path], self.mesh_shape)
        return records, outside

    def _keep_transformed(self, model: nn.Module, done: ModelSharding, plan: ShardPlan | Mapping | str | None) -> nn.Module:
        """A copy of ``model``, which this pipeline already rewrote, with its records, if this call asks for the same.

        Rewriting it again would plan its split parts anew (a fused layer's checkpoint keys would become one per
        part, its records would be replaced); so a second ``transform`` is a no-op, and ``shard(transform(m), mesh)``
        places the transformed model as it is. Asking for another mesh, axis, strategy or plan is an error:
        those need the original model. ``plan=None`` keeps the model's plan; example inputs are not needed.
        """
        name = type(model).__name__
        on_device = next((p.device for p in model.parameters() if p.device.type not in ("cpu", "meta")), None)
        if on_device is not None:
            raise FxShardError(
                f"{name} is already sharded on {on_device} (fx_shard.shard's result): use it as it is; "
                "to shard for another mesh or plan, shard the original model"
            )
        asked = []
        if self.mesh_shape != dict(done.mesh_shape):
            asked.append(f"mesh_shape={self.mesh_shape}")
        if self._asked["tp_axis"] is not None and self.tp_axis != done.tp_axis:
            asked.append(f"tp_axis={self.tp_axis!r} (it has {done.tp_axis!r})")
        if self._asked["fused"] is not None and self.fused != done.fused:
            asked.append(f"fused={self.fused!r} (it has {done.fused!r})")
        if plan is not None and not _same_plan(ShardPlan.coerce(plan), done.plan):
            asked.append(f"another plan than its own ({done.plan})")
        if asked:
            raise PlanError(
                f"{name} was already transformed by fx_shard for mesh {dict(done.mesh_shape)} (root.meta['sharding']), "
                f"but this call asks for {'; '.join(asked)}; transform the original model for that, or call with "
                "plan=None and the same mesh to keep this one as it is"
            )
        logger.info("fx_shard: %s was already transformed for mesh %s; kept as it is", name, dict(done.mesh_shape))
        with timed(self.timings, "copy"):
            return copy.deepcopy(model)


def _same_plan(plan: ShardPlan, data: Mapping | None) -> bool:
    """Whether ``plan`` is the plan ``data`` (``ShardPlan.to_dict()``) describes, entries in the same order."""
    ours = plan.to_dict()
    return data is not None and ours == data and list(ours["entries"]) == list(data["entries"])


def _on_meta(root: nn.Module) -> bool:
    return any(t.is_meta for t in root.parameters())


def _check_host_model(model: nn.Module) -> None:
    """fx_shard places parameters itself: a model already on an accelerator (or sharded) is refused."""
    for name, param in model.named_parameters():
        if param.device.type not in ("cpu", "meta"):
            raise FxShardError(
                f"{type(model).__name__}.{name} is already on {param.device}; fx_shard.shard and transform take a "
                "model on the CPU or the meta device and place it themselves (for a model already on the XLA "
                "device, use fx_shard.shard_model, which shards in place)"
            )


def _infer_outside(
    model: nn.Module, paths: list[str], opaque: Mapping[str, str], args: tuple | None, kwargs: Mapping | None, ways: int
) -> dict[str, Decision]:
    """Inferred decisions for layers outside every graph, from the graph ``torch.export`` captures."""
    dummy = args is None and not kwargs
    if dummy:
        kwargs = getattr(model, "dummy_inputs", None)
        if not isinstance(kwargs, Mapping):
            where = ", ".join(sorted(opaque)[:3])
            raise PlanError(
                f"plan='auto' needs example inputs for the layers torch.fx could not trace (in {where}): "
                f"{', '.join(paths[:4])}{' ...' if len(paths) > 4 else ''}; pass example_inputs= or example_kwargs="
            )
        if "use_cache" in inspect.signature(model.forward).parameters:  # a returned cache object stops torch.export
            kwargs = {**kwargs, "use_cache": False}
    try:
        found = infer_from_export(model, tuple(args or ()), dict(kwargs or {}), ways)
    except Exception as e:  # the layers stay replicated, and the report says why
        message = next((line.strip() for line in str(e).splitlines() if line.strip()), "no message")
        message = message if len(message) <= 160 else message[:157] + "..."
        why = (
            f"inferred: replicated, torch.export could not capture {type(model).__name__} either "
            f"({type(e).__name__}: {message})"
        )
        if dummy:
            why += "; it ran on the model's dummy_inputs: pass the example_kwargs= the model runs with"
        warnings.warn(
            f"fx_shard: plan='auto' leaves {len(paths)} layers of {type(model).__name__} replicated "
            f"({', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}): {why[len('inferred: replicated, '):]}",
            UserWarning, stacklevel=_caller_outside_fx_shard(),
        )
        return {p: inferred(Replicate.name, why) for p in paths}
    return {p: d for p, d in found.items() if p in paths}


def _warn_if_nothing_planned(model: nn.Module, records: Mapping[str, ShardingRecord]) -> None:
    """Warn when no rule covered any layer: the model would run replicated, which is rarely what was meant."""
    if not records or any(r.source_kind is not SourceKind.DEFAULT for r in records.values()):
        return
    names = list(records)
    warnings.warn(
        f"fx_shard: no rule covered any of the {len(names)} linear-like layers of {type(model).__name__} "
        f"({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}), so nothing is sharded; pass plan='auto' to infer "
        "a plan from the graph, or a plan naming the layers, e.g. {'*.q_proj': 'colwise', '*.o_proj': 'rowwise'}",
        UserWarning,
        stacklevel=_caller_outside_fx_shard(),
    )


def _caller_outside_fx_shard() -> int:
    """The ``stacklevel`` of the first caller outside fx_shard, so a warning points at the user's line."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _check_tied(root: nn.Module, layers: Mapping[str, ShardingRecord]) -> None:
    """A parameter shared by several layers (tied weights) must be sharded alike by each layer's record.

    Otherwise one record would decide for both, and the other layer's record (and the report) would be wrong.
    """
    seen: dict[int, tuple[str, str, Spec | None, ShardingRecord]] = {}
    for path, record in layers.items():
        for name, param in root.get_submodule(path).named_parameters(recurse=False):
            spec = record.specs.get(name)
            first = seen.setdefault(id(param), (path, name, spec, record))
            if first[2] == spec:
                continue
            how = lambda s: f"shards it {s}" if s is not None else "replicates it"  # noqa: E731
            raise PlanError(
                f"{first[0]}.{first[1]} and {path}.{name} are one tensor (tied weights), but {first[0]} "
                f"({first[3].style}, {first[3].source}) {how(first[2])} and {path} ({record.style}, {record.source}) "
                f"{how(spec)}; give both layers styles that shard it alike: 'vocab' on the embedding with "
                "'lm_head' on the head, or 'replicate' on both"
            )


def _fit_outside(root: nn.Module, path: str, record: ShardingRecord, mesh_shape: Mapping[str, int]) -> ShardingRecord:
    """Keep heads whole in a layer outside any graph, with the head size its attention module declares."""
    if record.style != Colwise.name:
        return record
    head_dim = getattr(root.get_submodule(path.rpartition(".")[0]), "head_dim", None)
    return fit_to_heads(path, record, out_features(root.get_submodule(path)), head_dim, mesh_shape) or record


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


def _defer_part_shapes(captured: Captured, args: tuple, kwargs: dict) -> None:
    """Each graph's shape propagation, deferred to the first shape a plan or pass looks up (``PENDING_SHAPES``).

    Many plans never look one up (an explicit plan on separate q/k/v layers); then nothing runs.
    """
    if "" in captured.parts:
        gm = captured.parts[""]
        names = [n.target for n in gm.graph.find_nodes(op="placeholder")]
        inputs = {"": args + tuple(kwargs[n] for n in names[len(args):] if n in kwargs)}
    else:
        inputs = record_part_inputs(captured, args, kwargs)
    for path, part_inputs in inputs.items():
        gm = captured.parts[path]
        gm.meta[PENDING_SHAPES] = lambda gm=gm, part_inputs=part_inputs: propagate_shapes(gm, part_inputs)


# -- what a pass changed, from node identity -----------------------------------------------------------

_Snapshot = dict[str, tuple[fx.Node, object, tuple, Mapping]]


def _snapshot(gm: fx.GraphModule) -> _Snapshot:
    """Each node's name -> (node, target, args, kwargs) as they are now: references only, no text.

    A pass that changes a node's inputs gives it new ``args`` / ``kwargs``
    containers, so unchanged identity means an unchanged node.
    """
    return {n.name: (n, n.target, n._args, n._kwargs) for n in gm.graph.nodes}


def _describe(name: str, target: object, args: tuple, kwargs: Mapping) -> str:
    """A node as ``name = op target(args)``, the text the report shows."""
    target = target if isinstance(target, str) else torch.fx.node._get_qualified_name(target)
    text = ", ".join(map(str, args)) + "".join(f", {k}={v}" for k, v in kwargs.items())
    return f"{name} = {target}({text})"


def _diff(pass_name: str, part: str, before: _Snapshot, after: _Snapshot) -> PassDiff:
    """Nodes added, removed and rewritten by a pass; only changed nodes are described in text."""
    added, rewritten = [], []
    for name, (node, target, args, kwargs) in after.items():
        old = before.get(name)
        if old is None:
            added.append(_describe(name, target, args, kwargs))
        elif old[0] is not node or old[1] is not target or old[2] is not args or old[3] is not kwargs:
            old_text, new_text = _describe(name, *old[1:]), _describe(name, target, args, kwargs)
            if old_text != new_text:
                rewritten.append((old_text, new_text))
    removed = [_describe(name, *old[1:]) for name, old in before.items() if name not in after]
    return PassDiff(pass_name, part, added=tuple(added), removed=tuple(removed), rewritten=tuple(rewritten))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while the pipeline runs, as it was after.

    A capture builds tens of thousands of objects that all stay alive (nodes,
    proxies' graphs, metadata); each automatic collection on the way walks
    them all again, for no garbage: a third of an 80-layer transform's time.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
