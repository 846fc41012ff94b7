"""Small Hugging Face models with random weights (nothing is downloaded)."""

import torch

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=64)
HF_MODELS = ("llama", "qwen2", "mistral", "gpt2")


def build_hf(name: str) -> torch.nn.Module:
    import transformers as t

    config = {
        "llama": lambda: t.LlamaConfig(**SMALL),
        "qwen2": lambda: t.Qwen2Config(**SMALL),  # q/k/v with biases
        "mistral": lambda: t.MistralConfig(**SMALL),
        "gpt2": lambda: t.GPT2Config(n_embd=64, n_layer=2, n_head=8, vocab_size=256, n_positions=64,
                                     bos_token_id=0, eos_token_id=0),
    }[name]()
    config.bos_token_id = config.eos_token_id = 0
    cls = {"llama": t.LlamaForCausalLM, "qwen2": t.Qwen2ForCausalLM, "mistral": t.MistralForCausalLM, "gpt2": t.GPT2LMHeadModel}[name]
    torch.manual_seed(0)
    return cls(config).eval()


def hf_inputs(batch: int = 2, seq: int = 16) -> dict:
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "use_cache": False}
