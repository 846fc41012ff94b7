"""SplitFusedLinear: one linear per part of a fused QKV or gate_up layer."""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fx_shard import styles
from fx_shard.fused import join_parts
from fx_shard.passes.utils import provenance, result, set_submodule, shape_meta
from fx_shard.sharding import SHARDING_KEY, ShardingRecord, SourceKind, sharding_of
from fx_shard.split_linear import SplitLinear
from fx_shard.styles import Colwise

__all__ = ["SplitFusedLinear", "part_names"]


def part_names(record: ShardingRecord) -> tuple[str, ...]:
    """Submodule names of a fused layer's parts, as its style names them (q, k, v, or 0, 1, ...)."""
    return styles.get(record.style).part_names(len(record.output_sizes))


def _is_fused(node: fx.Node) -> bool:
    record = sharding_of(node)
    return node.op == "call_module" and record is not None and styles.get(record.style).fused and not record.kept_fused


class SplitFusedLinear(PassBase):
    """Replace each fused layer's ``call_module`` node by one node per part plus a ``cat`` (or ``join_parts``).

    The fused module becomes a ``SplitLinear`` (same ``state_dict`` keys); each
    part is column-parallel on its own, so every device holds its share of q,
    k and v rather than a contiguous slice of ``[q | k | v]``. The ``cat``
    keeps the graph's function; a later pass rewires consumers past it.
    Layers returning ``(output, bias)`` keep doing so for their ``getitem`` users.

    Reads: ``node.meta["sharding"]`` of style qkv / merged_colwise.
    Writes: submodules, graph nodes, the parts' ``node.meta["sharding"]``.
    """

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        fused_nodes = [n for n in graph.nodes if _is_fused(n)]
        split_modules: dict[str, SplitLinear] = {}
        for node in fused_nodes:
            record = sharding_of(node)
            names = part_names(record)
            if node.target not in split_modules:
                fused = graph_module.get_submodule(node.target)
                split_modules[node.target] = SplitLinear.from_fused(fused, names, record.output_sizes, record.groups)
                set_submodule(graph_module, node.target, split_modules[node.target])
            self._rewrite(graph, node, names, split_modules[node.target])
        return result(graph_module, bool(fused_nodes))

    def _rewrite(self, graph: fx.Graph, node: fx.Node, names: tuple[str, ...], split: SplitLinear) -> None:
        record = sharding_of(node)
        inherited = provenance(node)
        created: list[fx.Node] = []
        with graph.inserting_before(node):
            parts = []
            for name in names:
                part = graph.call_module(f"{node.target}.{name}", node.args, node.kwargs)
                part.meta.update(inherited)
                part.meta[SHARDING_KEY] = dataclasses.replace(
                    record, style=Colwise.name, output_sizes=(), part_of=node.target, groups=1,
                    source=f"{record.style} part {name!r} ({record.source})", source_kind=SourceKind.FUSED_PART,
                )
                parts.append(part)
            if split.return_bias:
                outputs = [graph.call_function(operator.getitem, (p, 0)) for p in parts]
                biases = [graph.call_function(operator.getitem, (p, 1)) for p in parts]
                joined = (
                    _join(graph, outputs, inherited, split.groups),
                    _join(graph, biases, inherited, split.groups) if split.skip_bias_add else None,
                )
                created += outputs + biases + [j for j in joined if j is not None]
            else:
                joined = _join(graph, parts, inherited, split.groups)
        if isinstance(joined, tuple):
            _replace_tuple_uses(graph, node, joined)
        else:
            joined.meta.update(shape_meta(node))
            node.replace_all_uses_with(joined)
        graph.erase_node(node)
        for unused in reversed(created):
            if not unused.users:
                graph.erase_node(unused)


def _join(graph: fx.Graph, nodes: list[fx.Node], meta: dict, groups: int) -> fx.Node:
    """``torch.cat`` of the parts, or ``join_parts`` when the fused layout repeats per group."""
    join = graph.call_function(torch.cat, (nodes, -1)) if groups == 1 else graph.call_function(join_parts, (nodes, groups))
    join.meta.update(meta)
    return join


def _replace_tuple_uses(graph: fx.Graph, node: fx.Node, joined: tuple[fx.Node, fx.Node | None]) -> None:
    """Point each ``node[i]`` user at ``joined[i]``; other users get a rebuilt tuple."""
    for user in list(node.users):
        if user.target is operator.getitem and isinstance(user.args[1], int):
            replacement = joined[user.args[1]]
            if replacement is not None:
                replacement.meta.update(shape_meta(user))
            for consumer in list(user.users):
                consumer.args = fx.map_arg(consumer.args, lambda n: replacement if n is user else n)
                consumer.kwargs = fx.map_arg(consumer.kwargs, lambda n: replacement if n is user else n)
            graph.erase_node(user)
        else:
            with graph.inserting_before(user):
                rebuilt = graph.call_function(_pair, joined)
            user.replace_input_with(node, rebuilt)


def _pair(output: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    return output, bias
