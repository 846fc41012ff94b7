"""Mesh axes in partition specs: names, sub-axes (``"tp:2"``), sizes, and per-device shapes.

A spec names axes, never device ids. A sub-axis ``"tp:k"`` is axis ``tp``
taken as ``k`` blocks of consecutive devices (see ``sub_axis``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = [
    "DATA_AXES",
    "FSDP_AXIS",
    "Axis",
    "Spec",
    "axis_names",
    "axis_size",
    "fitting_axes",
    "local_shape",
    "spec_text",
    "split_sub_axis",
    "sub_axis",
]

# Where one tensor dimension is split: a mesh axis name, several (major first), or None.
# A name may be a sub-axis, ``"tp:2"`` (see ``sub_axis``).
Axis = str | tuple[str, ...]
# A partition spec: one entry per tensor dimension.
Spec = tuple[Axis | None, ...]

#: The mesh axes that split the batch (outer first, as ``make_mesh`` orders them); never a tensor-parallel axis.
DATA_AXES = ("dp", "fsdp")
#: The data axis over which parameters are sharded too (all-gathered where used), as torch_xla's FSDPv2 does.
FSDP_AXIS = "fsdp"


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


def local_shape(shape: torch.Size | tuple[int, ...], spec: Spec | None, mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
    """Per-device shape of a tensor of ``shape`` sharded by ``spec`` (XLA pads uneven shards)."""
    if spec is None:
        return tuple(shape)
    return tuple(math.ceil(size / axis_size(mesh_shape, axis)) for size, axis in zip(shape, spec))


def spec_text(spec: Spec) -> str:
    """A partition spec as ``(tp, -)``: the mesh axes of each dimension, ``-`` where it is whole."""
    return "(" + ", ".join("-" if a is None else a if isinstance(a, str) else "×".join(a) for a in spec) + ")"
