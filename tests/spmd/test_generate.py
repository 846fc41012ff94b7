"""fx_shard.generate on a Hugging Face Llama sharded on 4 devices: tokens, compilations, the KV cache's layout."""

import pytest
import torch
from conftest import local_shapes, relative_error

import fx_shard
from fx_shard import xla
from fx_shard.hlo import collectives_in, dump_snapshot, partitioned_modules
from tests.hf_models import build_hf, hf_inputs

NEW = 32


def reference(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """transformers' own greedy generation on the CPU, with no stop token (fx_shard.generate has none)."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)


def prompts(seed: int, length: int = 8) -> torch.Tensor:
    return torch.randint(1, 256, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama(mesh):
    model = build_hf("llama")  # 8 heads, 2 KV heads: k/v (and so the cache) over the sub-axis "tp:2"
    return model, fx_shard.shard(model, mesh, "auto", example_kwargs=hf_inputs())


@pytest.mark.devices(4)
def test_greedy_tokens_compile_once_with_the_cache_sharded(llama):
    model, sharded = llama
    ids = prompts(1)
    dump = xla.require_hlo_dump()
    before, compiled = dump_snapshot(dump), xla.compilations()
    tokens, cache = fx_shard.generate(sharded, ids, NEW, return_cache=True)
    # One prefill (prompt bucket 8) and one decode step (cache of 64 = next power of two of 8 + 32), for 32 tokens.
    assert xla.compilations() - compiled == 2
    assert torch.equal(tokens, reference(model, ids))
    decode = partitioned_modules(dump, before)[-1]
    # The decode step: 2 all-reduces per block + 1 for the vocabulary-sharded embedding; the argmax of the
    # vocabulary-sharded logits gathers one (max, index) pair per device and row; the cache updates add nothing.
    stats = {op: (s.count, s.bytes) for op, s in collectives_in([decode]).items() if s.count}
    assert stats == {"all-reduce": (5, stats["all-reduce"][1]), "all-gather": (2, 2 * 2 * 4 * 4)}
    with torch.no_grad():
        prompt_cache = model(ids, use_cache=True).cache  # the unsharded model's own cache of the prompt
    assert len(cache) == len(prompt_cache.layers) == 2
    for (keys, values), own in zip(cache, prompt_cache.layers):
        assert keys.shape == values.shape == (2, 2, 64, 8)
        assert local_shapes(keys) == local_shapes(values) == {(2, 1, 64, 8)}  # one KV head on each pair of devices
        # The prompt (bucket 8, no pads) in the first 8 slots, as the unsharded model computes it.
        assert relative_error(keys[:, :, :8], own.keys) <= 1e-4 and relative_error(values[:, :, :8], own.values) <= 1e-4

    again = xla.compilations()
    ids = prompts(2)
    assert torch.equal(fx_shard.generate(sharded, ids, NEW), reference(model, ids))
    assert xla.compilations() == again


@pytest.mark.devices(4)
def test_left_padding_and_top_1_sampling_give_the_unpadded_greedy_tokens(llama):
    model, sharded = llama
    short, full = prompts(3, length=5), prompts(4)
    ids = torch.cat([torch.nn.functional.pad(short[:1], (3, 0)), full[1:]])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    tokens = fx_shard.generate(sharded, ids, NEW, attention_mask=mask)
    assert torch.equal(tokens[0, 3:], reference(model, short[:1])[0])
    assert torch.equal(tokens[1], reference(model, full[1:])[0])
    sampled = fx_shard.generate(sharded, ids, NEW, attention_mask=mask, do_sample=True, temperature=0.7, top_k=1)
    assert torch.equal(sampled, tokens)
