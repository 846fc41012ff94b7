"""The pipeline, declared once: capture -> plan -> rewrite -> summarize.

``fx_shard.transform`` / ``shard``, the ``torch.compile`` backend and the
benchmarks all run a ``Pipeline``; nothing else assembles passes. ::

    capture    the model as GraphModules (whole, or part by part), shapes from example inputs
    plan       one ShardingRecord per linear-like layer (ShardPlan precedence, the model's own plan,
               inference); layers outside every graph fitted to whole heads here, as no pass sees them
    rewrite    PASSES on each graph, in order
    summarize  ModelSharding on the root: every layer's record, the pass diff, what stayed opaque

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
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase

from fx_shard.axes import Axis, Spec, axis_size
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
from fx_shard.plan import Decision, ShardPlan, decide, resolve_tp_axis
from fx_shard.sharding import SHARDING_KEY, ModelSharding, PassDiff, ShardingRecord, SourceKind, recorded_layers
from fx_shard.styles import Colwise, Replicate

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
    into one linear per part, or ``"interleave"``: kept one matmul with rows
    reordered per device, and separate column-parallel layers of one input
    computed as one matmul too. ``only`` runs a subset of the passes (by
    name, still in the declared order): the benchmarks' baselines use it.
    ``timings`` holds the seconds of each phase of the last run.
    """

    mesh_shape: Mapping[str, int]
    tp_axis: Axis | None = None
    fused: str = "split"
    only: Sequence[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fused not in FUSED_STRATEGIES:
            raise PlanError(f"fused={self.fused!r} is not a strategy; choose one of {', '.join(FUSED_STRATEGIES)}")
        self.mesh_shape = dict(self.mesh_shape)
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
        _check_host_model(model)
        with _gc_paused():
            with self._phase("copy"):
                model_copy = copy.deepcopy(model)
            with self._phase("capture"):
                captured = capture_parts(model_copy)
            if example_inputs is not None or example_kwargs:
                with self._phase("shapes"):
                    _propagate_part_shapes(captured, tuple(example_inputs or ()), dict(example_kwargs or {}))
            with self._phase("plan"):
                records, outside = self._plan(model, captured, ShardPlan.coerce(plan), example_inputs, example_kwargs)
            diff = []
            for prefix, gm in captured.parts.items():
                diff += self.rewrite(gm, _under(records, prefix), prefix)
            with self._phase("summarize"):
                use_einsum_attention(captured.root)
                self.summarize(captured.root, captured.parts, {p: records[p] for p in outside}, captured.opaque, diff)
            if not _on_meta(captured.root):
                with self._phase("code"):
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
        shard_plan = ShardPlan.coerce(plan)
        every_layer = {path: m for path, m in root.named_modules() if is_linear_like(m)}
        shard_plan.resolve(every_layer, self.mesh_shape, self.tp_axis)  # raises PlanError for entries matching no layer
        with _gc_paused():
            with self._phase("capture"):
                opaque = capture(gm)
            layers = linear_like_modules(gm)
            here = ShardPlan(
                {p: layer for p, layer in shard_plan.entries.items() if any(ShardPlan({p: layer}).match(n) for n in layers)},
                class_rules=shard_plan.class_rules, auto=shard_plan.auto,
            )
            with self._phase("plan"):
                model_plan = hf_plan(root) if here.auto else {}
                found = infer_plan(gm, self.ways) if here.auto else {}
                records = here.resolve(layers, self.mesh_shape, self.tp_axis, found, model_plan)
            diff = self.rewrite(gm, records)
            self.summarize(gm, {"": gm}, {}, opaque, diff)
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
        with self._phase("diff"):
            before = _snapshot(gm)
        for p in self._passes(records):
            name = type(p).__name__
            with self._phase(f"pass {name}"):
                p(gm)
            with self._phase("diff"):
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
    ) -> ModelSharding:
        """Leave the ``ModelSharding`` on ``root.meta["sharding"]``: every layer's record, one home."""
        layers: dict[str, ShardingRecord] = {}
        for prefix, gm in parts.items():
            for target, record in recorded_layers(gm):
                layers.setdefault(f"{prefix}.{target}" if prefix else target, record)
        layers.update(outside)
        for path, record in layers.items():
            specs = ", ".join(f"{name} {_spec_text(spec)}" for name, spec in record.specs.items()) or "replicated"
            logger.info("layer %s: %s, %s; %s", path, record.style, specs, record.source)
        summary = ModelSharding(
            self.mesh_shape, self.tp_axis, self.pass_names(), layers, dict(opaque), tuple(diff), frozenset(outside)
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
        for path in outside:  # no pass sees these layers: their heads are fitted here, before any rewrite
            records[path] = _fit_outside(root, path, records[path], self.mesh_shape)
        return records, outside

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def _spec_text(spec: Spec) -> str:
    """A partition spec as ``(tp, -)``: the mesh axis of each dimension, ``-`` where it is whole."""
    return "(" + ", ".join("-" if a is None else a if isinstance(a, str) else "×".join(a) for a in spec) + ")"


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
    if args is None and not kwargs:
        kwargs = getattr(model, "dummy_inputs", None)
        if not isinstance(kwargs, Mapping):
            where = ", ".join(sorted(opaque)[:3])
            raise PlanError(
                f"plan='auto' needs example inputs for the layers torch.fx could not trace (in {where}): "
                f"{', '.join(paths[:4])}{' ...' if len(paths) > 4 else ''}; pass example_inputs= or example_kwargs="
            )
    try:
        found = infer_from_export(model, tuple(args or ()), dict(kwargs or {}), ways)
    except Exception as e:  # the layers stay replicated, and the report says why
        why = f"inferred: replicated, torch.export could not capture {type(model).__name__} either ({type(e).__name__})"
        logger.info("%s: %s", why, e)
        return {p: inferred(Replicate.name, why) for p in paths}
    return {p: d for p, d in found.items() if p in paths}


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


def _propagate_part_shapes(captured: Captured, args: tuple, kwargs: dict) -> None:
    if "" in captured.parts:
        gm = captured.parts[""]
        names = [n.target for n in gm.graph.find_nodes(op="placeholder")]
        propagate_shapes(gm, args + tuple(kwargs[n] for n in names[len(args):] if n in kwargs))
        return
    for path, inputs in record_part_inputs(captured, args, kwargs).items():
        propagate_shapes(captured.parts[path], inputs)


# -- what a pass changed, from node identity -----------------------------------------------------------

_Snapshot = dict[str, tuple[fx.Node, object, tuple, Mapping]]


def _snapshot(gm: fx.GraphModule) -> _Snapshot:
    """Each node's name -> (node, target, args, kwargs) as they are now: references only, no text.

    A pass that changes a node's inputs gives it new ``args`` / ``kwargs``
    containers, so unchanged identity means an unchanged node.
    """
    return {n.name: (n, n.target, n.args, n.kwargs) for n in gm.graph.nodes}


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
        elif any(a is not b for a, b in zip(old, (node, target, args, kwargs))):
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
