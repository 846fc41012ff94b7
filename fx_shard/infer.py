"""The automatic plan: styles found from the graph's data flow, never from names.

A linear whose output reaches other linears only through *feature-local* ops
(element-wise math, activations, reshapes into heads, rotary, attention over
a heads dimension) is column-parallel and those linears are row-parallel:
the Megatron pair, one all-reduce per pair. A path that meets a normalization,
a reduction over the features or the model's output first means the output
must be whole, so the linear is not a column half. A column linear whose
output is split along the features (three ways, or reshaped to
``(..., 3, H, hd)``) is fused: ``qkv`` or ``merged_colwise``. An embedding
fed by a model input is vocabulary-parallel; a linear projecting to more
features than it reads straight into the model's output (or sharing an
embedding's weight) is the LM head. Everything else stays replicated.

Under SPMD any sharding computes the same function, so the inference only
decides how fast the model runs, never what it computes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from fx_shard.capture import is_linear_like, own_forward
from fx_shard.geometry import in_features, out_features
from fx_shard.ops import batched_matmul, einsum_attention
from fx_shard.patterns import (
    RESHAPE,
    bias_added,
    op_of,
    parts_taken_apart,
    rank,
    reshape_parts_axis,
    shape_of,
    split_sections,
)
from fx_shard.plan import Decision
from fx_shard.sharding import SourceKind
from fx_shard.styles import (
    QKV,
    Colwise,
    LayerPlan,
    LMHead,
    MergedColwise,
    Replicate,
    Rowwise,
    Vocab,
)

__all__ = ["inferred", "infer_from_export", "infer_plan"]

_ATEN = torch.ops.aten
# The argument an ATen linear-like op reads its activation from.
_ATEN_DATA_ARG = {_ATEN.linear.default: 0, _ATEN.addmm.default: 1, _ATEN.mm.default: 0, _ATEN.embedding.default: 1}
_LOCAL_MODULES = (nn.SiLU, nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.Mish, nn.LeakyReLU)
_NORMS = {F.layer_norm, F.group_norm, F.rms_norm, torch.layer_norm, torch.rms_norm, F.normalize,
          _ATEN.layer_norm.default, _ATEN.native_layer_norm.default, _ATEN.group_norm.default, _ATEN.rms_norm.default}
_CONTRACTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.einsum, "matmul", "bmm", batched_matmul,
                 _ATEN.matmul.default, _ATEN.bmm.default, _ATEN.einsum.default, _ATEN.baddbmm.default}
_ATTENTION = {F.scaled_dot_product_attention, einsum_attention, _ATEN.scaled_dot_product_attention.default,
              _ATEN._scaled_dot_product_flash_attention_for_cpu.default}
_FEATURE_REDUCTIONS = {"mean", "sum", "var", "std", "norm", "amax", "amin", "max", "min", "logsumexp", "softmax",
                       "log_softmax", "argmax", "argmin", "topk", "cumsum"}


def inferred(style: str, reason: str, **options) -> Decision:
    """A decision the data flow supports: ``style`` with ``options``, and why."""
    return Decision(LayerPlan(style, **options), SourceKind.INFERRED, reason)


@dataclass
class _Reach:
    linears: list[str]
    escaped: str | None  # what stopped the walk, when the output must be whole there


def infer_plan(gm: fx.GraphModule, ways: int, prefix: str = "") -> dict[str, Decision]:
    """A decision for each linear-like layer of ``gm`` that the data flow supports, keyed by module path.

    ``ways`` is the tensor-parallel size: a layer whose sharded dimension it
    does not divide stays replicated, with the reason. ``prefix`` is ``gm``'s
    own path in the model, for a part of a model captured part by part.
    """
    layers = {
        n: (f"{prefix}.{n.target}" if prefix else n.target, gm.get_submodule(n.target))
        for n in gm.graph.find_nodes(op="call_module")
        if is_linear_like(gm.get_submodule(n.target))
    }
    inputs = set(gm.graph.find_nodes(op="placeholder"))
    return _infer(layers, ways, lambda node: gm.get_submodule(node.target), list(gm.modules()), inputs)


def infer_from_export(model: nn.Module, args: tuple, kwargs: Mapping, ways: int) -> dict[str, Decision]:
    """The same inference on the ATen graph ``torch.export`` (non-strict) captures with example inputs.

    For models torch.fx cannot trace: each ATen op that reads a linear-like
    layer's weight is mapped back to the layer through ``nn_module_stack``.
    """
    exported = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    parameters = exported.graph_signature.inputs_to_parameters
    layers: dict[fx.Node, tuple[str, nn.Module]] = {}
    for node in exported.graph_module.graph.nodes:
        if node.op != "call_function" or not any(isinstance(a, fx.Node) and a.name in parameters for a in node.args):
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        path = stack[-1][0] if stack else ""
        path = path.removeprefix("L['self'].").replace("L['self']", "")
        module = _get(model, path)
        if module is not None and is_linear_like(module) and _data_input(node) is not None:
            layers[node] = (path, module)
    user_inputs = set(exported.graph_signature.user_inputs)
    inputs = {n for n in exported.graph_module.graph.find_nodes(op="placeholder") if n.name in user_inputs}
    return _infer(layers, ways, lambda node: None, list(model.modules()), inputs)


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _data_input(node: fx.Node) -> fx.Node | None:
    """The activation a linear-like node reads (not its weight)."""
    if node.op == "call_module":
        return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    index = _ATEN_DATA_ARG.get(node.target)
    return node.args[index] if index is not None and isinstance(node.args[index], fx.Node) else None


def _infer(
    layers: Mapping[fx.Node, tuple[str, nn.Module]],
    ways: int,
    module_called: Callable[[fx.Node], nn.Module | None],
    all_modules: list[nn.Module],
    inputs: set[fx.Node],
) -> dict[str, Decision]:
    """The inference over any graph whose linear-like layers are ``layers`` (node -> (path, module)).

    ``inputs`` are the model's own inputs (not parameters or buffers).
    """
    decisions: dict[str, Decision] = {}
    unpaired: dict[str, str] = {}
    rows: dict[str, list[str]] = {}  # row-parallel layer -> the column layers feeding it
    by_path = {path: module for path, module in layers.values()}
    for node, (path, module) in layers.items():
        if isinstance(module, nn.Embedding) or node.target is torch.ops.aten.embedding.default:
            source = _data_input(node)
            while source is not None and op_of(source) in RESHAPE:
                source = source.args[0]
            fed_by_input = source in inputs
            if fed_by_input and module.weight.shape[0] % ways == 0:
                decisions[path] = inferred(Vocab.name, "inferred: embedding of a model input (vocabulary rows)")
            else:
                why = f"{module.weight.shape[0]} rows do not split {ways} ways" if fed_by_input else "not the embedding of a model input"
                unpaired.setdefault(path, why)
            continue
        if path in decisions:
            continue
        reach = _walk(node, layers, module_called)
        if reach.escaped is None and reach.linears and all(r in rows or r not in decisions for r in reach.linears):
            for r in reach.linears:
                rows.setdefault(r, []).append(path)
            decisions.update(_pair(node, path, module, {r: (by_path[r], rows[r]) for r in reach.linears}, ways))
        elif reach.escaped == "output" and _is_head(module, all_modules, ways):
            decisions[path] = inferred(LMHead.name, "inferred: projects to the model's output, widening")
        else:
            unpaired[path] = f"its output is needed whole at {reach.escaped}" if reach.escaped else "feeds no other linear"
    for path, why in unpaired.items():
        decisions.setdefault(path, inferred(Replicate.name, f"inferred: replicated, {why}"))
    return decisions


def _pair(
    node: fx.Node, path: str, module: nn.Module, rows: Mapping[str, tuple[nn.Module, list[str]]], ways: int
) -> dict[str, Decision]:
    """Column decision for ``node`` and row decisions for its partners, or replication when ``ways`` does not divide."""
    outputs = out_features(module)
    # A fused layer is replaced by its parts; one whose forward is its own would lose it: sharded as one then.
    fused = _fused_layout(node, outputs) if own_forward(module) is None else None
    partners = ", ".join(rows)
    if fused is not None:
        style, sizes, how = fused
        decision = inferred(style, f"inferred: fused {style} ({how}), column-parallel into {partners}", output_sizes=tuple(sizes))
        divides = all(s % ways == 0 for s in sizes)
    else:
        decision = inferred(Colwise.name, f"inferred: column-parallel into {partners}")
        divides = outputs % ways == 0
    if not divides:
        return {path: inferred(Replicate.name, f"inferred: replicated, {outputs} output features do not split {ways} ways")}
    decisions = {path: decision}
    for row, (row_module, feeders) in rows.items():
        if in_features(row_module) % ways == 0:
            decisions[row] = inferred(Rowwise.name, f"inferred: row-parallel after {', '.join(feeders)}")
    return decisions


def _walk(start: fx.Node, layers: Mapping[fx.Node, tuple[str, nn.Module]], module_called) -> _Reach:
    """Follow ``start``'s output through feature-local ops to the linears it feeds."""
    reached: list[str] = []
    frontier = [(start, False)]
    seen = {start}
    while frontier:
        value, after_scores = frontier.pop()
        for user in value.users:
            if user in seen or _reads_shape_only(user):
                continue
            seen.add(user)
            if user.op == "output":
                return _Reach(reached, "output")
            if user in layers:
                path = layers[user][0]
                if _data_input(user) is value and path not in reached:
                    reached.append(path)
                continue
            step = _local_step(user, after_scores, module_called)
            if step is None:
                return _Reach(reached, user.format_node())
            frontier.append((user, step))
    return _Reach(reached, None)


