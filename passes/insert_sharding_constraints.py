"""InsertShardingConstraints: a ShardingConstraint after each layer whose record asks for one."""

from __future__ import annotations

import operator

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fx_shard.constraint import ShardingConstraint
from fx_shard.passes.utils import provenance, result, set_submodule, shape_meta
from fx_shard.sharding import sharding_of

__all__ = ["InsertShardingConstraints"]

CONSTRAINT = "output_constraint"


class InsertShardingConstraints(PassBase):
    """Pin a layer's output sharding (``record.output_spec``), e.g. gathered LM-head logits.

    The constraint is a submodule ``<layer path>_output_constraint`` called
    right after the layer (after its ``[0]`` for ``(output, bias)`` layers).
    Only records that ask get one: where XLA's propagation already reaches
    the optimum, a constraint would only add risk.

    Reads: ``node.meta["sharding"].output_spec``. Writes: graph nodes, submodules.
    """

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        modified = False
        for node in list(graph.find_nodes(op="call_module")):
            record = sharding_of(node)
            if record is None or record.output_spec is None:
                continue
            output = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), node)
            if any(_is_constraint(u) for u in output.users):
                continue
            target = f"{node.target}_{CONSTRAINT}"
            set_submodule(graph_module, target, ShardingConstraint(record.output_spec))
            with graph.inserting_after(output):
                constrained = graph.call_module(target, (output,))
            constrained.meta.update({**provenance(output), **shape_meta(output)})
            output.replace_all_uses_with(constrained, delete_user_cb=lambda user: user is not constrained)
            modified = True
        return result(graph_module, modified)


def _is_constraint(node: fx.Node) -> bool:
    return node.op == "call_module" and node.target.endswith(f"_{CONSTRAINT}")
