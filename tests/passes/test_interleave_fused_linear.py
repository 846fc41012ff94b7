"""InterleaveFusedLinear: a fused QKV or gate_up stays one matmul, its rows ordered per device."""

import copy

import pytest
import torch

from fx_shard import models
from fx_shard.capture import capture, linear_like_modules, propagate_shapes
from fx_shard.models.plans import PLANS
from fx_shard.ops import fused_part
from fx_shard.passes import AnnotateSharding, InterleaveFusedLinear, RewireFusedConsumers, SplitFusedLinear
from fx_shard.plan import ShardPlan
from fx_shard.sharding import Layout, sharding_of
from tests.passes.helpers import annotated
from tests.toy import QKV_32, FusedAttention, VllmBlock, seeded


@pytest.mark.parametrize("name", ["gpt2", "vit", "llama-vllm"])
def test_interleave_keeps_fused_layers_one_matmul(name):
    model, inputs = models.build(name), models.example_inputs(name)
    gm = capture(copy.deepcopy(model))
    propagate_shapes(gm, inputs)
    AnnotateSharding(ShardPlan(PLANS[name]).resolve(linear_like_modules(gm), {"tp": 4}, "tp"))(gm)
    assert InterleaveFusedLinear({"tp": 4})(gm).modified
    gm.graph.lint()
    torch.testing.assert_close(gm(*inputs), model(*inputs))
    records = {n.target: sharding_of(n) for n in gm.graph.find_nodes(op="call_module") if sharding_of(n)}
    interleaved = sorted(t for t, r in records.items() if r.layout is Layout.INTERLEAVED)
    # vLLM's QKV has 2 KV heads: 4 devices would cut them, so it is left for the split; gate_up is interleaved.
    expected = {"gpt2": ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"],
                "vit": ["blocks.0.attn.qkv", "blocks.1.attn.qkv"],
                "llama-vllm": ["model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.gate_up_proj"]}[name]
    assert interleaved == expected
    assert all(r.notes[-1] == "kept fused: rows interleaved for 4 devices" for t, r in records.items() if r.layout is Layout.INTERLEAVED)
    code = gm.code
    assert not InterleaveFusedLinear({"tp": 4})(gm).modified and gm.code == code
    # Split skips interleaved layers; rewiring then removes every join of parts.
    SplitFusedLinear()(gm)
    RewireFusedConsumers()(gm)
    assert not [c for c in gm.graph.find_nodes(op="call_function", target=torch.cat)
                if all(a.op == "call_function" and a.target is fused_part for a in c.args[0])]
    torch.testing.assert_close(gm(*inputs), model(*inputs))
    expected_sd = model.state_dict()
    assert list(gm.state_dict()) == list(expected_sd)
    for key, value in gm.state_dict().items():
        torch.testing.assert_close(value, expected_sd[key], rtol=0, atol=0)


def test_interleave_fused_attention_reads_each_part_once():
    model, x = seeded(FusedAttention), torch.randn(2, 5, 32)
    gm = annotated(copy.deepcopy(model), {"qkv": QKV_32, "proj": "rowwise"})  # the pass reorders the weights in place
    assert InterleaveFusedLinear({"tp": 4})(gm).modified
    gm.graph.lint()
    torch.testing.assert_close(gm(x), model(x))
    assert len(gm.graph.find_nodes(op="call_function", target=fused_part)) == 3
    assert len(gm.graph.find_nodes(op="call_function", target=torch.cat)) == 1
    assert [n.target for n in gm.graph.find_nodes(op="call_module")] == ["qkv", "proj"]
    code = gm.code
    assert not InterleaveFusedLinear({"tp": 4})(gm).modified and gm.code == code


@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_interleave_leaves_layers_it_cannot_serve_for_the_split(skip_bias_add):
    # 2 KV heads would be cut by 4 devices; with skip_bias_add the layer also returns a bias the model adds itself.
    model, x = seeded(VllmBlock, skip_bias_add=skip_bias_add), torch.randn(2, 5, 32)
    gm = capture(copy.deepcopy(model))
    records = ShardPlan.coerce(None).resolve(linear_like_modules(gm), {"tp": 4}, "tp")
    assert AnnotateSharding({t: r for t, r in records.items() if t != "gate_up_proj"})(gm).modified  # gate_up would fit
    code = gm.code
    weight = gm.get_submodule("qkv_proj").weight.detach().clone()
    assert not InterleaveFusedLinear({"tp": 4})(gm).modified
    assert gm.code == code
    assert sharding_of(next(n for n in gm.graph.nodes if n.target == "qkv_proj")).layout is Layout.SPLIT
    torch.testing.assert_close(gm.get_submodule("qkv_proj").weight, weight, rtol=0, atol=0)
    torch.testing.assert_close(gm(x), model(x))
