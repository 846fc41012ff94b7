"""Hugging Face transformers: the model's own tensor-parallel plan, and attention as einsum.

Only imported for models that carry a Hugging Face config; imports
transformers lazily.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fx_shard import styles
from fx_shard.ops import einsum_attention
from fx_shard.plan import Decision, first_match
from fx_shard.sharding import SourceKind
from fx_shard.styles import LayerPlan, LMHead, Replicate

__all__ = ["ATTENTION", "hf_plan", "use_einsum_attention"]

logger = logging.getLogger(__name__)

ATTENTION = "fx_shard_einsum"

def hf_plan(model: nn.Module) -> dict[str, Decision]:
    """``model``'s own plan (``_tp_plan``, else ``config.base_model_tp_plan``) as ``{pattern: decision}``.

    Each Hugging Face style maps to the fx_shard style that names it in its
    ``hf_styles``; one no style names (experts, MLA, other dimensions) is
    replicated. The LM head (``get_output_embeddings``) planned
    ``colwise_gather_output`` becomes style ``lm_head``: transformers gathers the logits on every device, fx_shard
    keeps them vocabulary-sharded until they are read (same values, no all-gather).
    """
    plan = dict(getattr(model, "_tp_plan", None) or {})
    config = getattr(model, "config", None)
    if not plan and config is not None and getattr(config, "base_model_tp_plan", None):
        prefix = getattr(model, "base_model_prefix", "")
        base = prefix if prefix and hasattr(model, prefix) else ""
        plan = {f"{base}.{k}" if base else k: v for k, v in config.base_model_tp_plan.items()}
    head = _output_embeddings_path(model)
    mapped = {}
    for pattern, style in plan.items():
        layer = styles.from_hf(style)
        if layer is None:
            logger.info("Hugging Face plan entry %r: style %r has no fx_shard equivalent; replicated", pattern, style)
            layer = LayerPlan(Replicate.name)
        if style == "colwise_gather_output" and head is not None and first_match({pattern: None}, head) is not None:
            layer, style = LayerPlan(LMHead.name), f"{style}; fx_shard keeps the logits vocabulary-sharded"
        mapped[pattern] = Decision(layer, SourceKind.MODEL_PLAN, f"model plan {pattern!r} ({style})")
    return mapped


def _output_embeddings_path(model: nn.Module) -> str | None:
    """The module path of the model's LM head (``get_output_embeddings``), if it has one."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return next((path for path, m in model.named_modules() if m is head), None) if head is not None else None


def einsum_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over ``fx_shard.ops.einsum_attention``.

    Same masking rules as transformers' sdpa path; k/v are never repeated.
    """
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    out = einsum_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def use_einsum_attention(model: nn.Module) -> bool:
    """Point a transformers model (its config) at fx_shard's einsum attention; False if it is not one."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, einsum_attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks transformers builds for sdpa
    for module in model.modules():
        sub_config = getattr(module, "config", None)
        if sub_config is not None and hasattr(sub_config, "_attn_implementation"):
            sub_config._attn_implementation = ATTENTION
    return True
