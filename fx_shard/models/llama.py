"""A small Llama, twice: plain ``nn.Linear`` (Hugging Face naming) and vLLM-style layers.

``Llama`` is what a user brings from Hugging Face (module paths as in
``LlamaForCausalLM``; the class named apart, so a report on it is not taken
for one on Hugging Face's model): separate
``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``, grouped-query
attention through ``F.scaled_dot_product_attention``; fx_shard has to find
the plan from the graph. ``VllmLlama`` is the same function written
with ``fx_shard.layers`` in vLLM naming (fused ``qkv_proj`` and
``gate_up_proj``, tuple-returning layers); fx_shard plans it by layer class.
``VllmLlama.load_from_hf_style`` copies one into the other, so the
two can be checked against each other.

Both trace whole with ``torch.fx.symbolic_trace``: the rotary tables are
precomputed for ``max_position_embeddings`` and narrowed to the sequence
length in ``forward`` (``buffer.narrow(0, 0, seq_len)``, because slicing a
buffer with a traced length, ``buffer[:seq_len]``, fails under fx unless the
tracer proxies buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fx_shard.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

__all__ = [
    "Llama",
    "LlamaAttention",
    "LlamaConfig",
    "LlamaDecoderLayer",
    "LlamaMLP",
    "LlamaModel",
    "LlamaRMSNorm",
    "LlamaRotaryEmbedding",
    "SiluAndMul",
    "VllmLlama",
    "VllmLlamaAttention",
    "VllmLlamaDecoderLayer",
    "VllmLlamaMLP",
    "VllmLlamaModel",
    "VllmRotaryEmbedding",
    "apply_rotary_pos_emb",
    "repeat_kv",
    "rotate_half",
]


@dataclass(frozen=True)
class LlamaConfig:
    """Sizes of a Llama; field names as in Hugging Face's ``LlamaConfig``."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 8
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 64
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}); pick kv heads that divide it"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")


# --------------------------------------------------------------------------- shared pieces


class LlamaRMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as Hugging Face does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _rope_angles(config: LlamaConfig, device: torch.device | None) -> torch.Tensor:
    """``(max_position_embeddings, head_dim // 2)`` rotation angles, position × frequency."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32, device=device)
    return torch.outer(positions, inv_freq)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension (Hugging Face's rotary helper)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``(B, H, S, D)`` queries and keys by ``(S, D)`` cos/sin tables."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, KV, S, D) -> (B, KV * n_rep, S, D)`` by ``expand`` + ``reshape``, as Hugging Face does."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def _causal_gqa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_rep: int
) -> torch.Tensor:
    """Causal SDPA over ``(B, H, S, D)`` q and ``(B, KV, S, D)`` k/v; returns ``(B, S, H * D)``."""
    k = repeat_kv(k, n_rep)
    v = repeat_kv(v, n_rep)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    bsz, num_heads, q_len, head_dim = out.shape
    return out.transpose(1, 2).reshape(bsz, q_len, num_heads * head_dim)


# --------------------------------------------------------------------------- Hugging Face style


class LlamaRotaryEmbedding(nn.Module):
    """Precomputed ``cos``/``sin`` tables ``(max_position_embeddings, head_dim)``.

    Non-persistent buffers: they are not in the ``state_dict``; after a
    ``meta`` build and ``to_empty``, call ``reset_buffers()`` to refill them.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("cos_cached", torch.empty(0), persistent=False)
        self.register_buffer("sin_cached", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the tables on the buffers' current device."""
        angles = _rope_angles(self.config, self.cos_cached.device)
        emb = torch.cat((angles, angles), dim=-1)
        self.cos_cached = emb.cos()
        self.sin_cached = emb.sin()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = x.shape[1]
        cos = self.cos_cached.narrow(0, 0, seq_len).to(dtype=x.dtype)
        sin = self.sin_cached.narrow(0, 0, seq_len).to(dtype=x.dtype)
        return cos, sin


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with separate q/k/v projections."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        hidden, kv_out = config.hidden_size, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_out, bias=False)
        self.v_proj = nn.Linear(hidden, kv_out, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, q_len, _ = hidden_states.size()
        q = self.q_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        attn_output = _causal_gqa_attention(q, k, v, self.num_key_value_groups)
        return self.o_proj(attn_output)


class LlamaMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: attention and MLP, each with a residual connection."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and the final norm; returns hidden states."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos, sin)
        return self.norm(hidden_states)


class Llama(nn.Module):
    """Llama with plain ``nn.Linear`` layers in Hugging Face naming; ``forward(input_ids) -> logits``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share ``embed_tokens.weight`` with ``lm_head`` if the config ties them (again after ``to_empty``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(input_ids))


# --------------------------------------------------------------------------- vLLM style


class VllmRotaryEmbedding(nn.Module):
    """vLLM's neox-style rotary embedding: one ``cos_sin_cache`` ``(max_pos, head_dim)``.

    The cache is ``[cos | sin]`` over ``head_dim // 2`` frequencies each, a
    non-persistent buffer as in vLLM. ``forward(q, k)`` takes ``(B, S, heads *
    head_dim)`` tensors and rotates the first ``S`` positions (vLLM indexes
    the cache by a ``positions`` tensor instead).
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.head_size = config.head_dim
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the cache on the buffer's current device."""
        angles = _rope_angles(self.config, self.cos_sin_cache.device)
        self.cos_sin_cache = torch.cat((angles.cos(), angles.sin()), dim=-1)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(shape[0], shape[1], -1, self.head_size)
        x1, x2 = torch.chunk(x, 2, dim=-1)
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        return torch.cat((o1, o2), dim=-1).reshape(shape)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos_sin = self.cos_sin_cache.narrow(0, 0, query.shape[1]).to(dtype=query.dtype)
        cos, sin = cos_sin.chunk(2, dim=-1)
        cos = cos.unsqueeze(-2)
        sin = sin.unsqueeze(-2)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)


