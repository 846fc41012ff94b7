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
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from fx_shard.capture import is_linear_like
from fx_shard.layers import in_features, out_features
from fx_shard.patterns import RESHAPE, op_of, parts_axis, shape_args, split_sections, static_int
from fx_shard.plan import LayerPlan

__all__ = ["Inferred", "infer_plan"]

_LOCAL_MODULES = (nn.SiLU, nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.Mish, nn.LeakyReLU)
_NORMS = {F.layer_norm, F.group_norm, F.rms_norm, torch.layer_norm, torch.rms_norm, F.normalize}
_CONTRACTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.einsum, "matmul", "bmm"}
_ATTENTION = {F.scaled_dot_product_attention}
_FEATURE_REDUCTIONS = {"mean", "sum", "var", "std", "norm", "amax", "amin", "max", "min", "logsumexp", "softmax",
                       "log_softmax", "argmax", "argmin", "topk", "cumsum"}


@dataclass(frozen=True)
class Inferred:
    """One inferred decision: the layer plan and why."""

    layer: LayerPlan
    reason: str


@dataclass
class _Reach:
    linears: list[str]
    escaped: str | None  # what stopped the walk, when the output must be whole there


def infer_plan(gm: fx.GraphModule, ways: int, prefix: str = "") -> dict[str, Inferred]:
    """A decision for each linear-like layer of ``gm`` that the data flow supports, keyed by module path.

    ``ways`` is the tensor-parallel size: a layer whose sharded dimension it
    does not divide stays replicated, with the reason. ``prefix`` is ``gm``'s
    own path in the model, for a part of a model captured part by part.
    """
    from fx_shard.ops import batched_matmul, einsum_attention

    contractions = _CONTRACTIONS | {batched_matmul}
    attention = _ATTENTION | {einsum_attention}
    decisions: dict[str, Inferred] = {}
    nodes = {n.target: n for n in gm.graph.find_nodes(op="call_module") if is_linear_like(gm.get_submodule(n.target))}
    unpaired: dict[str, str] = {}
    rows: dict[str, list[str]] = {}  # row-parallel layer -> the column layers feeding it
    for target, node in nodes.items():
        module = gm.get_submodule(target)
        if isinstance(module, nn.Embedding):
            fed_by_input = node.args and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder"
            if fed_by_input and module.num_embeddings % ways == 0:
                decisions[target] = Inferred(LayerPlan("vocab"), "inferred: embedding of a model input (vocabulary rows)")
            else:
                unpaired[target] = "not the embedding of a model input" if not fed_by_input else f"{module.num_embeddings} rows do not split {ways} ways"
            continue
        if target in decisions:
            continue
        reach = _walk(gm, node, nodes, contractions, attention)
        if reach.escaped is None and reach.linears and all(r in rows or r not in decisions for r in reach.linears):
            for r in reach.linears:
                rows.setdefault(r, []).append(target)
            decisions.update(_pair(gm, node, {r: rows[r] for r in reach.linears}, ways, prefix))
        elif reach.escaped == "output" and _is_head(gm, module, ways):
            decisions[target] = Inferred(LayerPlan("lm_head"), "inferred: projects to the model's output, widening")
        else:
            unpaired[target] = f"its output is needed whole at {reach.escaped}" if reach.escaped else "feeds no other linear"
    for target, why in unpaired.items():
        decisions.setdefault(target, Inferred(LayerPlan("replicate"), f"inferred: replicated, {why}"))
    return {_path(prefix, t): d for t, d in decisions.items()}


def _path(prefix: str, target: str) -> str:
    return f"{prefix}.{target}" if prefix else target


