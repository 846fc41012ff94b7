"""Small facts about fx nodes that planning and passes both read: op kinds, ranks, feature sizes.

Feature sizes (last dimensions) are the model's own; every other dimension
belongs to the example inputs, so nothing here reads them.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import fx

__all__ = [
    "CHUNK",
    "PENDING_SHAPES",
    "PERMUTE",
    "RESHAPE",
    "SDPA",
    "SPLIT",
    "UNBIND",
    "is_last_dim",
    "op_of",
    "parts_axis",
    "parts_taken_apart",
    "rank",
    "shape_args",
    "shape_of",
    "split_sections",
    "static_int",
]

_ATEN = torch.ops.aten
# Each op kind as Python (symbolic trace), method names, and ATen (torch.export) spell it.
SPLIT = ("split", torch.split, torch.Tensor.split, _ATEN.split.Tensor, _ATEN.split_with_sizes.default)
CHUNK = ("chunk", torch.chunk, torch.Tensor.chunk, _ATEN.chunk.default)
UNBIND = ("unbind", torch.unbind, torch.Tensor.unbind, _ATEN.unbind.int)
RESHAPE = ("view", "reshape", torch.reshape, torch.Tensor.view, torch.Tensor.reshape,
           _ATEN.view.default, _ATEN.reshape.default, _ATEN._unsafe_view.default)
SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
PERMUTE = ("permute", torch.permute, torch.Tensor.permute, _ATEN.permute.default)
ADD = ("add", "add_", torch.add, operator.add, operator.iadd, torch.Tensor.add, _ATEN.add.Tensor)


def bias_added(node: fx.Node, to: fx.Node, features: int) -> fx.Node | None:
    """The 1-D tensor of ``features`` values ``node`` adds to ``to`` (a bias: every feature its own), if it is one."""
    if op_of(node) not in ADD or len(node.args) != 2 or node.kwargs or to not in node.args:
        return None
    other = node.args[1] if node.args[0] is to else node.args[0]
    return other if isinstance(other, fx.Node) and shape_of(other) == (features,) else None

#: Key of a GraphModule's ``meta`` holding its deferred shape propagation (a callable), run when first needed.
PENDING_SHAPES = "fx_shard.pending_shapes"

_ARITHMETIC: dict[Callable, Callable] = {
    operator.floordiv: operator.floordiv, operator.mul: operator.mul, operator.add: operator.add, operator.sub: operator.sub,
}


def op_of(node: fx.Node):
    """The function or method name a node calls, or None for other ops."""
    return node.target if node.op in ("call_method", "call_function") else None


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The tensor shape from shape propagation (``tensor_meta``) or export (``val``), if known.

    A graph whose propagation was deferred (``PENDING_SHAPES`` in its module's
    ``meta``) runs it at the first look-up of a shape it lacks.
    """
    for attempt in range(2):
        for key in ("tensor_meta", "val"):
            shape = getattr(node.meta.get(key), "shape", None)
            if shape is not None:
                return tuple(shape)
        owner = node.graph.owning_module
        pending = owner.meta.pop(PENDING_SHAPES, None) if owner is not None and hasattr(owner, "meta") else None
        if pending is None:
            return None
        pending()
    return None


def rank(node: fx.Node) -> int | None:
    """The tensor rank, if known."""
    shape = shape_of(node)
    return None if shape is None else len(shape)


def is_last_dim(dim, tensor: fx.Node) -> bool:
    """Whether ``dim`` names the last dimension of ``tensor`` (a positive dim needs its rank)."""
    return dim == -1 or (isinstance(dim, int) and dim >= 0 and dim == (rank(tensor) or 0) - 1)


def reshape_parts_axis(node: fx.Node, source: fx.Node, features: int, parts: int, part_size: int) -> int | None:
    """``parts_axis`` of reshape ``node`` of ``source``: its sizes as ``static_int`` reads them, a ``-1`` in the
    tail resolved by shape propagation (timm BEiT's ``reshape(B, N, 3, H, -1)``).

    The parts axis itself must be written out: ``view(B, N, -1, hd)`` with 2 heads is a heads reshape, not
    2 parts.
    """
    given = [static_int(v, {source: features}) for v in shape_args(node)]
    known = shape_of(node) if -1 in given else None
    values = [k if g == -1 else g for g, k in zip(given, known)] if known is not None and len(known) == len(given) else given
    axis = parts_axis(values, parts, part_size)
    return None if axis is None or given[axis] == -1 else axis


