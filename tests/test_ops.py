"""fx_shard.ops: the einsum forms compute what sdpa and matmul compute."""

import pytest
import torch
import torch.nn.functional as F

from fx_shard.ops import batched_matmul, einsum_attention


def qkv(heads=4, kv_heads=4, q_len=5, kv_len=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, q_len, dim, generator=g)
    k = torch.randn(2, kv_heads, kv_len, dim, generator=g)
    v = torch.randn(2, kv_heads, kv_len, dim, generator=g)
    return q, k, v


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_matches_sdpa(is_causal, scale):
    q, k, v = qkv()
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    torch.testing.assert_close(einsum_attention(q, k, v, is_causal=is_causal, scale=scale), expected)


def test_causal_with_longer_keys_is_top_left_aligned_like_sdpa():
    q, k, v = qkv(q_len=3, kv_len=6)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(einsum_attention(q, k, v, is_causal=True), expected)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_attention_masks(mask_dtype):
    q, k, v = qkv()
    g = torch.Generator().manual_seed(1)
    if mask_dtype is torch.bool:
        mask = torch.rand(2, 1, 5, 5, generator=g) > 0.3
        mask[..., 0] = True  # every query sees something
    else:
        mask = torch.randn(2, 1, 5, 5, generator=g)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(einsum_attention(q, k, v, attn_mask=mask), expected)


@pytest.mark.parametrize("is_causal", [False, True])
def test_grouped_query_attention(is_causal):
    q, k, v = qkv(heads=8, kv_heads=2)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    torch.testing.assert_close(einsum_attention(q, k, v, is_causal=is_causal, enable_gqa=True), expected)


def test_grouped_query_attention_with_mask():
    q, k, v = qkv(heads=8, kv_heads=2)
    mask = torch.randn(2, 8, 5, 5)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(einsum_attention(q, k, v, attn_mask=mask, enable_gqa=True), expected)


@pytest.mark.parametrize("gqa", [False, True])
def test_fully_masked_rows_give_zeros_like_sdpa(gqa):
    q, k, v = qkv(heads=8, kv_heads=2 if gqa else 8)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[0, :, :2] = False  # two queries of the first sequence see nothing (left padding)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    actual = einsum_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    assert not actual.isnan().any()
    torch.testing.assert_close(actual, expected)


def test_dropout_is_applied_when_asked():
    q, k, v = qkv()
    torch.manual_seed(0)
    a = einsum_attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(a, einsum_attention(q, k, v))


@pytest.mark.parametrize(("a_shape", "b_shape"), [((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 3, 4, 5), (2, 3, 5, 6)), ((2, 2, 3, 4, 5), (2, 2, 3, 5, 6)), ((2, 3, 4, 5), (5, 6))])
def test_batched_matmul(a_shape, b_shape):
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    torch.testing.assert_close(batched_matmul(a, b), a @ b)
