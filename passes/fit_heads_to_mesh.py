"""FitHeadsToMesh: never split an attention head across devices."""

from __future__ import annotations

import operator
from collections.abc import Mapping

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fx_shard.errors import PlanError
from fx_shard.layers import out_features
from fx_shard.passes.utils import MeshPass, result, update_records
from fx_shard.sharding import ShardingRecord, axis_names, axis_size, fitting_axes, narrowed

__all__ = ["FitHeadsToMesh", "fit_to_heads", "head_dim_of"]

_RESHAPE = ("view", "reshape")
_SEARCH_DEPTH = 4


class FitHeadsToMesh(MeshPass):
    """Shard a column-parallel projection over only as many devices as its heads divide.

    With grouped-query attention there are often fewer KV heads than devices
    (2 KV heads, 8 devices); sharding k/v features 8 ways cuts heads apart and
    XLA moves data to put them back. On a mesh ``("kv", "tp")`` k/v shard over
    ``kv`` alone, which matches the q heads each device holds; on a 1-D mesh
    over the sub-axis ``"tp:2"`` (2 blocks of consecutive devices), the same
    layout; heads that share no factor with the mesh are replicated. Either
    way attention needs no collective (measured, docs/collectives.md). Heads
    are found from the reshape ``(..., heads | -1, head_dim)`` or
    ``(..., KV, G, head_dim)`` downstream of the projection.

    Reads: ``node.meta["sharding"]`` of colwise layers. Writes: those records.
    """

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        def fit(node: fx.Node, record: ShardingRecord) -> ShardingRecord | None:
            if record.style != "colwise":
                return None
            features = out_features(graph_module.get_submodule(node.target))
            return fit_to_heads(node.target, record, features, head_dim_of(node, features), self.mesh_shape)

        return result(graph_module, update_records(graph_module, fit))


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
    if record.style != "colwise" or head_dim is None or (features // head_dim) % ways(axes) == 0:
        return None
    heads = features // head_dim
    if heads > ways(axes) and record.source.startswith("plan entry"):
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
