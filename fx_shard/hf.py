"""Hugging Face transformers: the model's own tensor-parallel plan, and attention as einsum.

Only imported for models that carry a Hugging Face config; imports
transformers lazily.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fx_shard.ops import einsum_attention
from fx_shard.plan import LayerPlan

__all__ = ["ATTENTION", "HF_STYLES", "hf_plan", "use_einsum_attention"]

logger = logging.getLogger(__name__)

ATTENTION = "fx_shard_einsum"

# transformers' tensor-parallel styles as fx_shard layer plans. Styles that
# shard other dimensions (embedding_colwise), experts or MLA are replicated.
HF_STYLES: dict[str, LayerPlan] = {
    "colwise": LayerPlan("colwise"),
    "local_colwise": LayerPlan("colwise"),
    "colwise_rep": LayerPlan("colwise", gather_output=True),
    "colwise_gather_output": LayerPlan("colwise", gather_output=True),
    "rowwise": LayerPlan("rowwise"),
    "local_rowwise": LayerPlan("rowwise"),
    "rowwise_rep": LayerPlan("rowwise"),
    "rowwise_split_input": LayerPlan("rowwise"),
    "packed_colwise": LayerPlan("merged_colwise"),
    "packed_rowwise": LayerPlan("rowwise"),
    "embedding_rowwise": LayerPlan("vocab"),
    "replicate": LayerPlan("replicate"),
    "gather": LayerPlan("replicate"),
    "local": LayerPlan("replicate"),
    "sequence_parallel": LayerPlan("replicate"),
    "replicated_with_grad_allreduce": LayerPlan("replicate"),
}


def hf_plan(model: nn.Module) -> dict[str, tuple[LayerPlan, str]]:
    """``model``'s own plan (``_tp_plan``, else ``config.base_model_tp_plan``) as ``{pattern: (plan, hf style)}``.

    An LM head planned ``colwise_gather_output`` becomes style ``lm_head``:
    transformers gathers the logits on every device, fx_shard keeps them
    vocabulary-sharded until they are read (same values, no all-gather).
    """
    plan = dict(getattr(model, "_tp_plan", None) or {})
    config = getattr(model, "config", None)
    if not plan and config is not None and getattr(config, "base_model_tp_plan", None):
        prefix = getattr(model, "base_model_prefix", "")
        base = prefix if prefix and hasattr(model, prefix) else ""
        plan = {f"{base}.{k}" if base else k: v for k, v in config.base_model_tp_plan.items()}
    mapped = {}
    for pattern, style in plan.items():
        layer = HF_STYLES.get(style)
        if layer is None:
            logger.info("Hugging Face plan entry %r: style %r has no fx_shard equivalent; replicated", pattern, style)
            layer = LayerPlan("replicate")
        if style == "colwise_gather_output" and pattern.rsplit(".", 1)[-1] == "lm_head":
            layer, style = LayerPlan("lm_head"), f"{style}; fx_shard keeps the logits vocabulary-sharded"
        mapped[pattern] = (layer, style)
    return mapped


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
