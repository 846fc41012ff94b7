"""RewireFusedConsumers: feed q, k, v (or gate, up) straight to the code that split them apart."""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fx_shard.fused import join_parts
from fx_shard.ops import fused_part
from fx_shard.passes.utils import erase_if_dead, provenance, result
from fx_shard.patterns import (
    ADD,
    CHUNK,
    RESHAPE,
    SPLIT,
    bias_added,
    op_of,
    parts_taken_apart,
    rank,
    reshape_parts_axis,
    shape_args,
    shape_of,
    split_sections,
    static_int,
)
from fx_shard.sharding import SHARDING_KEY, sharding_of
from fx_shard.split_linear import SplitLinear

__all__ = ["RewireFusedConsumers"]



class RewireFusedConsumers(PassBase):
    """Remove the ``cat`` that ``SplitFusedLinear`` left, by rewriting what consumed it.

    Under SPMD, concatenating the column-sharded q, k, v and splitting them
    again moves data between devices (all-gathers); feeding each part to its
    consumer keeps every device on its own heads. Recognised consumers:
    ``split`` / ``chunk`` along the features at the part boundaries, slices
    ``x[..., a:b]`` on part boundaries (``SiluAndMul``), and the heads
    reshape ``reshape(..., 3, H, hd)`` followed by ``permute`` and
    ``unbind`` / indexing (timm); for q/k/v laid out per KV group
    (``join_parts``), the group view ``view(..., KV, G + 2, head_dim)`` read
    by slices or a split along its group axis (Falcon). Any other consumer
    keeps the join (the function stays right) and the parts' records get a
    note the report shows.

    Reads: ``node.meta["sharding"]`` (``part_of``), ``tensor_meta`` when present.
    Writes: graph nodes; notes on the parts' records.
    """

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        modified = False
        joins = [n for n in graph.nodes if n.op == "call_function" and n.target in (torch.cat, join_parts)]
        for cat in joins:
            fused = _fused_join(graph_module, cat)
            if fused is None:
                continue
            parts, sizes, groups = fused
            for user in list(cat.users):
                if groups > 1:
                    rewired = op_of(user) in RESHAPE and _rewire_group_view(graph, user, cat, parts, sizes, groups)
                else:
                    rewire = _SPLITTERS.get(op_of(user))
                    rewired = rewire is not None and rewire(graph, user, cat, parts, sizes)
                modified |= rewired
            if not cat.users:
                erase_if_dead(graph, cat)
                continue
            kept = ", ".join(u.format_node() for u in cat.users)
            note = f"the concatenation of the parts stays: consumer not recognised ({kept})"
            for module_node in dict.fromkeys(map(_layer_node, parts)):
                record = sharding_of(module_node)
                if note not in record.notes:
                    module_node.meta[SHARDING_KEY] = dataclasses.replace(record, notes=(*record.notes, note))
                    modified = True
        return result(graph_module, modified)


def _layer_node(part: fx.Node) -> fx.Node:
    """The ``call_module`` node a part output comes from (through ``[0]`` and ``fused_part``)."""
    while part.op != "call_module":
        part = part.args[0]
    return part


def _fused_join(gm: fx.GraphModule, cat: fx.Node) -> tuple[list[fx.Node], list[int], int] | None:
    """The part outputs, sizes and groups if ``cat`` joins all parts of one split layer along the last dim."""
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    if cat.target is join_parts:
        dim, groups = (cat.args[2] if len(cat.args) > 2 else -1), cat.args[1]
    else:
        dim, groups = (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)), 1
    if not isinstance(tensors, (list, tuple)) or dim != -1:
        return None
    if all(t.op == "call_function" and t.target is fused_part for t in tensors):
        sources = {t.args[0] for t in tensors}
        sizes = list(tensors[0].args[2])
        in_order = len(sources) == 1 and [t.args[1] for t in tensors] == list(range(len(sizes)))
        return (list(tensors), sizes, groups) if in_order else None
    owners = []
    for t in tensors:
        module_node = t.args[0] if t.target is operator.getitem and t.args[1] == 0 else t
        record = sharding_of(module_node) if isinstance(module_node, fx.Node) else None
        if module_node.op != "call_module" or record is None or record.part_of is None:
            return None
        owners.append((record.part_of, module_node.target))
    split = gm.get_submodule(owners[0][0])
    expected = [f"{owners[0][0]}.{name}" for name in split.part_names] if isinstance(split, SplitLinear) else None
    if expected != [target for _, target in owners] or split.groups != groups:
        return None
    return list(tensors), list(split.output_sizes), groups


