"""Helpers shared by fx_shard's passes."""

from __future__ import annotations

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

# Keys a rewrite must not carry onto a node of another shape (executorch's PROTECTED_KEYS, less provenance).
SHAPE_KEYS = ("val", "tensor_meta", "example_value")


def result(gm: fx.GraphModule, modified: bool) -> PassResult:
    """Lint and recompile a changed graph; the ``PassResult`` either way."""
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)


def provenance(node: fx.Node) -> dict:
    """``node``'s metadata without shape facts or sharding: what an inserted node inherits."""
    from fx_shard.sharding import SHARDING_KEY

    return {k: v for k, v in node.meta.items() if k not in SHAPE_KEYS and k != SHARDING_KEY}


def shape_meta(node: fx.Node) -> dict:
    """``node``'s shape facts, for a node that replaces it with the same value."""
    return {k: node.meta[k] for k in SHAPE_KEYS if k in node.meta}


def erase_if_dead(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` if nothing uses it and it is pure, then its inputs likewise."""
    if node._erased or node.users or node.op in ("placeholder", "output") or node.is_impure():
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for n in inputs:
        erase_if_dead(graph, n)


def set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Install ``module`` at dotted path ``target`` in ``gm``."""
    owner, _, field = target.rpartition(".")
    setattr(gm.get_submodule(owner), field, module)
