"""Hugging Face attention through fx_shard's einsum: only where it computes the same, else the model's own code."""

import pytest
import torch

import fx_shard
import fx_shard.hf


def _models():
    import transformers as t

    small = dict(hidden_size=64, num_hidden_layers=1, vocab_size=256)
    return {
        # Falcon picks its code by comparing config._attn_implementation to "sdpa": switching the name changes it.
        "falcon": (t.FalconForCausalLM, t.FalconConfig(num_attention_heads=8, **small)),
        # Attention-logit softcapping: a call the einsum does not compute, run by the model's own function.
        "gemma2": (t.Gemma2ForCausalLM, t.Gemma2Config(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                                       head_dim=16, attn_logit_softcapping=2.0, final_logit_softcapping=None,
                                                       **small)),
        # A relative position bias passed to every attention call: likewise.
        "t5": (t.T5Model, t.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8, vocab_size=256)),
        # GPT-2 compares the implementation's name with "eager" only: running sdpa, the einsum stands in for it.
        "gpt2": (t.GPT2LMHeadModel, t.GPT2Config(n_embd=64, n_layer=1, n_head=8, vocab_size=256, n_positions=32)),
        "llama": (t.LlamaForCausalLM, t.LlamaConfig(intermediate_size=128, num_attention_heads=8, num_key_value_heads=2, **small)),
    }


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", ["falcon", "gemma2", "t5", "gpt2", "llama"])
def test_attention_replacement_never_changes_the_function(name, monkeypatch):
    cls, config = _models()[name]
    torch.manual_seed(0)
    model = cls(config).eval()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, **({"decoder_input_ids": ids} if name == "t5" else {})}
    expected = _output(model(**kwargs))
    gm = fx_shard.transform(model, "auto", mesh_shape={"tp": 2}, example_kwargs=kwargs)
    einsum_calls = []
    real = fx_shard.hf.einsum_attention
    monkeypatch.setattr(fx_shard.hf, "einsum_attention", lambda *a, **k: einsum_calls.append(1) or real(*a, **k))
    torch.testing.assert_close(_output(gm(**kwargs)), expected, rtol=1e-5, atol=1e-5)
    # Softcapping and T5's position bias are computed by the models' own functions; GPT-2's and Llama's by the einsum.
    assert len(einsum_calls) == (1 if name in ("gpt2", "llama") else 0)
    notes = gm.meta["sharding"].notes
    if name == "falcon":
        assert notes == ("attention: FalconForCausalLM chooses its code by config._attn_implementation: "
                         "its own attention is kept",)
        assert gm.config._attn_implementation == model.config._attn_implementation
        assert "Model code kept as written" in fx_shard.report(gm)
    else:
        assert notes == () and gm.config._attn_implementation.startswith("fx_shard_einsum")