class SiluAndMul(nn.Module):
    """vLLM's activation for a fused gate_up output: ``silu(x[..., :d]) * x[..., d:]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class _Attention(nn.Module):
    """Stands in for vLLM's ``Attention``: ``(B, S, heads * head_dim)`` q, k, v in, same layout out."""

    def __init__(self, num_heads: int, head_size: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bsz, q_len = q.shape[0], q.shape[1]
        q = q.view(bsz, q_len, -1, self.head_size).transpose(1, 2)
        k = k.view(bsz, q_len, -1, self.head_size).transpose(1, 2)
        v = v.view(bsz, q_len, -1, self.head_size).transpose(1, 2)
        return _causal_gqa_attention(q, k, v, self.num_heads // self.num_kv_heads)


class VllmLlamaAttention(nn.Module):
    """vLLM's ``LlamaAttention``: fused ``qkv_proj``, rotary, attention, ``o_proj``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, bias=False
        )
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, bias=False)
        self.rotary_emb = VllmRotaryEmbedding(config)
        self.attn = _Attention(self.num_heads, self.head_dim, self.num_kv_heads)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(q, k)
        attn_output = self.attn(q, k, v)
        output, _ = self.o_proj(attn_output)
        return output


class VllmLlamaMLP(nn.Module):
    """vLLM's ``LlamaMLP``: fused ``gate_up_proj``, ``SiluAndMul``, ``down_proj``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=False)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=False)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x = self.act_fn(gate_up)
        x, _ = self.down_proj(x)
        return x


class VllmLlamaDecoderLayer(nn.Module):
    """Pre-norm block in vLLM naming (plain residual adds, not vLLM's fused add-norm)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = VllmLlamaAttention(config)
        self.mlp = VllmLlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class VllmLlamaModel(nn.Module):
    """Vocab-parallel embedding, decoder layers and the final norm."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(VllmLlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.norm(hidden_states)


class VllmLlama(nn.Module):
    """The Llama of ``Llama`` written with ``fx_shard.layers`` in vLLM naming.

    ``forward(input_ids) -> logits`` over the real vocabulary (``ParallelLMHead``
    drops the padding rows).
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = VllmLlamaModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share ``embed_tokens.weight`` with ``lm_head`` if the config ties them (again after ``to_empty``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(input_ids))

    @torch.no_grad()
    def load_from_hf_style(self, plain: Llama) -> VllmLlama:
        """Copy the weights of a plain ``Llama`` with the same config; returns ``self``.

        q, k, v rows are concatenated into ``qkv_proj``, gate and up rows into
        ``gate_up_proj``; embedding and head rows fill the padded tables, whose
        padding rows are zeroed. Works on ``meta`` tensors too.
        """
        if plain.config != self.config:
            raise ValueError(
                f"configs differ: {plain.config} (plain) vs {self.config} (vLLM style); "
                "build both from the same LlamaConfig"
            )
        vocab = self.config.vocab_size
        self.model.embed_tokens.weight.zero_()
        self.model.embed_tokens.weight[:vocab].copy_(plain.model.embed_tokens.weight)
        for mine, theirs in zip(self.model.layers, plain.model.layers, strict=True):
            attn, mlp = theirs.self_attn, theirs.mlp
            mine.self_attn.qkv_proj.weight.copy_(
                torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight), dim=0)
            )
            mine.self_attn.o_proj.weight.copy_(attn.o_proj.weight)
            mine.mlp.gate_up_proj.weight.copy_(torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight), dim=0))
            mine.mlp.down_proj.weight.copy_(mlp.down_proj.weight)
            mine.input_layernorm.weight.copy_(theirs.input_layernorm.weight)
            mine.post_attention_layernorm.weight.copy_(theirs.post_attention_layernorm.weight)
        self.model.norm.weight.copy_(plain.model.norm.weight)
        if not self.config.tie_word_embeddings:
            self.lm_head.weight.zero_()
            self.lm_head.weight[:vocab].copy_(plain.lm_head.weight)
        return self
