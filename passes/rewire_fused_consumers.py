"""RewireFusedConsumers: feed q, k, v (or gate, up) straight to the code that split them apart."""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fx_shard.layers import SplitLinear
from fx_shard.passes.utils import erase_if_dead, provenance, result
from fx_shard.sharding import SHARDING_KEY, sharding_of

__all__ = ["RewireFusedConsumers"]

_SPLIT = ("split", torch.split, torch.Tensor.split)
_CHUNK = ("chunk", torch.chunk, torch.Tensor.chunk)
_UNBIND = ("unbind", torch.unbind, torch.Tensor.unbind)
_RESHAPE = ("view", "reshape", torch.reshape, torch.Tensor.view, torch.Tensor.reshape)
_PERMUTE = ("permute", torch.permute, torch.Tensor.permute)


class RewireFusedConsumers(PassBase):
    """Remove the ``cat`` that ``SplitFusedLinear`` left, by rewriting what consumed it.

    Under SPMD, concatenating the column-sharded q, k, v and splitting them
    again moves data between devices (all-gathers); feeding each part to its
    consumer keeps every device on its own heads. Recognised consumers:
    ``split`` / ``chunk`` along the features at the part boundaries, slices
    ``x[..., a:b]`` on part boundaries (``SiluAndMul``), and the heads
    reshape ``reshape(..., 3, H, hd)`` followed by ``permute`` and
    ``unbind`` / indexing (timm). Any other consumer keeps the ``cat`` (the
    function stays right) and the parts' records get a note the report shows.

    Reads: ``node.meta["sharding"]`` (``part_of``), ``tensor_meta`` when present.
    Writes: graph nodes; notes on the parts' records.
    """

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        modified = False
        for cat in list(graph.find_nodes(op="call_function", target=torch.cat)):
            fused = _fused_join(graph_module, cat)
            if fused is None:
                continue
            parts, sizes = fused
            for user in list(cat.users):
                rewire = _SPLITTERS.get(_op(user))
                if rewire is not None and rewire(graph, user, cat, parts, sizes):
                    modified = True
            if not cat.users:
                erase_if_dead(graph, cat)
                continue
            kept = ", ".join(u.format_node() for u in cat.users)
            note = f"the concatenation of the parts stays: consumer not recognised ({kept})"
            for part in parts:
                module_node = part if part.op == "call_module" else part.args[0]
                record = sharding_of(module_node)
                if note not in record.notes:
                    module_node.meta[SHARDING_KEY] = dataclasses.replace(record, notes=(*record.notes, note))
                    modified = True
        return result(graph_module, modified)


def _op(node: fx.Node):
    return node.target if node.op in ("call_method", "call_function") else None


def _fused_join(gm: fx.GraphModule, cat: fx.Node) -> tuple[list[fx.Node], list[int]] | None:
    """The part outputs and sizes if ``cat`` joins all parts of one split layer along the last dim."""
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or dim != -1:
        return None
    owners = []
    for t in tensors:
        module_node = t.args[0] if t.target is operator.getitem and t.args[1] == 0 else t
        record = sharding_of(module_node) if isinstance(module_node, fx.Node) else None
        if module_node.op != "call_module" or record is None or record.part_of is None:
            return None
        owners.append((record.part_of, module_node.target))
    split = gm.get_submodule(owners[0][0])
    expected = [f"{owners[0][0]}.{name}" for name in split.part_names] if isinstance(split, SplitLinear) else None
    if expected != [target for _, target in owners]:
        return None
    return list(tensors), list(split.output_sizes)


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_last_dim(dim, tensor: fx.Node) -> bool:
    return dim == -1 or (isinstance(dim, int) and dim >= 0 and dim == (_rank(tensor) or 0) - 1)


