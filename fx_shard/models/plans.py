"""Explicit tensor-parallel plans for the built-in models (plans as data)."""

from __future__ import annotations

__all__ = ["PLANS"]

PLANS: dict[str, dict[str, str | dict]] = {
    "llama": {
        "model.embed_tokens": "vocab",
        "*.self_attn.q_proj": "colwise",
        "*.self_attn.k_proj": "colwise",
        "*.self_attn.v_proj": "colwise",
        "*.self_attn.o_proj": "rowwise",
        "*.mlp.gate_proj": "colwise",
        "*.mlp.up_proj": "colwise",
        "*.mlp.down_proj": "rowwise",
        "lm_head": "lm_head",
    },
    # vLLM-style layers: the class-name rules decide; the plan adds nothing.
    "llama-vllm": {},
    "gpt2": {
        "transformer.wte": "vocab",
        "transformer.wpe": "replicate",
        "*.attn.c_attn": {"style": "qkv", "num_heads": 8},  # a Conv1D: the plan says how it splits
        "*.attn.c_proj": "rowwise",
        "*.mlp.c_fc": "colwise",
        "*.mlp.c_proj": "rowwise",
        "lm_head": "lm_head",
    },
    "vit": {
        "*.attn.qkv": {"style": "qkv", "num_heads": 8},  # an nn.Linear: the plan says how it splits
        "*.attn.proj": "rowwise",
        "*.mlp.fc1": "colwise",
        "*.mlp.fc2": "rowwise",
        "head": "replicate",  # 10 classes: too few to split
    },
}