def _replace_indexed_users(graph: fx.Graph, node: fx.Node, by_index: list[fx.Node]) -> bool:
    """Point every ``node[i]`` at ``by_index[i]`` when all users of ``node`` are int indexing."""
    users = list(node.users)
    if not users or not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in users):
        return False
    for user in users:
        user.replace_all_uses_with(by_index[user.args[1]])
        graph.erase_node(user)
    erase_if_dead(graph, node)
    return True


def _rewire_split(graph: fx.Graph, user: fx.Node, cat: fx.Node, parts: list[fx.Node], sizes: list[int]) -> bool:
    """``split`` / ``chunk`` of ``cat`` at exactly the part boundaries."""
    return split_sections(user, cat, sum(sizes)) == sizes and _replace_indexed_users(graph, user, parts)


def _rewire_slice(graph: fx.Graph, user: fx.Node, cat: fx.Node, parts: list[fx.Node], sizes: list[int]) -> bool:
    """``cat[..., a:b]`` where ``[a, b)`` is exactly one part."""
    index = user.args[1]
    if user.args[0] is not cat or not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return False
    leading = index[:-1]
    dims = rank(cat)
    if leading != (Ellipsis,) and not (dims is not None and leading == (slice(None),) * (dims - 1)):
        return False
    total = sum(sizes)
    cut = index[-1]
    start = 0 if cut.start is None else static_int(cut.start, {cat: total})
    stop = total if cut.stop is None else static_int(cut.stop, {cat: total})
    if cut.step not in (None, 1) or start is None or stop is None:
        return False
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    for part, offset, size in zip(parts, offsets, sizes):
        if (start, stop) == (offset, offset + size):
            user.replace_all_uses_with(part)
            erase_if_dead(graph, user)
            return True
    return False


def _rewire_heads_reshape(graph: fx.Graph, user: fx.Node, cat: fx.Node, parts: list[fx.Node], sizes: list[int]) -> bool:
    """``cat.reshape(*lead, n, *tail)`` with ``prod(tail)`` one part, then ``permute`` and ``unbind`` / ``[i]``.

    Selecting ``i`` on the ``n`` axis equals ``part_i.reshape(*lead, *tail)``
    because the features are laid out ``[part_0 | part_1 | ...]``.
    """
    if user.args[0] is not cat or len(set(sizes)) != 1:
        return False
    shape = shape_args(user)
    axis = reshape_parts_axis(user, cat, sum(sizes), len(sizes), sizes[0])
    if axis is None:
        return False
    taken = parts_taken_apart(user, axis)
    if taken is None:
        return False
    nxt, indexed = taken
    perm = [p % len(shape) for p in shape_args(nxt)] if nxt is not None else None
    new_shape = shape[:axis] + shape[axis + 1:]
    kept_perm = [p - (p > axis) for p in perm[1:]] if perm is not None else None
    replacements = []
    with graph.inserting_before(user):
        for part in parts:
            node = graph.call_method(user.target if user.op == "call_method" else "reshape", (part, *new_shape))
            node.meta.update(provenance(user))
            if kept_perm is not None:
                node = graph.call_method("permute", (node, *kept_perm))
                node.meta.update(provenance(nxt))
            replacements.append(node)
    return _replace_indexed_users(graph, indexed, replacements)


