"""The sharding record fx_shard keeps in ``node.meta["sharding"]``.

A ``call_module`` node that owns parameters carries one ``ShardingRecord``:
its style, a partition spec per parameter over named mesh axes, and the rule
that chose it. ``gm.meta["sharding"]`` carries the model-wide ``ModelSharding``
(mesh shape, tensor-parallel axis). Nothing else in the graph holds sharding
state, so passes, materialization and the report all read from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import fx

__all__ = [
    "SHARDING_KEY",
    "Axis",
    "axis_names",
    "axis_size",
    "fitting_axes",
    "ModelSharding",
    "PassDiff",
    "ShardingRecord",
    "Spec",
    "layer_parameters",
    "local_shape",
    "model_sharding",
    "narrowed",
    "recorded_layers",
    "sharding_of",
    "split_sub_axis",
    "sub_axis",
]

SHARDING_KEY = "sharding"

# Where one tensor dimension is split: a mesh axis name, several (major first), or None.
# A name may be a sub-axis, ``"tp:2"`` (see ``sub_axis``).
Axis = str | tuple[str, ...]
# A partition spec: one entry per tensor dimension.
Spec = tuple[Axis | None, ...]


@dataclass(frozen=True)
class ShardingRecord:
    """How one layer is sharded.

    ``specs`` maps a parameter name of the module (``"weight"``, ``"bias"``)
    to its partition spec; a parameter absent from it is replicated.
    ``output_sizes`` is the fused layout for ``qkv`` / ``merged_colwise``;
    ``part_of`` names the fused module a split part came from; ``notes`` are
    what passes want the report to say about this layer; ``output_spec``, when
    set, pins the sharding of the layer's output (trailing dims; ``()``
    replicated). ``interleaved`` marks a fused layer kept fused, its rows
    reordered so each device's block holds its own share of every part.
    ``groups`` > 1 says the fused rows repeat ``[part_0 | part_1 | ...]``
    once per group, each part's rows split evenly (q/k/v per KV group).
    """

    style: str
    specs: Mapping[str, Spec]
    source: str
    output_sizes: tuple[int, ...] = ()
    part_of: str | None = None
    notes: tuple[str, ...] = ()
    output_spec: Spec | None = None
    interleaved: bool = False
    groups: int = 1


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
    """Model-wide facts: the mesh, the tensor-parallel axis (or axes), the passes run.

    For a model captured part by part, ``layers`` holds the records of the
    linear-like layers outside any graph (planned as modules) and ``opaque``
    the modules that did not trace, with the reason. ``diff`` has what each
    pass changed in each graph (the raw material of the report's graph diff).
    """

    mesh_shape: Mapping[str, int]
    tp_axis: Axis
    passes: tuple[str, ...] = field(default=())
    layers: Mapping[str, ShardingRecord] = field(default_factory=dict)
    opaque: Mapping[str, str] = field(default_factory=dict)
    diff: tuple[PassDiff, ...] = ()


def sharding_of(node: fx.Node) -> ShardingRecord | None:
    """The record of ``node``, or None."""
    return node.meta.get(SHARDING_KEY)


def axis_names(axis: Axis | None) -> tuple[str, ...]:
    """The mesh axis names in a spec entry."""
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


def sub_axis(axis: str, ways: int) -> str:
    """The name of mesh axis ``axis`` taken as ``ways`` blocks of consecutive devices: ``"tp:2"``.

    A dimension sharded over it is split ``ways`` ways, each piece replicated
    on the devices of one block. With 2 KV heads on a 1-D mesh of 8, k/v over
    ``"tp:2"`` put each KV head on the 4 devices holding its q heads: the
    layout of a ``("kv", "tp")`` mesh without asking the user for one.
    """
    return f"{axis}:{ways}"


def split_sub_axis(name: str) -> tuple[str, int | None]:
    """``(axis, ways)`` of a sub-axis name, ``(name, None)`` for a whole axis."""
    axis, colon, ways = name.partition(":")
    return (axis, int(ways)) if colon else (name, None)


def axis_size(mesh_shape: Mapping[str, int], axis: Axis | None) -> int:
    """How many ways a spec entry splits a dimension."""
    return math.prod(split_sub_axis(a)[1] or mesh_shape[a] for a in axis_names(axis))


def fitting_axes(
    axes: tuple[str, ...], count: int, mesh_shape: Mapping[str, int], *, partial: bool = True
) -> tuple[str, ...]:
    """The most of ``axes`` (major first) whose devices divide ``count`` (heads, KV groups); ``()`` if none.

    The longest prefix of whole axes, then, when ``partial``, the next axis
    as a sub-axis of as many blocks as ``count`` still splits (``"tp:2"``
    for 2 KV heads on 8 devices): consecutive devices share a piece, which
    lines k/v up with the q heads sharded over all of ``axes``.
    """
    whole = max((axes[:i] for i in range(len(axes) + 1) if count % axis_size(mesh_shape, axes[:i] or None) == 0), key=len)
    if not partial or len(whole) == len(axes):
        return whole
    ways = math.gcd(count // axis_size(mesh_shape, whole or None), axis_size(mesh_shape, axes[len(whole)]))
    return (*whole, sub_axis(axes[len(whole)], ways)) if ways > 1 else whole


def narrowed(record: ShardingRecord, axes: tuple[str, ...], note: str, **changes) -> ShardingRecord:
    """``record`` sharded over ``axes`` instead (replicated when empty), with ``note`` added."""
    if not axes:
        return replace(record, style="replicate", specs={}, notes=(*record.notes, note), **changes)
    axis = axes[0] if len(axes) == 1 else axes
    specs = {name: tuple(axis if a is not None else None for a in spec) for name, spec in record.specs.items()}
    return replace(record, specs=specs, notes=(*record.notes, note), **changes)


def local_shape(shape: torch.Size | tuple[int, ...], spec: Spec | None, mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
    """Per-device shape of a tensor of ``shape`` sharded by ``spec`` (XLA pads uneven shards)."""
    if spec is None:
        return tuple(shape)
    return tuple(math.ceil(size / axis_size(mesh_shape, axis)) for size, axis in zip(shape, spec))


def model_sharding(root: torch.nn.Module) -> ModelSharding:
    """The ``ModelSharding`` fx_shard left on a rewritten model (``root.meta["sharding"]``)."""
    return root.meta[SHARDING_KEY]


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

    Layers in graphs (the root, or parts of a model captured part by part)
    come in graph order, then the layers planned as modules.
    """
    for prefix, sub in root.named_modules():
        if isinstance(sub, fx.GraphModule):
            for target, record in recorded_layers(sub):
                path = f"{prefix}.{target}" if prefix else target
                for name, param in sub.get_submodule(target).named_parameters(recurse=False):
                    yield path, record, name, param
    for path, record in model_sharding(root).layers.items():
        for name, param in root.get_submodule(path).named_parameters(recurse=False):
            yield path, record, name, param
