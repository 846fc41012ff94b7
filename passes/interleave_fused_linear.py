"""InterleaveFusedLinear: keep a fused QKV or gate_up one matmul, its rows ordered per device."""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fx_shard import styles
from fx_shard.axes import axis_size
from fx_shard.fused import interleave_rows
from fx_shard.geometry import output_dim
from fx_shard.ops import fused_part
from fx_shard.passes.utils import MeshPass, provenance, result, shape_meta
from fx_shard.sharding import SHARDING_KEY, Layout, sharding_of

__all__ = ["InterleaveFusedLinear"]


class InterleaveFusedLinear(MeshPass):
    """The other way to shard a fused layer: one matmul, rows reordered, instead of one linear per part.

    Rows become ``[Q_0 K_0 V_0 | Q_1 K_1 V_1 | ...]`` so that sharding the
    fused weight on its output features gives device ``d`` exactly its share
    of q, k and v. Each part is read back with ``fx_shard.ops.fused_part``
    (local view, slice, flatten) and the parts joined by a ``cat``, which
    ``RewireFusedConsumers`` then removes as it does after a split. Layers it
    cannot serve (grouped-query sizes whose heads it cannot see, bias tuples
    from ``skip_bias_add``) are left for ``SplitFusedLinear``.

    Reads: ``node.meta["sharding"]`` of style qkv / merged_colwise.
    Writes: the fused modules' parameters (reordered; ``state_dict`` keeps
    the original order), graph nodes, the records (``layout``).
    """

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        modified = False
        done: set[str] = set()
        for node in list(graph.find_nodes(op="call_module")):
            record = sharding_of(node)
            if record is None or not styles.get(record.style).fused or record.kept_fused or record.groups > 1:
                continue
            module = graph_module.get_submodule(node.target)
            ways = axis_size(self.mesh_shape, record.specs["weight"][output_dim(module)])
            output = _tensor_output(node, module)
            if output is None or not _whole_heads(module, record.output_sizes, ways):
                continue
            if node.target not in done:
                interleave_rows(module, record.output_sizes, ways)
                done.add(node.target)
            with graph.inserting_before(output.next):
                parts = [graph.call_function(fused_part, (output, i, record.output_sizes, ways)) for i in range(len(record.output_sizes))]
                joined = graph.call_function(torch.cat, (parts, -1))
            for new in (*parts, joined):
                new.meta.update(provenance(output))
            joined.meta.update(shape_meta(output))
            output.replace_all_uses_with(joined, delete_user_cb=lambda user: user not in parts)
            node.meta[SHARDING_KEY] = dataclasses.replace(
                record, layout=Layout.INTERLEAVED, notes=(*record.notes, f"kept fused: rows interleaved for {ways} devices"),
            )
            modified = True
        return result(graph_module, modified)


def _tensor_output(node: fx.Node, module) -> fx.Node | None:
    """The node carrying the layer's output tensor, unless the layer also returns a bias to add."""
    if not getattr(module, "return_bias", False):
        return node
    if getattr(module, "skip_bias_add", False):
        return None
    return next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), None)


def _whole_heads(module, sizes: tuple[int, ...], ways: int) -> bool:
    """Every part splits ``ways`` ways without cutting a head (unequal parts need the layer's head size)."""
    if any(s % ways for s in sizes):
        return False
    if len(set(sizes)) == 1:
        return True
    head = getattr(module, "head_size", None)
    return head is not None and all((s // head) % ways == 0 for s in sizes)