def _rewire_group_view(
    graph: fx.Graph, view: fx.Node, join: fx.Node, parts: list[fx.Node], sizes: list[int], groups: int
) -> bool:
    """``join.view(*lead, KV, n_q + n_k + n_v, hd)`` read part by part on its second-to-last axis.

    With ``KV == groups``, rows ``[a, b)`` of that axis covering part ``i``
    are ``part_i.view(*lead, KV, n_i, hd)``: the part holds the same rows,
    gathered from every group. Users taking one part by a slice, a one-item
    list, an int (axis dropped), or a ``split`` at the part boundaries read
    the part instead; others keep reading the view.
    """
    shape = shape_args(view)
    total = sum(sizes)
    tail = [static_int(v, {join: total}) for v in shape[-3:]]
    if view.args[0] is not join or len(tail) < 3 or None in tail[1:] or tail[1] <= 0 or tail[2] <= 0:
        return False
    kv, per_group, head_dim = tail
    if (kv if kv != -1 else total // (per_group * head_dim)) != groups or groups * per_group * head_dim != total:
        return False
    if any(s % (groups * head_dim) for s in sizes):
        return False
    counts = [s // (groups * head_dim) for s in sizes]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    lead, axis = shape[:-3], len(shape) - 2
    made: dict[tuple[int, bool], fx.Node] = {}

    def part_view(i: int, keep_axis: bool) -> fx.Node:
        if (i, keep_axis) not in made:
            with graph.inserting_before(view):
                tail = (groups, counts[i], head_dim) if keep_axis else (groups, head_dim)
                made[i, keep_axis] = graph.call_method(view.target if view.op == "call_method" else "reshape", (parts[i], *lead, *tail))
                made[i, keep_axis].meta.update(provenance(view))
        return made[i, keep_axis]

    def part_of(selector) -> tuple[int, bool] | None:
        """The part a selector on the group axis picks, and whether the axis stays."""
        if isinstance(selector, list) and len(selector) == 1 and isinstance(selector[0], int):
            selector = slice(selector[0] % per_group, selector[0] % per_group + 1)
        if isinstance(selector, int):
            i = next((i for i, s in enumerate(starts) if s == selector % per_group and counts[i] == 1), None)
            return None if i is None else (i, False)
        if isinstance(selector, slice) and selector.step in (None, 1):
            span = tuple(range(per_group)[selector])
            i = next((i for i, s in enumerate(starts) if span == tuple(range(s, s + counts[i]))), None)
            return None if i is None else (i, True)
        return None

    rewired = False
    for user in list(view.users):
        if user.target is operator.getitem and user.args[0] is view and isinstance(user.args[1], tuple):
            index = user.args[1]
            if index and index[0] is Ellipsis:
                index = (slice(None),) * (axis - len(index) + 2) + index[1:]
            if len(index) < axis + 1 or any(s != slice(None) for i, s in enumerate(index) if i != axis):
                continue
            picked = part_of(index[axis])
            if picked is not None:
                user.replace_all_uses_with(part_view(*picked))
                graph.erase_node(user)
                rewired = True
        elif split_sections(user, view, per_group, axis=(axis, -2)) == counts:
            rewired |= _replace_indexed_users(graph, user, [part_view(i, True) for i in range(len(parts))])
    erase_if_dead(graph, view)
    return rewired


def _rewire_bias_add(graph: fx.Graph, user: fx.Node, cat: fx.Node, parts: list[fx.Node], sizes: list[int]) -> bool:
    """``cat + b`` for a bias ``b`` over all the features, then a recognised split: each part adds its slice of ``b``.

    timm BEiT adds a bias joined from separate q and v biases to its qkv output before the heads reshape.
    """
    bias = bias_added(user, cat, sum(sizes))
    if bias is None:
        return False
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    joined = _joined_pieces(bias, sizes)  # a bias joined from one piece per part: each part adds its own piece
    with graph.inserting_before(user):
        biased = []
        for i, (part, offset, size) in enumerate(zip(parts, offsets, sizes)):
            if joined is not None:
                piece = joined[i]
            else:
                piece = graph.call_function(operator.getitem, (bias, slice(offset, offset + size)))
                piece.meta.update(provenance(user))
            biased.append(graph.call_function(torch.add, (part, piece)))
            biased[-1].meta.update(provenance(user))
    rewired = False
    for consumer in list(user.users):
        rewire = _SPLITTERS.get(op_of(consumer))
        rewired |= rewire is not _rewire_bias_add and rewire is not None and rewire(graph, consumer, user, biased, sizes)
    for node in [user, *biased]:  # the add once every consumer reads the parts; else the unused part adds
        erase_if_dead(graph, node)
    return rewired


def _joined_pieces(bias: fx.Node, sizes: list[int]) -> list[fx.Node] | None:
    """The tensors ``torch.cat`` joins into ``bias`` when there is one per part, of the part's size.

    Slicing the joined bias instead lets XLA's propagation shard the concatenation across part boundaries,
    which costs collective-permutes (measured on timm BEiT: 14 per forward).
    """
    if op_of(bias) is not torch.cat or len(bias.args) < 1 or not isinstance(bias.args[0], (list, tuple)):
        return None
    pieces = list(bias.args[0])
    if len(pieces) != len(sizes) or not all(isinstance(p, fx.Node) and shape_of(p) == (n,) for p, n in zip(pieces, sizes)):
        return None
    return pieces


_SPLITTERS = {
    **dict.fromkeys(SPLIT + CHUNK, _rewire_split),
    operator.getitem: _rewire_slice,
    **dict.fromkeys(RESHAPE, _rewire_heads_reshape),
    **dict.fromkeys(ADD, _rewire_bias_add),
}
