"""FitHeadsToMesh: never split an attention head across devices."""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fx_shard.geometry import out_features
from fx_shard.heads import fit_to_heads, head_dim_of
from fx_shard.passes.utils import MeshPass, records_result, update_records
from fx_shard.sharding import ShardingRecord
from fx_shard.styles import Colwise

__all__ = ["FitHeadsToMesh"]


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
            if record.style != Colwise.name:
                return None
            features = out_features(graph_module.get_submodule(node.target))
            return fit_to_heads(node.target, record, features, head_dim_of(node, features), self.mesh_shape)

        return records_result(graph_module, update_records(graph_module, fit))
