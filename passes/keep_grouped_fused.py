"""KeepGroupedFused: a fused QKV laid out per KV group is kept whole where whole groups fit the mesh, else split by group."""

from __future__ import annotations

import math
import operator
from dataclasses import replace

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fx_shard.axes import axis_names, fitting_axes
from fx_shard.geometry import output_dim
from fx_shard.passes.utils import MeshPass, records_result, update_records
from fx_shard.patterns import RESHAPE, op_of, shape_args, static_int
from fx_shard.sharding import Layout, ShardingRecord, narrowed
from fx_shard.styles import QKV

__all__ = ["KeepGroupedFused"]


class KeepGroupedFused(MeshPass):
    """Recognise a fused QKV whose rows are ``[q_g k_g v_g]`` per KV group, and keep it fused.

    Some models (Falcon, ChatGLM, Megatron checkpoints) lay q, k and v out
    group by group and read them with ``view(..., KV, G + 2, head_dim)``.
    Sharding those rows in contiguous blocks gives each device whole groups
    when the mesh divides ``KV``: no split, no concatenation, no collective.
    With fewer groups than devices (on any of the layer's mesh axes) the record asks ``SplitFusedLinear`` to
    gather q, k and v from every group (``groups``), so q shards by heads and
    k/v by group (``FitHeadsToMesh``); ``RewireFusedConsumers`` reads the
    parts where the code read the group view.

    Reads: qkv records and the reshape after the layer. Writes: those records.
    """

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        def regroup(node: fx.Node, record: ShardingRecord) -> ShardingRecord | None:
            groups = _kv_groups(node, record.output_sizes) if record.style == QKV.name and record.layout is Layout.SPLIT and record.groups == 1 else None
            if groups is None:
                return None
            axes = axis_names(record.specs["weight"][output_dim(graph_module.get_submodule(node.target))])
            if fitting_axes(axes, groups, self.mesh_shape, partial=False) == axes:
                note = f"q/k/v laid out per KV group ({groups} groups): kept fused, whole groups sharded over {axes}"
                return narrowed(record, axes, note, layout=Layout.GROUPED)
            note = (f"q/k/v laid out per KV group: {groups} groups do not split over {axes}; "
                    "split into q, k, v gathered from every group")
            return replace(record, groups=groups, notes=(*record.notes, note))

        return records_result(graph_module, update_records(graph_module, regroup))


def _kv_groups(node: fx.Node, sizes: tuple[int, ...]) -> int | None:
    """KV when the output is reshaped to ``(..., KV, G + 2, head_dim)`` matching ``sizes`` = [KV·G·hd, KV·hd, KV·hd]."""
    output = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), node)
    total = sum(sizes)
    for user in output.users:
        if op_of(user) not in RESHAPE or user.args[0] is not output:
            continue
        tail = [static_int(v, {output: total}) for v in shape_args(user)][-3:]
        if len(tail) < 3 or None in tail[1:] or tail[2] <= 0 or tail[1] <= 0:
            continue
        groups, per_group, head_dim = tail
        groups = total // (per_group * head_dim) if groups == -1 else groups
        if groups * per_group * head_dim == total and sizes[1] == sizes[2] == groups * head_dim and per_group > 2:
            return groups if math.prod((groups, per_group - 2, head_dim)) == sizes[0] else None
    return None
