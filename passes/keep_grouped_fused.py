"""KeepGroupedFused: a fused QKV laid out per KV group is already sharded right; keep it whole."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fx_shard.layers import output_dim
from fx_shard.patterns import RESHAPE, op_of, shape_args, static_int
from fx_shard.passes.utils import result
from fx_shard.sharding import SHARDING_KEY, axis_names, fitting_axes, narrowed, sharding_of

__all__ = ["KeepGroupedFused"]


class KeepGroupedFused(PassBase):
    """Recognise a fused QKV whose rows are ``[q_g k_g v_g]`` per KV group, and keep it fused.

    Some models (Falcon, ChatGLM, Megatron checkpoints) lay q, k and v out
    group by group and read them with ``view(..., KV, G + 2, head_dim)``.
    Sharding those rows in contiguous blocks gives each device whole groups
    when the mesh divides ``KV``: no split, no concatenation, no collective.
    Splitting by ``[q | k | v]`` sizes would be wrong-headed here (still
    correct, but every part would cross groups). When the mesh does not
    divide ``KV`` the layer is replicated, with the reason.

    Reads: qkv records and the reshape after the layer. Writes: those records.
    """

    def __init__(self, mesh_shape: Mapping[str, int]) -> None:
        super().__init__()
        self.mesh_shape = mesh_shape

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        for node in graph_module.graph.find_nodes(op="call_module"):
            record = sharding_of(node)
            if record is None or record.style != "qkv" or record.interleaved:
                continue
            module = graph_module.get_submodule(node.target)
            groups = _kv_groups(node, record.output_sizes)
            if groups is None:
                continue
            axes = axis_names(record.specs["weight"][output_dim(module)])
            fitting = fitting_axes(axes, groups, self.mesh_shape)
            if fitting:
                note = f"q/k/v laid out per KV group ({groups} groups): kept fused, whole groups sharded over {fitting}"
                node.meta[SHARDING_KEY] = narrowed(record, fitting, note, interleaved=True)
            else:
                note = (f"q/k/v laid out per KV group: {groups} groups do not split over {axes}, replicated "
                        "(a mesh with a kv axis, make_mesh(kv=...), keeps them sharded)")
                node.meta[SHARDING_KEY] = narrowed(record, (), note)
            modified = True
        return result(graph_module, modified)


def _kv_groups(node: fx.Node, sizes: tuple[int, ...]) -> int | None:
    """KV when the output is reshaped to ``(..., KV, G + 2, head_dim)`` matching ``sizes`` = [KV·G·hd, KV·hd, KV·hd]."""
    output = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), node)
    total = sum(sizes)
    for user in output.users:
        if op_of(user) not in RESHAPE or user.args[0] is not output:
            continue
        tail = [static_int(v, {output: total}) for v in shape_args(user)][-3:]
        if len(tail) < 3 or None in tail:
            continue
        groups, per_group, head_dim = tail
        if groups * per_group * head_dim == total and sizes[1] == sizes[2] == groups * head_dim and per_group > 2:
            return groups if math.prod((groups, per_group - 2, head_dim)) == sizes[0] else None
    return None
