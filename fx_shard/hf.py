"""Hugging Face transformers: the model's own tensor-parallel plan, and attention as einsum.

Only imported for models that carry a Hugging Face config; imports
transformers lazily.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import sys

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


# Arguments of transformers' attention functions that leave the computation as the einsum path does it
# (the masks built for the model's implementation carry sliding windows and padding).
_SAME_MATH = {"position_ids", "cache_position", "sliding_window", "use_cache", "past_key_values", "layer_idx",
              "output_attentions", "head_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
# The model's own implementation, kept on its config: the masks, and the fallback for calls einsum does not cover.
_ORIGINAL = "_fx_shard_attn_fallback"


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

    Same masking rules as transformers' sdpa path; k/v are never repeated. A
    call passing anything the einsum does not compute (``softcap``,
    ``position_bias``, attention sinks, ``output_attentions=True``, ...) runs
    the model's own implementation instead, so the function never changes.
    """
    if any(v is not None and v is not False for k, v in kwargs.items() if k not in _SAME_MATH) or kwargs.get("output_attentions"):
        own = _own_attention(module, getattr(module.config, _ORIGINAL))
        return own(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
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


def use_einsum_attention(model: nn.Module) -> str | None:
    """Point a transformers model's attention at fx_shard's einsum where that computes the same; why not, if not.

    Only models whose attention goes through transformers' attention
    functions with the ``sdpa`` or ``eager`` implementation switch (a model
    whose code chooses branches by the implementation's name, as Falcon's
    does, keeps its own). The masks stay the ones built for the model's own
    implementation. Returns None when switched or not a transformers model.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return None
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    own = {c._attn_implementation for c in configs if c._attn_implementation not in _NAMES.values()}
    if not own <= set(_NAMES):
        return f"attention implementation {sorted(own)}: kept (fx_shard replaces sdpa and eager only)"
    branching = _branches_on_implementation(model, own)
    if branching:
        return f"{branching} chooses its code by config._attn_implementation: its own attention is kept"
    no_eager = next((type(m).__name__ for m in model.modules() if "eager" in own and hasattr(m, "config")
                     and not hasattr(sys.modules[type(m).__module__], "eager_attention_forward")), None)
    if no_eager is not None:
        return f"{no_eager}'s modeling file has no eager_attention_forward to fall back on: its own attention is kept"
    masks = AttentionMaskInterface()
    for original, name in _NAMES.items():
        AttentionInterface.register(name, einsum_attention_forward)
        AttentionMaskInterface.register(name, masks[original])
    for sub_config in configs:
        if sub_config._attn_implementation in _NAMES:
            setattr(sub_config, _ORIGINAL, sub_config._attn_implementation)
            sub_config._attn_implementation = _NAMES[sub_config._attn_implementation]
    return None


def _own_attention(module: nn.Module, implementation: str):
    """The attention function the model would call: its modeling file's eager one, or transformers' registered one."""
    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers import AttentionInterface

    return AttentionInterface()[implementation]


# The einsum attention under one name per implementation it stands in for (each with that one's masks).
_NAMES = {"sdpa": ATTENTION, "eager": f"{ATTENTION}_eager"}


def _branches_on_implementation(model: nn.Module, own: set[str]) -> str | None:
    """The first model class whose modeling file branches on ``_attn_implementation`` being one of ``own``.

    Renaming the implementation changes such a branch (Falcon compares it to
    "sdpa"); a comparison with other names (GPT-2's ``== "eager"`` when the
    model runs sdpa) comes out the same either way.
    """
    for cls in dict.fromkeys(type(m) for m in model.modules()):
        if cls.__module__.startswith("transformers.models."):
            compared = _compared_names(cls.__module__)
            if compared is None or compared & own:
                return cls.__name__
    return None


@functools.cache
def _compared_names(module_name: str) -> frozenset[str] | None:
    """The names a modeling file compares ``_attn_implementation`` with; None when it compares with anything else."""
    try:
        source = inspect.getsource(sys.modules[module_name])
    except (OSError, TypeError, KeyError):
        return None
    names: set[str] = set()
    for match in re.finditer(r"_attn_implementation\s*(?:==|!=|\bnot\s+in\b|\bin\b)\s*(\S[^\n:]*)", source):
        literals = re.findall(r"[\"']([\w-]+)[\"']", match.group(1))
        if not literals or not re.match(r"[\"'(\[{]", match.group(1)):
            return None
        names.update(literals)
    return frozenset(names)
