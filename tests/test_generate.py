"""fx_shard.generate without XLA: prompt buckets, and the models it refuses with what to do."""

import pytest
import torch

import fx_shard
from fx_shard import xla
from fx_shard.generate import prompt_bucket
from tests.hf_models import build_hf, hf_inputs


def test_prompt_buckets_are_powers_of_two_from_8():
    assert [prompt_bucket(n) for n in (1, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]


def test_a_model_fx_shard_did_not_shard_is_refused_with_what_to_do():
    with pytest.raises(fx_shard.FxShardError, match=r"LlamaForCausalLM was not sharded.*fx_shard.shard\(model, mesh"):
        fx_shard.generate(build_hf("llama"), hf_inputs()["input_ids"], 4)
    # Transformed for a mesh but never placed on one: no mesh to shard the cache on.
    transformed = fx_shard.transform(build_hf("llama"), "auto", mesh_shape={"tp": 2}, example_kwargs=hf_inputs())
    with pytest.raises(fx_shard.FxShardError, match="was not sharded"):
        fx_shard.generate(transformed, torch.ones(1, 4, dtype=torch.long), 4)


def test_sliding_window_attention_is_refused_before_any_device_work():
    # Mistral's layers are sliding-window ones: StaticCache gives them a rolling layout the masks here do not follow.
    model = fx_shard.transform(build_hf("mistral"), "auto", mesh_shape={"tp": 2}, example_kwargs=hf_inputs())
    model.meta[xla.MESH_KEY] = "a mesh (never used: the refusal comes first)"
    with pytest.raises(fx_shard.FxShardError, match="MistralForCausalLM has sliding-window attention layers"):
        fx_shard.generate(model, torch.ones(1, 4, dtype=torch.long), 4)
