"""A Hugging Face model's own tensor-parallel plan under plan="auto": followed, except where it gathers the output
of a layer in a captured graph that fx_shard's analysis keeps sharded (same function, one all-gather per call fewer)."""

import torch

import fx_shard
from tests import zoo


def _records(name: str):
    model, args, kwargs = zoo.case(name).build()
    gm = fx_shard.transform(model, "auto", mesh_shape={"tp": 4}, example_inputs=args, example_kwargs=kwargs)
    torch.testing.assert_close(gm(**kwargs).logits, model(**kwargs).logits, rtol=1e-5, atol=1e-5)
    return gm.meta["sharding"].layers


def test_a_gathering_entry_of_the_model_plan_gives_way_to_the_inferred_layout_in_a_graph():
    layers = _records("phi3")  # its plan: qkv_proj and gate_up_proj colwise_gather_output
    for part in ("0", "1"):  # the MLP is a captured graph: gate_up_proj split and rewired, no all-gather
        record = layers[f"model.layers.0.mlp.gate_up_proj.{part}"]
        assert record.output_spec is None and record.specs["weight"] == ("tp", None)
        assert "(colwise_gather_output) would gather the output (an all-gather per call)" in record.source
    # The attention keeps its own code (transformers' **kwargs): its fused qkv_proj keeps the model's entry,
    # as a plain column split of it would cost more than the gather (measured: docs/zoo.md).
    assert layers["model.layers.0.self_attn.qkv_proj"].output_spec == ()
    assert layers["model.layers.0.self_attn.qkv_proj"].source == (
        "model plan 'model.layers.*.self_attn.qkv_proj' (colwise_gather_output)")


def test_the_model_plan_stands_where_the_analysis_has_nothing_better():
    layers = _records("olmo2")  # q and k feed norms over the whole hidden size
    for name in ("q_proj", "k_proj", "v_proj"):
        assert layers[f"model.layers.0.self_attn.{name}"].output_spec == ()
