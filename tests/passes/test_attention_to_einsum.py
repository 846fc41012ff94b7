"""AttentionToEinsum: sdpa and matmul in einsum forms XLA partitions over heads."""

import operator

import pytest
import torch
import torch.nn.functional as F

from fx_shard.capture import capture
from fx_shard.ops import batched_matmul, einsum_attention
from fx_shard.passes import AttentionToEinsum
from tests.toy import HeadsAttention, VllmBlock, seeded


@pytest.mark.parametrize("layout", ["timm", "split_int"])
def test_attention_to_einsum(layout):
    model = seeded(HeadsAttention, layout)
    x = torch.randn(2, 6, 32)
    gm = capture(model)
    assert AttentionToEinsum()(gm).modified
    gm.graph.lint()
    torch.testing.assert_close(gm(x), model(x))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention not in targets and operator.matmul not in targets
    expected = {"timm": (batched_matmul, 2), "split_int": (einsum_attention, 1)}[layout]
    assert targets.count(expected[0]) == expected[1]
    code = gm.code
    assert not AttentionToEinsum()(gm).modified and gm.code == code


def test_attention_to_einsum_leaves_other_graphs_alone():
    gm = capture(seeded(VllmBlock))
    code = gm.code
    assert not AttentionToEinsum()(gm).modified and gm.code == code
