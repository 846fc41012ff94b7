"""A small GPT-2 in Hugging Face naming, with ``nn.Linear`` where GPT-2 has ``Conv1D``.

Module paths are Hugging Face's (``transformer.h.0.attn.c_attn``); the top
class is ``GPT2``, not ``GPT2LMHeadModel``, so a report on it is not taken
for one on Hugging Face's model.

The fused ``attn.c_attn`` (``d -> 3d``, with bias) is split into q, k, v by
``qkv.split(d, dim=2)``: the pattern fx_shard's automatic plan must recognise
as a fused QKV. ``lm_head`` shares its weight with ``wte`` by default, as
GPT-2 does, so a plan has to handle one Parameter reached from two modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT2", "GPT2Attention", "GPT2Block", "GPT2Config", "GPT2MLP", "GPT2Model"]


@dataclass(frozen=True)
class GPT2Config:
    """Sizes of a GPT-2; field names as in Hugging Face's ``GPT2Config``."""

    vocab_size: int = 256
    n_positions: int = 64
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 8
    n_inner: int | None = None  # None: 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) is not a multiple of n_head ({self.n_head})")

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def intermediate_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


class GPT2Attention(nn.Module):
    """Causal self-attention with a fused ``c_attn`` and ``F.scaled_dot_product_attention``."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.embed_dim = config.n_embd
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.split_size = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=True)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=True)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq_len = x.shape[0], x.shape[1]
        return x.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, _ = hidden_states.size()
        qkv = self.c_attn(hidden_states)
        q, k, v = qkv.split(self.split_size, dim=2)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(bsz, seq_len, self.embed_dim)
        return self.c_proj(out)


class GPT2MLP(nn.Module):
    """``c_proj(gelu_tanh(c_fc(x)))``."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.intermediate_size, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2Model(nn.Module):
    """Token and position embeddings, blocks, final LayerNorm.

    ``position_ids`` is a non-persistent ``arange(n_positions)`` buffer,
    narrowed to the sequence length in ``forward`` (``narrow`` rather than
    ``[:seq_len]``, which fx cannot trace on a buffer); after a ``meta`` build
    and ``to_empty``, call ``reset_buffers()``.
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.register_buffer("position_ids", torch.empty(0, dtype=torch.long), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute ``position_ids`` on the buffer's current device."""
        self.position_ids = torch.arange(self.config.n_positions, device=self.position_ids.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        position_ids = self.position_ids.narrow(0, 0, input_ids.shape[1])
        hidden_states = self.wte(input_ids) + self.wpe(position_ids)
        for block in self.h:
            hidden_states = block(hidden_states)
        return self.ln_f(hidden_states)


class GPT2(nn.Module):
    """GPT-2 with a language-model head; ``forward(input_ids) -> logits``."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the very Parameter of ``wte`` if the config ties them.

        Call again after ``to_empty`` or any conversion that replaces Parameters:
        those untie shared weights.
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer(input_ids))