def _static_int(value, cat: fx.Node, total: int) -> int | None:
    """An int, or a node computing one from feature sizes (``x.shape[-1] // 2``).

    Only last dimensions are read: they are the model's feature sizes, while
    the others (batch, sequence) belong to the example inputs.
    """
    if isinstance(value, int):
        return value
    if not isinstance(value, fx.Node):
        return None
    source, dim = None, None
    if value.target is operator.getitem and isinstance(value.args[0], fx.Node):
        shape_of = value.args[0]
        if shape_of.op == "call_function" and shape_of.target is getattr and shape_of.args[1] == "shape":
            source, dim = shape_of.args[0], value.args[1]
        elif shape_of.op == "call_method" and shape_of.target == "size" and len(shape_of.args) == 1:
            source, dim = shape_of.args[0], value.args[1]
    elif value.op == "call_method" and value.target == "size" and len(value.args) == 2:
        source, dim = value.args
    if source is not None:
        return _last_dim_size(source, dim, cat, total)
    ops: dict[Callable, Callable] = {operator.floordiv: operator.floordiv, operator.mul: operator.mul,
                                     operator.add: operator.add, operator.sub: operator.sub}
    if value.op == "call_function" and value.target in ops and len(value.args) == 2:
        a, b = (_static_int(v, cat, total) for v in value.args)
        return None if a is None or b is None else ops[value.target](a, b)
    return None


def _last_dim_size(tensor: fx.Node, dim, cat: fx.Node, total: int) -> int | None:
    if not _is_last_dim(dim, tensor):
        return None
    if tensor is cat:
        return total
    meta = tensor.meta.get("tensor_meta")
    return int(meta.shape[-1]) if meta is not None and hasattr(meta, "shape") else None


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
    if user.args[0] is not cat:
        return False
    op = _op(user)
    amount = user.args[1] if len(user.args) > 1 else user.kwargs.get("split_size_or_sections", user.kwargs.get("split_size", user.kwargs.get("chunks")))
    dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", 0)
    if not _is_last_dim(dim, cat):
        return False
    total = sum(sizes)
    if isinstance(amount, (list, tuple)):
        matches = op not in _CHUNK and [_static_int(a, cat, total) for a in amount] == sizes
    elif op in _CHUNK:
        matches = amount == len(sizes) and len(set(sizes)) == 1
    else:
        size = _static_int(amount, cat, total)
        matches = size is not None and all(s == size for s in sizes)
    return matches and _replace_indexed_users(graph, user, parts)


def _rewire_slice(graph: fx.Graph, user: fx.Node, cat: fx.Node, parts: list[fx.Node], sizes: list[int]) -> bool:
    """``cat[..., a:b]`` where ``[a, b)`` is exactly one part."""
    index = user.args[1]
    if user.args[0] is not cat or not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return False
    leading = index[:-1]
    rank = _rank(cat)
    if leading != (Ellipsis,) and not (rank is not None and leading == (slice(None),) * (rank - 1)):
        return False
    total = sum(sizes)
    cut = index[-1]
    start = 0 if cut.start is None else _static_int(cut.start, cat, total)
    stop = total if cut.stop is None else _static_int(cut.stop, cat, total)
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
    shape = list(user.args[1]) if len(user.args) == 2 and isinstance(user.args[1], (list, tuple)) else list(user.args[1:])
    values = [_static_int(v, cat, sum(sizes)) for v in shape]
    axis = next(
        (a for a in range(len(shape)) if values[a] == len(sizes)
         and all(v is not None and v > 0 for v in values[a + 1:]) and math.prod(values[a + 1:]) == sizes[0]),
        None,
    )
    if axis is None:
        return False
    follow = list(user.users)
    if len(follow) != 1:
        return False
    (nxt,) = follow
    perm = None
    if _op(nxt) in _PERMUTE:
        perm = list(nxt.args[1]) if len(nxt.args) == 2 and isinstance(nxt.args[1], (list, tuple)) else list(nxt.args[1:])
        perm = [p % len(shape) for p in perm]
        if perm[0] != axis:
            return False
        selector, position = nxt, 0
    else:
        selector, position = user, axis
    select = list(selector.users)
    if len(select) == 1 and _op(select[0]) in _UNBIND:
        unbind = select[0]
        dim = unbind.args[1] if len(unbind.args) > 1 else unbind.kwargs.get("dim", 0)
        if dim % len(shape) != position:
            return False
        indexed = unbind
    elif position == 0:
        indexed = selector
    else:
        return False
    if not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in indexed.users):
        return False
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


_SPLITTERS = {
    **dict.fromkeys(_SPLIT + _CHUNK, _rewire_split),
    operator.getitem: _rewire_slice,
    **dict.fromkeys(_RESHAPE, _rewire_heads_reshape),
}
