"""A Hugging Face model's own tensor-parallel plan under plan="auto": followed, except where it gathers an output
that fx_shard's analysis keeps sharded (same function, an all-gather per call fewer)."""

import torch

import fx_shard
from tests import zoo


def _records(name: str):
    model, args, kwargs = zoo.case(name).build()
    gm = fx_shard.transform(model, "auto", mesh_shape={"tp": 4}, example_inputs=args, example_kwargs=kwargs)
    torch.testing.assert_close(gm(**kwargs).logits, model(**kwargs).logits, rtol=1e-5, atol=1e-5)
    return gm.meta["sharding"].layers


def test_a_gathering_entry_of_the_model_plan_gives_way_to_the_inferred_layout():
    layers = _records("phi3")  # its plan: qkv_proj and gate_up_proj colwise_gather_output
    for path in ("model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj.0"):
        record = layers[path]
        assert record.output_spec is None and record.specs["weight"] == ("tp", None)
        assert "(colwise_gather_output) would gather the output (an all-gather per call)" in record.source
    assert layers["model.layers.0.self_attn.o_proj"].source == "model plan 'model.layers.*.self_attn.o_proj' (rowwise_split_input)"


def test_the_model_plan_stands_where_the_analysis_needs_the_output_whole():
    layers = _records("olmo2")  # q and k go through norms over the whole hidden size; v does not
    assert layers["model.layers.0.self_attn.q_proj"].output_spec == ()
    assert layers["model.layers.0.self_attn.q_proj"].source == (
        "model plan 'model.layers.*.self_attn.q_proj' (colwise_gather_output)")
    assert layers["model.layers.0.self_attn.v_proj"].output_spec is None
