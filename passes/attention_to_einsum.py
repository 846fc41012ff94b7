"""AttentionToEinsum: attention in a form XLA partitions over heads without collectives."""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fx_shard.ops import batched_matmul, einsum_attention
from fx_shard.passes.utils import result
from fx_shard.patterns import SDPA

__all__ = ["AttentionToEinsum"]




class AttentionToEinsum(PassBase):
    """Replace ``F.scaled_dot_product_attention`` and ``matmul`` with their einsum forms.

    torch_xla lowers both through a batch*heads reshape that drops a heads
    sharding (XLA all-gathers q, k and v); ``fx_shard.ops`` computes the
    same with einsums over explicit batch dims. ``batched_matmul`` keeps
    plain ``matmul`` for operands below 4-D, so rewriting every matmul is safe.

    Reads and writes: ``call_function`` targets only.
    """

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and node.target in SDPA:
                node.target = einsum_attention
                modified = True
            elif (node.op == "call_function" and node.target in (operator.matmul, torch.matmul)) or (
                node.op == "call_method" and node.target == "matmul"
            ):
                node.op, node.target = "call_function", batched_matmul
                modified = True
        return result(graph_module, modified)
