"""Partition-friendly forms of attention ops, called from rewritten graphs.

torch_xla lowers ``F.scaled_dot_product_attention`` and 4-D ``matmul``
through a reshape that merges batch and heads, which loses a heads sharding:
XLA then all-gathers q, k and v. ``einsum`` with explicit batch letters
lowers to a dot with batch dimensions and keeps heads sharded (measured,
docs/measurements.md). Same numerics as the originals, in float32 to 1e-6.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fx_shard.fused import split_parts

__all__ = ["batched_matmul", "einsum", "einsum_attention", "fused_part"]

_LETTERS = "abcdefgh"


@torch.library.custom_op("fx_shard::einsum", mutates_args=())
def einsum(equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.einsum`` of two operands as one op that tracers keep whole.

    ``torch.compile(..., backend="openxla")`` traces with aot_autograd, which
    would decompose ``torch.einsum`` into ``bmm`` over merged batch*heads (the
    lowering that loses a heads sharding); a custom op reaches torch_xla as
    is, and its body lowers the einsum with batch dims kept.
    """
    return torch.einsum(equation, a, b)


@einsum.register_fake
def _(equation, a, b):
    return torch.einsum(equation, a, b)


def _einsum_setup(ctx, inputs, output):
    ctx.equation, a, b = inputs
    ctx.save_for_backward(a, b)


def _einsum_backward(ctx, grad):
    # "A,B->O": every index of A appears in B or O (and of B in A or O) for the equations used here.
    a, b = ctx.saved_tensors
    operands, out = ctx.equation.split("->")
    sub_a, sub_b = operands.split(",")
    grad_a = einsum(f"{out},{sub_b}->{sub_a}", grad, b) if ctx.needs_input_grad[1] else None
    grad_b = einsum(f"{sub_a},{out}->{sub_b}", a, grad) if ctx.needs_input_grad[2] else None
    return None, grad_a, grad_b


einsum.register_autograd(_einsum_backward, setup_context=_einsum_setup)


def fused_part(y: torch.Tensor, index: int, sizes: tuple[int, ...], ways: int) -> torch.Tensor:
    """Part ``index`` of a fused output whose features are interleaved per device.

    The layout is ``[P0_0 P1_0 ... | P0_1 P1_1 ... | ...]``: block ``d`` of
    ``ways`` holds device ``d``'s share of every part (``join_parts`` with
    ``ways`` groups), so these views and slices stay on each device.
    """
    return split_parts(y, sizes, ways)[index]


def batched_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``; as an einsum over explicit batch dims when both are at least 4-D of one rank."""
    if a.dim() != b.dim() or a.dim() < 4:
        return torch.matmul(a, b)
    batch = _LETTERS[: a.dim() - 2]
    return einsum(f"{batch}ij,{batch}jk->{batch}ik", a, b)


def einsum_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the same arguments, as einsums.

    Inputs are ``(batch, heads, seq, head_dim)``. With fewer k/v heads than
    q heads (``enable_gqa``) q is viewed as ``(batch, kv_heads, group, seq,
    head_dim)`` and k/v are never repeated.
    """
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.size(-3), key.size(-2)
    grouped = enable_gqa and kv_heads != heads
    if grouped:
        query = query.reshape(batch, kv_heads, heads // kv_heads, q_len, head_dim)
        scores = einsum("bgrqd,bgkd->bgrqk", query, key)
    else:
        scores = einsum("bhqd,bhkd->bhqk", query, key)
    scores = scores * scale
    if is_causal:
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if grouped:
            full = attn_mask.expand(batch, heads, q_len, kv_len)
            attn_mask = full.reshape(batch, kv_heads, heads // kv_heads, q_len, kv_len)
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if attn_mask is not None:  # as sdpa: a query that may attend to nothing gets zeros, not NaN
        probs = probs.masked_fill((scores == float("-inf")).all(dim=-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    if grouped:
        out = einsum("bgrqk,bgkd->bgrqd", probs, value)
        return out.reshape(batch, heads, q_len, head_dim)
    return einsum("bhqk,bhkd->bhqd", probs, value)
