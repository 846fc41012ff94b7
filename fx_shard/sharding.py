"""The sharding record fx_shard keeps in ``node.meta["sharding"]``.

A ``call_module`` node that owns parameters carries one ``ShardingRecord``:
its style, a partition spec per parameter over named mesh axes, and the rule
that chose it. ``gm.meta["sharding"]`` carries the model-wide ``ModelSharding``
(mesh shape, tensor-parallel axis). Nothing else in the graph holds sharding
state, so passes, materialization and the report all read from here.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import fx

from fx_shard.axes import Axis, Spec
from fx_shard.styles import Replicate

__all__ = [
    "SHARDING_KEY",
    "Layout",
    "SourceKind",
    "ModelSharding",
    "PassDiff",
    "ShardingRecord",
    "layer_parameters",
    "model_sharding",
    "narrowed",
    "recorded_layers",
    "sharding_of",
    "transformed",
]

SHARDING_KEY = "sharding"

class SourceKind(enum.Enum):
    """Which plan source decided a layer (precedence in ``fx_shard.plan``)."""

    PLAN_ENTRY = "plan entry"
    CLASS_RULE = "class rule"
    MODEL_PLAN = "model plan"
    INFERRED = "inferred"
    DEFAULT = "default"
    #: A part of a fused layer that was split; its source text names the fused layer's.
    FUSED_PART = "fused part"


class Layout(enum.Enum):
    """How a fused layer's rows are kept on the devices.

    ``SPLIT``: split into one linear per part (``SplitFusedLinear``), each
    part column-parallel. ``INTERLEAVED``: kept one matmul, rows reordered so
    each device's block holds its share of every part. ``GROUPED``: kept one
    matmul as the model lays it out, q/k/v per KV group, whole groups per
    device. Unfused layers are ``SPLIT`` (nothing to keep fused).
    """

    SPLIT = "split"
    INTERLEAVED = "interleaved"
    GROUPED = "grouped"


@dataclass(frozen=True)
class ShardingRecord:
    """How one layer is sharded.

    ``style`` names a style of ``fx_shard.styles``. ``specs`` maps a
    parameter name of the module (``"weight"``, ``"bias"``) to its partition
    spec; a parameter absent from it is replicated. ``source`` says in words
    which rule chose the style, ``source_kind`` which kind of rule.
    ``output_sizes`` is the fused layout of a fused style; ``part_of`` names
    the fused module a split part came from; ``notes`` are what passes want
    the report to say about this layer; ``output_spec``, when set, pins the
    sharding of the layer's output (trailing dims; ``()`` replicated).
    ``layout`` says how a fused layer's rows are kept (``Layout``); ``groups``
    > 1 says the fused rows repeat ``[part_0 | part_1 | ...]`` once per
    group, each part's rows split evenly (q/k/v per KV group).
    """

    style: str
    specs: Mapping[str, Spec]
    source: str
    output_sizes: tuple[int, ...] = ()
    part_of: str | None = None
    notes: tuple[str, ...] = ()
    output_spec: Spec | None = None
    layout: Layout = Layout.SPLIT
    groups: int = 1
    source_kind: SourceKind = SourceKind.DEFAULT

    @property
    def kept_fused(self) -> bool:
        """Whether a fused layer stays one matmul (interleaved or grouped) rather than being split."""
        return self.layout is not Layout.SPLIT


@dataclass(frozen=True)
class PassDiff:
    """What one pass changed in one graph: nodes added, removed, and rewritten (before, after)."""

    pass_name: str
    part: str
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    rewritten: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ModelSharding:
    """Model-wide facts: the mesh, the tensor-parallel axis (or axes), the passes run, every layer's record.

    ``layers`` is the one place every layer's final record is read from after
    the pipeline (materialize, checkpoints, the report): layers in graphs in
    graph order (their nodes carry the same records, for the passes), then
    the layers planned as modules outside any graph, whose paths are in
    ``outside``. ``opaque`` names the modules that did not trace, with the
    reason; ``diff`` has what each pass changed in each graph (the raw
    material of the report's graph diff); ``plan`` and ``fused`` say what was
    asked for, so a second ``transform`` can tell whether it asks for the same.
    ``notes`` say which of the model's own code fx_shard kept where it could
    not be sure a replacement computes the same (e.g. a Hugging Face model's
    attention), and why.

    On a mesh with an ``fsdp`` axis (``fx_shard.fsdp``), the records in
    ``layers`` shard every parameter over ``fsdp`` too, and ``unplanned``
    holds the specs of parameters in no layer (by name in the root); the
    records on graph nodes keep the tensor-parallel specs the passes used.
    """

    mesh_shape: Mapping[str, int]
    tp_axis: Axis
    passes: tuple[str, ...] = field(default=())
    layers: Mapping[str, ShardingRecord] = field(default_factory=dict)
    opaque: Mapping[str, str] = field(default_factory=dict)
    diff: tuple[PassDiff, ...] = ()
    outside: frozenset[str] = frozenset()
    notes: tuple[str, ...] = ()
    #: The plan the model was transformed with (``ShardPlan.to_dict()``), and the fused-layer strategy.
    plan: Mapping | None = None
    fused: str = "split"
    #: Specs of parameters in no layer, by name in the root: only on an fsdp mesh (``fx_shard.fsdp``).
    unplanned: Mapping[str, Spec] = field(default_factory=dict)


def sharding_of(node: fx.Node) -> ShardingRecord | None:
    """The record of ``node``, or None."""
    return node.meta.get(SHARDING_KEY)


def narrowed(record: ShardingRecord, axes: tuple[str, ...], note: str, **changes) -> ShardingRecord:
    """``record`` sharded over ``axes`` instead (replicated when empty), with ``note`` added."""
    if not axes:
        return replace(record, style=Replicate.name, specs={}, notes=(*record.notes, note), **changes)
    axis = axes[0] if len(axes) == 1 else axes
    specs = {name: tuple(axis if a is not None else None for a in spec) for name, spec in record.specs.items()}
    return replace(record, specs=specs, notes=(*record.notes, note), **changes)


def model_sharding(root: torch.nn.Module) -> ModelSharding:
    """The ``ModelSharding`` fx_shard left on a rewritten model (``root.meta["sharding"]``)."""
    return root.meta[SHARDING_KEY]


def transformed(root: torch.nn.Module) -> ModelSharding | None:
    """The ``ModelSharding`` of a model fx_shard rewrote (``transform`` / ``shard``), or None for any other module."""
    meta = getattr(root, "meta", None)
    summary = meta.get(SHARDING_KEY) if isinstance(meta, Mapping) else None
    return summary if isinstance(summary, ModelSharding) else None


def recorded_layers(gm: fx.GraphModule) -> Iterator[tuple[str, ShardingRecord]]:
    """``(module target, record)`` of every layer call in ``gm``, in graph order.

    A layer is a ``call_module`` node with a record, or, for a layer whose
    matmul the graph computes itself (``FuseSiblingLinears``), the
    ``get_attr`` node of its weight, which then holds the record.
    """
    for node in gm.graph.nodes:
        record = sharding_of(node)
        if record is not None and node.op == "call_module":
            yield node.target, record
        elif record is not None and node.op == "get_attr":
            yield node.target.rpartition(".")[0], record


def layer_parameters(root: torch.nn.Module) -> Iterator[tuple[str, ShardingRecord, str, torch.nn.Parameter]]:
    """``(module path, record, parameter name, parameter)`` for every parameter of every recorded layer.

    In the order of ``ModelSharding.layers``: layers in graphs in graph
    order, then the layers planned as modules.
    """
    for path, record in model_sharding(root).layers.items():
        for name, param in root.get_submodule(path).named_parameters(recurse=False):
            yield path, record, name, param
