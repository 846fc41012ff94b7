"""torch.nn's attention and transformer layers, in code torch.fx traces.

torch.fx keeps every ``torch.nn`` module a leaf, so a model built from
``nn.MultiheadAttention`` or ``nn.TransformerEncoder`` is one opaque call per
block: its packed ``in_proj_weight`` is never sharded. Their forwards cannot
be traced as written (fast paths and checks branch on tensor values). Here
each has a traceable form: the slow path of its own forward, for the
arguments that path takes as they are; attention written with heads as an
explicit dimension, so XLA partitions it over heads.

The capture tracer (``capture.LinearLeafTracer``) inlines a module with
``traceable_form``; for any other call (masks it would have to canonicalize,
cross-attention, attention weights asked for) it returns the reason and the
module stays a leaf, computing exactly what it did. A graph that asserts the
input rank keeps an unbatched call from silently taking the batched code.

The packed projection becomes a ``call_module`` of ``in_proj``, an
``nn.Linear`` sharing the module's own ``in_proj_weight`` / ``in_proj_bias``
(``packed_projections_to_modules``), so the plan and the passes see a fused
QKV layer like any other; ``state_dict`` keeps the original keys.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["IN_PROJ", "packed_projections_to_modules", "restore_packed_keys", "saved_key", "traceable_form"]

IN_PROJ = "in_proj"

Form = Callable[..., object]


def traceable_form(module: nn.Module, args: tuple, kwargs: dict) -> tuple[Form | None, str | None]:
    """``(form, None)``: a function ``form(training, *args, **kwargs)`` computing ``module(*args, **kwargs)``
    in traceable code (``training()`` gives the module's mode as the graph reads it when it runs); ``(None, why)`` when this
    call is not one the traceable form covers; ``(None, None)`` when the module has none."""
    for cls, (signature, check, form) in _FORMS.items():
        if type(module) is cls:
            bound = signature(*args, **kwargs)
            why = check(module, **bound)
            return (None, why) if why else (lambda training, *a, **k: form(module, training, **signature(*a, **k)), None)
    return None, None


def _mha_arguments(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                   average_attn_weights=True, is_causal=False) -> dict:
    return dict(query=query, key=key, value=value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, is_causal=is_causal)


def _mha_check(m: nn.MultiheadAttention, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal) -> str | None:
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return "separate q/k/v weights, bias_k/bias_v or add_zero_attn"
    if not (query is key is value):
        return "not self-attention (query, key and value differ)"
    if need_weights is not False:
        return "need_weights is not False (attention weights asked for)"
    if key_padding_mask is not None or (attn_mask is not None and is_causal is not True):
        return "a mask other than causal (is_causal=True)"
    if not isinstance(is_causal, bool):
        return "is_causal is not a constant"
    if is_causal and attn_mask is None:
        return "is_causal=True without attn_mask (which nn.MultiheadAttention refuses)"
    return None


def _multihead_attention(m: nn.MultiheadAttention, training, query, key, value, key_padding_mask, need_weights,
                         attn_mask, is_causal) -> tuple[torch.Tensor, None]:
    """``F.multi_head_attention_forward`` for packed self-attention without weights: heads explicit, mask dropped
    when ``is_causal`` (as that function does when no padding mask is given)."""
    torch._assert(query.dim() == 3, "nn.MultiheadAttention traced for batched (3-D) inputs")
    x = query.transpose(1, 0) if m.batch_first else query
    seq, batch, embed = x.shape
    heads, head_dim = m.num_heads, m.head_dim
    q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(seq, batch, heads, head_dim).permute(1, 2, 0, 3) for t in (q, k, v))
    dropout_p = operator.mul(training(), m.dropout) if m.dropout else 0.0
    out = F.scaled_dot_product_attention(q, k, v, None, dropout_p, is_causal)
    out = m.out_proj(out.permute(2, 0, 1, 3).reshape(seq, batch, embed))
    return (out.transpose(1, 0) if m.batch_first else out), None


def _encoder_layer_arguments(src, src_mask=None, src_key_padding_mask=None, is_causal=False) -> dict:
    return dict(src=src, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)


def _no_masks(m: nn.Module, src, src_mask, src_key_padding_mask, is_causal) -> str | None:
    return "called with a mask" if src_mask is not None or src_key_padding_mask is not None else None


def _encoder_layer(m: nn.TransformerEncoderLayer, training, src, src_mask, src_key_padding_mask, is_causal) -> torch.Tensor:
    """``nn.TransformerEncoderLayer.forward`` without masks: its slow path, its own blocks."""
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), None, None, is_causal=is_causal)
        return x + m._ff_block(m.norm2(x))
    x = m.norm1(x + m._sa_block(x, None, None, is_causal=is_causal))
    return m.norm2(x + m._ff_block(x))


def _encoder_arguments(src, mask=None, src_key_padding_mask=None, is_causal=None) -> dict:
    return dict(src=src, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)


def _encoder(m: nn.TransformerEncoder, training, src, src_mask, src_key_padding_mask, is_causal) -> torch.Tensor:
    """``nn.TransformerEncoder.forward`` without masks (no nested tensors then): each layer, then the norm."""
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=None, is_causal=is_causal is True, src_key_padding_mask=None)
    return m.norm(out) if m.norm is not None else out


def _decoder_layer_arguments(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                             memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False) -> dict:
    return dict(tgt=tgt, memory=memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


def _causal_or_no_mask(m: nn.Module, tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                       tgt_is_causal, memory_is_causal) -> str | None:
    if memory_mask is not None or tgt_key_padding_mask is not None or memory_key_padding_mask is not None:
        return "called with a memory or padding mask"
    if tgt_mask is not None and tgt_is_causal is not True:
        return "a target mask not declared causal (tgt_is_causal=True)"
    return None


def _decoder_layer(m: nn.TransformerDecoderLayer, training, **arguments) -> torch.Tensor:
    """``nn.TransformerDecoderLayer.forward``: its own code, which traces (no fast path)."""
    return nn.TransformerDecoderLayer.forward(m, **arguments)


def _decoder(m: nn.TransformerDecoder, training, tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
             memory_key_padding_mask, tgt_is_causal, memory_is_causal) -> torch.Tensor:
    """``nn.TransformerDecoder.forward`` for a causal or no target mask: each layer, then the norm."""
    out = tgt
    for layer in m.layers:
        out = layer(out, memory, tgt_mask=tgt_mask, tgt_is_causal=tgt_is_causal is True, memory_is_causal=memory_is_causal)
    return m.norm(out) if m.norm is not None else out


def _transformer_arguments(src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                           tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None,
                           tgt_is_causal=None, memory_is_causal=False) -> dict:
    return dict(src=src, tgt=tgt, src_mask=src_mask, tgt_mask=tgt_mask, memory_mask=memory_mask,
                src_key_padding_mask=src_key_padding_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask, src_is_causal=src_is_causal, tgt_is_causal=tgt_is_causal,
                memory_is_causal=memory_is_causal)


def _transformer_check(m: nn.Transformer, src, tgt, src_mask, tgt_mask, memory_mask, src_key_padding_mask,
                       tgt_key_padding_mask, memory_key_padding_mask, src_is_causal, tgt_is_causal, memory_is_causal) -> str | None:
    if src_mask is not None or src_key_padding_mask is not None:
        return "called with a source mask"
    return _causal_or_no_mask(m, tgt, None, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                              tgt_is_causal, memory_is_causal)


def _transformer(m: nn.Transformer, training, src, tgt, src_mask, tgt_mask, memory_mask, src_key_padding_mask,
                 tgt_key_padding_mask, memory_key_padding_mask, src_is_causal, tgt_is_causal, memory_is_causal) -> torch.Tensor:
    """``nn.Transformer.forward``: encoder then decoder (its input checks as graph assertions)."""
    batch = 0 if m.batch_first else 1
    torch._assert(src.size(batch) == tgt.size(batch), "the batch number of src and tgt must be equal")
    memory = m.encoder(src, mask=None, src_key_padding_mask=None, is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_mask=tgt_mask, tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


_FORMS: dict[type, tuple[Callable[..., dict], Callable[..., str | None], Form]] = {
    nn.MultiheadAttention: (_mha_arguments, _mha_check, _multihead_attention),
    nn.TransformerEncoderLayer: (_encoder_layer_arguments, _no_masks, _encoder_layer),
    nn.TransformerEncoder: (_encoder_arguments, _no_masks, _encoder),
    nn.TransformerDecoderLayer: (_decoder_layer_arguments, _causal_or_no_mask, _decoder_layer),
    nn.TransformerDecoder: (_decoder_layer_arguments, _causal_or_no_mask, _decoder),
    nn.Transformer: (_transformer_arguments, _transformer_check, _transformer),
}


def packed_projections_to_modules(graph: fx.Graph, model: nn.Module) -> dict[str, nn.Linear]:
    """``F.linear(x, mha.in_proj_weight, mha.in_proj_bias)`` becomes ``mha.in_proj(x)``.

    Returns the ``nn.Linear`` layers to install, by path, each sharing the
    attention's own parameters (the same ``Parameter`` objects).
    """
    layers: dict[str, nn.Linear] = {}
    for node in list(graph.find_nodes(op="call_function", target=F.linear)):
        weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".in_proj_weight")):
            continue
        path = weight.target[: -len(".in_proj_weight")]
        owner = model.get_submodule(path)
        if not isinstance(owner, nn.MultiheadAttention):
            continue
        if path not in layers:
            out_features, in_features = owner.in_proj_weight.shape
            layer = nn.Linear(in_features, out_features, bias=False, device="meta")
            layer.weight = owner.in_proj_weight
            layer.bias = owner.in_proj_bias
            layers[path] = layer
        with graph.inserting_before(node):
            value = graph.call_module(f"{path}.{IN_PROJ}", (node.args[0],))
        value.meta.update(node.meta)
        node.replace_all_uses_with(value)
        graph.erase_node(node)
        for used in (weight, bias):
            if isinstance(used, fx.Node) and not used.users:
                graph.erase_node(used)
    return layers


def restore_packed_keys(owner: nn.Module) -> None:
    """``owner.in_proj.weight`` / ``.bias`` saved and loaded as ``owner.in_proj_weight`` / ``in_proj_bias``,
    first among the owner's keys as in ``nn.MultiheadAttention``."""
    owner._register_state_dict_hook(_save_packed)
    owner._register_load_state_dict_pre_hook(_load_packed)
    owner._fx_shard_packed_in_proj = True


def saved_key(root: nn.Module, key: str) -> str:
    """The ``state_dict`` key of tensor ``key`` (a path in ``root``): an ``in_proj`` layer's under its attention's names."""
    path, _, field = key.rpartition(".")
    owner, _, name = path.rpartition(".")
    if name == IN_PROJ and field in ("weight", "bias"):
        if getattr(root.get_submodule(owner), "_fx_shard_packed_in_proj", False):
            return f"{owner}.in_proj_{field}" if owner else f"in_proj_{field}"
    return key


def _save_packed(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    mine = [key for key in state_dict if key.startswith(prefix)]
    moved = {key: state_dict.pop(key) for key in mine}
    renamed = {_packed_name(key, prefix): value for key, value in moved.items()}
    first = [prefix + "in_proj_weight", prefix + "in_proj_bias"]
    for key in [k for k in first if k in renamed] + [k for k in renamed if k not in first]:
        state_dict[key] = renamed[key]


def _packed_name(key: str, prefix: str) -> str:
    for field in ("weight", "bias"):
        if key == f"{prefix}{IN_PROJ}.{field}":
            return f"{prefix}in_proj_{field}"
    return key


def _load_packed(state_dict: dict, prefix: str, *args) -> None:
    for field in ("weight", "bias"):
        if prefix + f"in_proj_{field}" in state_dict:
            state_dict[f"{prefix}{IN_PROJ}.{field}"] = state_dict.pop(prefix + f"in_proj_{field}")
