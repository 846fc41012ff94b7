"""FitHeadsToMesh: never split an attention head across devices."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fx_shard.errors import PlanError
from fx_shard.layers import out_features
from fx_shard.passes.utils import result
from fx_shard.sharding import SHARDING_KEY, ShardingRecord, axis_names, fitting_axes, narrowed, sharding_of

__all__ = ["FitHeadsToMesh", "fit_to_heads", "head_dim_of"]

_RESHAPE = ("view", "reshape")
_SEARCH_DEPTH = 4


class FitHeadsToMesh(PassBase):
    """Shard a column-parallel projection over only as many devices as its heads divide.

    With grouped-query attention there are often fewer KV heads than devices
    (2 KV heads, 8 devices); sharding k/v features 8 ways cuts heads apart and
    XLA moves data to put them back. On a mesh ``("kv", "tp")`` k/v shard over
    ``kv`` alone, which matches the q heads each device holds; on a 1-D mesh
    they are replicated. Either way attention needs no collective (measured,
    docs/collectives.md). Heads are found from the reshape
    ``(..., heads or -1, head_dim)`` downstream of the projection.

    Reads: ``node.meta["sharding"]`` of colwise layers. Writes: those records.
    """

    def __init__(self, mesh_shape: Mapping[str, int]) -> None:
        super().__init__()
        self.mesh_shape = mesh_shape

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        for node in graph_module.graph.find_nodes(op="call_module"):
            record = sharding_of(node)
            if record is None or record.style != "colwise":
                continue
            features = out_features(graph_module.get_submodule(node.target))
            fitted = fit_to_heads(node.target, record, features, head_dim_of(node, features), self.mesh_shape)
            if fitted is not None:
                node.meta[SHARDING_KEY] = fitted
                modified = True
        return result(graph_module, modified)


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
    ways = lambda names: math.prod(mesh_shape[a] for a in names)  # noqa: E731
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
    return narrowed(record, fitting, f"{what}: sharded over {fitting} ({ways(fitting)}) only, so attention needs no collective")


def head_dim_of(node: fx.Node, features: int) -> int | None:
    """The head size of a projection's output: the last dim of a ``(..., heads | -1, head_dim)`` reshape near it."""
    frontier = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0] or [node]
    for _ in range(_SEARCH_DEPTH):
        following = []
        for value in frontier:
            for user in value.users:
                if user.op == "call_method" and user.target in _RESHAPE and user.args[0] is value:
                    shape = user.args[1] if len(user.args) == 2 and isinstance(user.args[1], (list, tuple)) else user.args[1:]
                    head_dim, heads = shape[-1], shape[-2] if len(shape) >= 2 else None
                    if isinstance(head_dim, int) and head_dim > 0 and features % head_dim == 0 and (
                        heads == -1 or heads == features // head_dim
                    ):
                        return head_dim
                following.append(user)
        frontier = following
    return None
