"""Tiny models for pass and plan tests (CPU, no XLA)."""

import torch
import torch.nn.functional as F
from torch import nn

from fx_shard.layers import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear


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
