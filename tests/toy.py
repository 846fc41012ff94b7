"""Tiny models for pass and plan tests (CPU, no XLA)."""

import torch
import torch.nn.functional as F
from torch import nn

from fx_shard.layers import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

# The plan entry of the toys' fused q/k/v (32 features each): a plain layer's plan says how it splits.
QKV_32 = {"style": "qkv", "output_sizes": [32, 32, 32]}


class FusedAttention(nn.Module):
    """A GPT-2-like attention core with a fused nn.Linear qkv split three ways."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.dim, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


class VllmBlock(nn.Module):
    """vLLM-style layers returning (output, bias) tuples, with GQA sizes."""

    def __init__(self, skip_bias_add: bool = False) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(32, 8, 4, 2, bias=True, skip_bias_add=skip_bias_add)
        self.o_proj = RowParallelLinear(32, 32, bias=True)
        self.gate_up_proj = MergedColumnParallelLinear(32, [64, 64], bias=False)
        self.down_proj = RowParallelLinear(64, 32, bias=False)
        self.skip_bias_add = skip_bias_add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, qkv_bias = self.qkv_proj(x)
        if self.skip_bias_add:
            qkv = qkv + qkv_bias
        q, k, v = qkv.split([32, 16, 16], dim=-1)
        h, _ = self.o_proj(q * torch.cat([k, v], dim=-1))
        gate_up, _ = self.gate_up_proj(h)
        d = gate_up.shape[-1] // 2
        out, _ = self.down_proj(F.silu(gate_up[..., :d]) * gate_up[..., d:])
        return out


def seeded(cls, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs).eval()


class HeadsAttention(nn.Module):
    """Fused qkv consumed in one of the common ways (``layout``), attention by sdpa or matmul."""

    def __init__(self, layout: str, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.layout, self.dim, self.heads = layout, dim, heads
        if layout == "joined_bias":  # timm BEiT: separate q and v biases, k's zero
            self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        elif layout == "added_bias":
            self.extra_bias = nn.Parameter(torch.randn(3 * dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H, hd = self.heads, self.dim // self.heads
        qkv = self.qkv(x)
        if self.layout == "joined_bias":
            qkv = qkv + torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        elif self.layout == "added_bias":
            qkv = qkv + self.extra_bias
        if self.layout in ("joined_bias", "added_bias"):  # the head size left to -1, as BEiT writes it
            q, k, v = qkv.reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
        elif self.layout == "timm":
            q, k, v = qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        elif self.layout == "index":
            qkv = qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        elif self.layout == "unbind_axis":
            q, k, v = qkv.view(B, N, 3, H, hd).unbind(2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        else:
            if self.layout == "split_int":
                q, k, v = qkv.split(C, dim=2)
            elif self.layout == "split_list":
                q, k, v = torch.split(qkv, [C, C, C], dim=-1)
            elif self.layout == "chunk":
                q, k, v = qkv.chunk(3, dim=-1)
            elif self.layout == "slices":
                q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
            elif self.layout == "unknown":  # splits on a non-boundary: must stay correct
                a, b = qkv.split([C + 4, 2 * C - 4], dim=-1)
                q, k, v = a[..., :C], torch.cat([a[..., C:], b[..., : C - 4]], -1), b[..., C - 4 :]
            q, k, v = (t.view(B, N, H, hd).transpose(1, 2) for t in (q, k, v))
        if self.layout in ("timm", "index", "joined_bias", "added_bias"):
            out = torch.softmax((q * hd**-0.5) @ k.transpose(-2, -1), dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class GQAttention(nn.Module):
    """Llama-style grouped-query attention with separate projections and HF's repeat_kv."""

    def __init__(self, dim: int = 32, heads: int = 8, kv_heads: int = 2) -> None:
        super().__init__()
        self.hd = dim // heads
        self.q_proj = nn.Linear(dim, heads * self.hd, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(heads * self.hd, dim, bias=False)
        self.groups = heads // kv_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, -1, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, N, -1, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, N, -1, self.hd).transpose(1, 2)
        kv_heads = k.shape[1]
        k = k[:, :, None].expand(B, kv_heads, self.groups, N, self.hd).reshape(B, -1, N, self.hd)
        v = v[:, :, None].expand(B, kv_heads, self.groups, N, self.hd).reshape(B, -1, N, self.hd)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, N, -1))


class RepeatedKvAttention(nn.Module):
    """Grouped-query attention as Meta's reference Llama / torchtitan (``repeat="expand"``: heads at dim 2,
    ``[:, :, :, None].expand().reshape()``) and gpt-fast (``"interleave"``: ``repeat_interleave``) write it."""

    def __init__(self, repeat: str, dim: int = 32, heads: int = 8, kv_heads: int = 2) -> None:
        super().__init__()
        self.repeat, self.heads, self.kv_heads, self.hd = repeat, heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, heads * self.hd, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(heads * self.hd, dim, bias=False)

    def _repeated(self, x: torch.Tensor) -> torch.Tensor:
        b, t, kv, hd = x.shape
        n = self.heads // self.kv_heads
        if self.repeat == "interleave":
            return torch.repeat_interleave(x, n, dim=2)
        return x[:, :, :, None, :].expand(b, t, kv, n, hd).reshape(b, t, kv * n, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.heads, self.hd)
        k = self._repeated(self.wk(x).view(b, t, self.kv_heads, self.hd))
        v = self._repeated(self.wv(x).view(b, t, self.kv_heads, self.hd))
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class GroupedQKV(nn.Module):
    """Falcon-style fused QKV laid out per KV group: ``view(B, N, KV, G + 2, hd)``, then split on the group dim."""

    def __init__(self, dim: int = 64, heads: int = 8, kv_heads: int = 2) -> None:
        super().__init__()
        self.hd, self.kv, self.g = dim // heads, kv_heads, heads // kv_heads
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.hd, bias=False)
        self.dense = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, self.kv, self.g + 2, self.hd)
        q = qkv[:, :, :, : self.g].reshape(B, N, -1, self.hd).transpose(1, 2)
        k = qkv[:, :, :, self.g].transpose(1, 2)
        v = qkv[:, :, :, self.g + 1].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.dense(out.transpose(1, 2).reshape(B, N, C))


class FalconQKV(GroupedQKV):
    """Hugging Face Falcon's split of the same layout: ``view(B, N, -1, G + 2, hd)``, ``[..., :-2]``, ``[[-2]]``, broadcast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, -1, self.g + 2, self.hd)
        q = qkv[:, :, :, :-2]
        k = torch.broadcast_to(qkv[:, :, :, [-2]], q.shape)
        v = torch.broadcast_to(qkv[:, :, :, [-1]], q.shape)
        q, k, v = (t.flatten(2, 3).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(out.transpose(1, 2).reshape(B, N, C))


class GPT2Like(nn.Module):
    """Hugging Face Conv1D layers (weight stored (in, out)): the fused qkv splits along dim 1."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.c_attn, self.c_proj = Conv1D(3 * 32, 32), Conv1D(32, 32)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(32, dim=2)
        return self.c_proj(q * k + v)
