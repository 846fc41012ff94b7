"""AnnotateSharding: write each layer's resolved ShardingRecord onto its node."""

from __future__ import annotations

from collections.abc import Mapping

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fx_shard.passes.utils import records_result
from fx_shard.sharding import SHARDING_KEY, ShardingRecord

__all__ = ["AnnotateSharding"]


class AnnotateSharding(PassBase):
    """Set ``node.meta["sharding"]`` on every ``call_module`` node the plan resolved.

    Reads: ``records`` (module path -> record, from ``ShardPlan.resolve``).
    Writes: node metadata only; the graph's code does not change.
    """

    def __init__(self, records: Mapping[str, ShardingRecord]) -> None:
        super().__init__()
        self.records = records

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        for node in graph_module.graph.find_nodes(op="call_module"):
            record = self.records.get(node.target)
            if record is not None and node.meta.get(SHARDING_KEY) != record:
                node.meta[SHARDING_KEY] = record
                modified = True
        return records_result(graph_module, modified)