def _pair(
    gm: fx.GraphModule, node: fx.Node, row_targets: Mapping[str, list[str]], ways: int, prefix: str
) -> dict[str, Inferred]:
    """Column decision for ``node`` and row decisions for its partners, or replication when ``ways`` does not divide.

    Reasons name layers by their path in the whole model.
    """
    module = gm.get_submodule(node.target)
    outputs = out_features(module)
    fused = _fused_layout(node, outputs)
    partners = ", ".join(_path(prefix, t) for t in row_targets)
    if fused is not None:
        style, sizes, how = fused
        layer = LayerPlan(style, output_sizes=tuple(sizes))
        reason = f"inferred: fused {style} ({how}), column-parallel into {partners}"
        divides = all(s % ways == 0 for s in sizes)
    else:
        layer = LayerPlan("colwise")
        reason = f"inferred: column-parallel into {partners}"
        divides = outputs % ways == 0
    if not divides:
        why = f"inferred: replicated, {outputs} output features do not split {ways} ways"
        return {node.target: Inferred(LayerPlan("replicate"), why)}
    decisions = {node.target: Inferred(layer, reason)}
    for target in row_targets:
        if in_features(gm.get_submodule(target)) % ways == 0:
            feeders = ", ".join(_path(prefix, t) for t in row_targets[target])
            decisions[target] = Inferred(LayerPlan("rowwise"), f"inferred: row-parallel after {feeders}")
    return decisions


def _walk(gm, start: fx.Node, linears: Mapping[str, fx.Node], contractions, attention) -> _Reach:
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
            if user.op == "call_module" and user.target in linears:
                if user.args and user.args[0] is value and user.target not in reached:
                    reached.append(user.target)
                continue
            step = _local_step(gm, user, after_scores, contractions, attention)
            if step is None:
                return _Reach(reached, user.format_node())
            frontier.append((user, step))
    return _Reach(reached, None)


def _reads_shape_only(node: fx.Node) -> bool:
    """Shape reads carry no data: what they feed is not derived from the tensor."""
    return (node.op == "call_function" and node.target is getattr) or (
        node.op == "call_method" and node.target in ("size", "dim")
    )


def _local_step(gm, node: fx.Node, after_scores: bool, contractions, attention) -> bool | None:
    """Whether ``node`` keeps features local: None if not; else whether its output's last dim is attention keys."""
    if node.op == "call_module":
        return after_scores if isinstance(gm.get_submodule(node.target), _LOCAL_MODULES) else None
    op = op_of(node)
    if op is None or op in _NORMS:
        return None
    if op in contractions:
        return not after_scores
    if op in attention:
        return False
    name = op if isinstance(op, str) else getattr(op, "__name__", "")
    if name in _FEATURE_REDUCTIONS and _reduces_last_dim(node) and not after_scores:
        return None
    return after_scores


def _reduces_last_dim(node: fx.Node) -> bool:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    return dim is None or any(d == -1 or (isinstance(d, int) and d > 0 and d == _last(node)) for d in dims)


def _last(node: fx.Node) -> int | None:
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    return len(meta.shape) - 1 if meta is not None and hasattr(meta, "shape") else None


def _fused_layout(node: fx.Node, features: int) -> tuple[str, list[int], str] | None:
    """``(style, sizes, how)`` when the output is split into parts along the features right away."""
    output = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), node)
    for user in output.users:
        sections = split_sections(user, output, features)
        if sections is not None and len(sections) in (2, 3):
            style = "qkv" if len(sections) == 3 else "merged_colwise"
            return style, sections, f"output split {sections}"
        if op_of(user) in RESHAPE and user.args[0] is output:
            values = [static_int(v, {output: features}) for v in shape_args(user)]
            for parts in (3, 2):
                if features % parts == 0 and parts_axis(values, parts, features // parts) is not None:
                    style = "qkv" if parts == 3 else "merged_colwise"
                    return style, [features // parts] * parts, f"output reshaped to {parts} parts"
    return None


def _is_head(gm: fx.GraphModule, module: nn.Module, ways: int) -> bool:
    tied = any(m is not module and getattr(m, "weight", None) is module.weight for m in gm.modules())
    return out_features(module) % ways == 0 and (tied or out_features(module) > in_features(module))
