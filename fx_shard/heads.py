"""Attention heads in a column-parallel projection: find them, and shard only over devices that keep them whole.

Splitting a head across devices makes XLA move data to put it back; so a
projection's sharding is narrowed to the mesh axes its head count divides
(``fitting_axes``), or replicated. Used by the ``FitHeadsToMesh`` pass for
layers in graphs and by the pipeline for layers planned as modules.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping

from torch import fx

from fx_shard.axes import axis_names, axis_size, fitting_axes
from fx_shard.errors import PlanError
from fx_shard.sharding import ShardingRecord, SourceKind, narrowed
from fx_shard.styles import Colwise

__all__ = ["fit_to_heads", "head_dim_of"]

_RESHAPE = ("view", "reshape")
_SEARCH_DEPTH = 4


def fit_to_heads(
    where: str, record: ShardingRecord, features: int, head_dim: int | None, mesh_shape: Mapping[str, int]
) -> ShardingRecord | None:
    """A column-parallel record changed so that no head is split, or None when none is.

    The longest prefix of the record's mesh axes that divides the heads keeps
    sharding them; with none, the layer is replicated. More heads than
    devices that still do not divide is a plan mistake when an explicit plan
    entry chose the layer: an error naming ``where``.
    """
    axes = axis_names(record.specs["weight"][0] if record.specs["weight"][0] is not None else record.specs["weight"][1])
    ways = lambda names: axis_size(mesh_shape, names or None)  # noqa: E731
    if record.style != Colwise.name or head_dim is None or (features // head_dim) % ways(axes) == 0:
        return None
    heads = features // head_dim
    if heads > ways(axes) and record.source_kind is SourceKind.PLAN_ENTRY:
        divisors = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
        raise PlanError(
            f"heads ({heads}) are not divisible by mesh axes {axes} ({ways(axes)}) in {where} ({record.source}); "
            f"use a mesh axis of {divisors}, or replicate this layer in the plan"
        )
    fitting = fitting_axes(axes, heads, mesh_shape)
    what = f"{heads} heads (head_dim {head_dim}) do not divide mesh axes {axes} ({ways(axes)})"
    if not fitting:
        return narrowed(record, (), f"{what}: replicated, so attention needs no collective")
    blocks = ", blocks of consecutive devices sharing a piece" if ":" in fitting[-1] else ""
    return narrowed(record, fitting, f"{what}: sharded over {fitting} ({ways(fitting)}) only{blocks}, so attention needs no collective")


def head_dim_of(node: fx.Node, features: int) -> int | None:
    """The head size of a projection's output: the last dim of a ``(..., heads | -1, head_dim)`` reshape near it."""
    frontier = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0] or [node]
    for _ in range(_SEARCH_DEPTH):
        following = []
        for value in frontier:
            for user in value.users:
                if user.op == "call_method" and user.target in _RESHAPE and user.args[0] is value:
                    shape = user.args[1] if len(user.args) == 2 and isinstance(user.args[1], (list, tuple)) else user.args[1:]
                    if _splits_features(list(shape), features):
                        return shape[-1]
                following.append(user)
        frontier = following
    return None


def _splits_features(shape: list, features: int) -> bool:
    """Whether ``shape`` ends ``(..., heads | -1, head_dim)``, the heads possibly over several dims (KV, G)."""
    head_dim = shape[-1]
    if len(shape) < 2 or not isinstance(head_dim, int) or head_dim <= 0 or features % head_dim:
        return False
    if shape[-2] == -1:
        return True
    size = head_dim
    for dim in reversed(shape[:-1]):
        if not isinstance(dim, int) or dim <= 0:
            return False
        size *= dim
        if size == features:
            return True
    return False
