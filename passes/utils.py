"""Helpers shared by fx_shard's passes."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fx_shard.sharding import SHARDING_KEY, ShardingRecord, sharding_of

# Keys a rewrite must not carry onto a node of another shape (executorch's PROTECTED_KEYS, less provenance).
SHAPE_KEYS = ("val", "tensor_meta", "example_value")


class MeshPass(PassBase):
    """A pass whose decisions depend on the mesh: ``mesh_shape`` maps axis names to sizes."""

    def __init__(self, mesh_shape: Mapping[str, int]) -> None:
        super().__init__()
        self.mesh_shape = mesh_shape


def update_records(gm: fx.GraphModule, update: Callable[[fx.Node, ShardingRecord], ShardingRecord | None]) -> bool:
    """Give each recorded ``call_module`` node the record ``update`` returns (None: unchanged); whether any changed."""
    modified = False
    for node in gm.graph.find_nodes(op="call_module"):
        record = sharding_of(node)
        new = update(node, record) if record is not None else None
        if new is not None:
            node.meta[SHARDING_KEY] = new
            modified = True
    return modified


def result(gm: fx.GraphModule, modified: bool) -> PassResult:
    """Lint and recompile a changed graph; the ``PassResult`` either way."""
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)


def records_result(gm: fx.GraphModule, modified: bool) -> PassResult:
    """The ``PassResult`` of a pass that changes node records only: the graph and its code are as they were."""
    return PassResult(gm, modified)


def provenance(node: fx.Node) -> dict:
    """``node``'s metadata without shape facts or sharding: what an inserted node inherits."""
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