def _reads_shape_only(node: fx.Node) -> bool:
    """Shape reads carry no data: what they feed is not derived from the tensor."""
    return (node.op == "call_function" and node.target in (getattr, torch.ops.aten.sym_size.int)) or (
        node.op == "call_method" and node.target in ("size", "dim")
    )


def _local_step(node: fx.Node, after_scores: bool, module_called) -> bool | None:
    """Whether ``node`` keeps features local: None if not; else whether its output's last dim is attention keys."""
    if node.op == "call_module":
        module = module_called(node)
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)):  # timm Swin's attn.softmax: over the keys, as F.softmax
            last = rank(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            over_last = module.dim in (None, -1) or (last is not None and module.dim == last - 1)
            return None if over_last and not after_scores else after_scores
        return after_scores if isinstance(module, _LOCAL_MODULES) else None
    op = op_of(node)
    if op is None or op in _NORMS:
        return None
    if op in _CONTRACTIONS:
        return not after_scores
    if op in _ATTENTION:
        return False
    if _op_name(op) in _FEATURE_REDUCTIONS and _reduces_last_dim(node) and not after_scores:
        return None
    return after_scores


def _op_name(op) -> str:
    if isinstance(op, str):
        return op
    if isinstance(op, torch._ops.OpOverload):
        return op.overloadpacket.__name__.lstrip("_")
    return getattr(op, "__name__", "")


def _reduces_last_dim(node: fx.Node) -> bool:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    last = rank(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    return dim is None or any(d == -1 or (isinstance(d, int) and last is not None and d == last - 1) for d in dims)


def _fused_layout(node: fx.Node, features: int) -> tuple[str, list[int], str] | None:
    """``(style, sizes, how)`` when the output is split into parts along the features right away."""
    output = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), node)
    # An ATen linear on 3-D input is a 2-D addmm viewed back: look past views that keep the features, and past
    # a bias added apart (timm BEiT's joined q/v bias).
    while len(output.users) == 1:
        (after,) = output.users
        if not ((op_of(after) in RESHAPE and _last_size(after) == features) or bias_added(after, output, features)):
            break
        output = after
    for user in output.users:
        sections = split_sections(user, output, features)
        if sections is not None and len(sections) in (2, 3):
            style = QKV.name if len(sections) == 3 else MergedColwise.name
            return style, sections, f"output split {sections}"
        if op_of(user) in RESHAPE and user.args[0] is output:
            for parts in (3, 2):
                axis = reshape_parts_axis(user, output, features, parts, features // parts) if features % parts == 0 else None
                if axis is not None and parts_taken_apart(user, axis) is not None:  # else heads, not parts
                    style = QKV.name if parts == 3 else MergedColwise.name
                    return style, [features // parts] * parts, f"output reshaped to {parts} parts"
    return None


def _last_size(node: fx.Node) -> int | None:
    shape = shape_of(node)
    return int(shape[-1]) if shape else None


def _is_head(module: nn.Module, all_modules: list[nn.Module], ways: int) -> bool:
    tied = any(m is not module and getattr(m, "weight", None) is module.weight for m in all_modules)
    return out_features(module) % ways == 0 and (tied or out_features(module) > in_features(module))
