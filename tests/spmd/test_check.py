"""shard()'s self-check on the XLA mesh: run by default given example inputs, shown in the report, and a
sharding that breaks the function refused, naming where it first diverges."""

import re

import pytest

import fx_shard
from fx_shard import models
from fx_shard.check import CHECK_KEY
from fx_shard.models.plans import PLANS
from fx_shard.ops import einsum_attention
from fx_shard.passes import attention_to_einsum


def test_shard_checks_itself_given_example_inputs(mesh):
    model, inputs = models.build("gpt2"), models.example_inputs("gpt2")
    model.train()  # the check runs both in eval() and leaves each as it was
    gm = fx_shard.shard(model, mesh, PLANS["gpt2"], example_inputs=inputs)
    result = gm.meta[CHECK_KEY]
    assert result.ok and 0 <= result.error < 1e-6 and result.tolerance == 1e-5
    assert model.training and gm.training
    assert f"- {result}" in fx_shard.report(gm).splitlines()
    # Without example inputs, or with check=False, nothing runs and the report says nothing of it.
    for unchecked in (fx_shard.shard(model, mesh, PLANS["gpt2"]),
                      fx_shard.shard(model, mesh, PLANS["gpt2"], example_inputs=inputs, check=False)):
        assert CHECK_KEY not in unchecked.meta and "self-check" not in fx_shard.report(unchecked)


def test_a_sharding_that_changes_the_function_is_refused(mesh, monkeypatch):
    # The failure issue 11 measured: an attention replacement that drops an argument (here the causal mask).
    def attention_without_causal_mask(*args, is_causal=False, **kwargs):
        return einsum_attention(*args, **kwargs)

    monkeypatch.setattr(attention_to_einsum, "einsum_attention", attention_without_causal_mask)
    model, inputs = models.build("llama", num_hidden_layers=1), models.example_inputs("llama")
    with pytest.raises(fx_shard.FxShardError) as raised:
        fx_shard.shard(model, mesh, PLANS["llama"], example_inputs=inputs)
    lines = str(raised.value).splitlines()
    assert lines[0] == "the sharded Llama does not compute what the original does:"
    assert lines[1].startswith("self-check: DISAGREES with the original model on the example inputs (error ")
    # Attention is the model's own code between v_proj and o_proj: o_proj is the first layer to see it.
    assert re.fullmatch(r"first diverging module: model\.layers\.0\.self_attn\.o_proj \(error \d\.\de[+-]\d\d\); the last "
                        r"agreeing module before it: model\.layers\.0\.self_attn\.v_proj \(error \d\.\de-0[6-9]\)", lines[2])
    assert "shard(..., check=False) returns the sharded model unchecked" in lines[3]
    gm = fx_shard.shard(model, mesh, PLANS["llama"], example_inputs=inputs, check=False)
    assert fx_shard.check(gm, model, inputs).first_divergence == "model.layers.0.self_attn.o_proj"