def static_int(value, known: Mapping[fx.Node, int]) -> int | None:
    """An int, or a node computing one from feature sizes (``x.shape[-1] // 2``).

    ``known`` gives last-dim sizes of tensors without shape metadata.
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
        return _last_dim_size(source, dim, known)
    if value.op == "call_function" and value.target in _ARITHMETIC and len(value.args) == 2:
        a, b = (static_int(v, known) for v in value.args)
        return None if a is None or b is None else _ARITHMETIC[value.target](a, b)
    return None


def _last_dim_size(tensor: fx.Node, dim, known: Mapping[fx.Node, int]) -> int | None:
    if not is_last_dim(dim, tensor):
        return None
    if tensor in known:
        return known[tensor]
    shape = shape_of(tensor)
    return int(shape[-1]) if shape else None


def shape_args(node: fx.Node) -> list:
    """The shape (or permutation) arguments of a view/reshape/permute call, varargs or one sequence."""
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        return list(node.args[1])
    return list(node.args[1:])


def split_sections(user: fx.Node, source: fx.Node, features: int, axis: tuple[int, int] | None = None) -> list[int] | None:
    """The sizes ``user`` (a split or chunk of ``source`` along its features) cuts ``features`` into.

    ``axis``, as ``(dim, dim - rank)``, asks for a split along that axis of ``features`` items instead.
    """
    op = op_of(user)
    if op not in SPLIT + CHUNK or not user.args or user.args[0] is not source:
        return None
    kwargs = user.kwargs
    amount = user.args[1] if len(user.args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size", kwargs.get("chunks")))
    dim = user.args[2] if len(user.args) > 2 else kwargs.get("dim", 0)
    if not (dim in axis if axis is not None else is_last_dim(dim, source)):
        return None
    known = {source: features} if axis is None else {}
    if isinstance(amount, (list, tuple)):
        sections = [static_int(a, known) for a in amount]
        return sections if op not in CHUNK and None not in sections and sum(sections) == features else None
    if op in CHUNK:
        return [features // amount] * amount if isinstance(amount, int) and features % amount == 0 else None
    size = static_int(amount, known)
    return [size] * (features // size) if size and features % size == 0 else None


def parts_taken_apart(reshape: fx.Node, axis: int) -> tuple[fx.Node | None, fx.Node] | None:
    """``(permute or None, node whose int-indexed users take the parts)`` when the parts ``axis`` of
    ``reshape`` is taken apart right away: an optional ``permute`` bringing it first, then ``unbind`` on it
    or ``[i]``. None otherwise: a reshape whose axis goes on (into attention, as heads) does not make parts.
    """
    size = len(shape_args(reshape))
    if len(reshape.users) != 1:
        return None
    (nxt,) = reshape.users
    permute = None
    if op_of(nxt) in PERMUTE:
        if [p % size for p in shape_args(nxt)][:1] != [axis]:
            return None
        permute, selector, position = nxt, nxt, 0
    else:
        selector, position = reshape, axis
    select = list(selector.users)
    if len(select) == 1 and op_of(select[0]) in UNBIND:
        unbind = select[0]
        dim = unbind.args[1] if len(unbind.args) > 1 else unbind.kwargs.get("dim", 0)
        if dim % size != position:
            return None
        indexed = unbind
    elif position == 0:
        indexed = selector
    else:
        return None
    if not indexed.users or not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in indexed.users):
        return None
    return permute, indexed


def parts_axis(values: list[int | None], parts: int, part_size: int) -> int | None:
    """The axis of a reshape ``(*lead, parts, *tail)`` with ``prod(tail) == part_size``, if any."""
    for axis, value in enumerate(values):
        tail = values[axis + 1:]
        if value == parts and all(v is not None and v > 0 for v in tail) and math.prod(tail) == part_size:
            return axis
    return None
