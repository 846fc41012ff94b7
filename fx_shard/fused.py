"""The layout of fused layers: parts joined along the output features, and reordered per device.

A fused QKV or gate_up holds ``[p_0 | p_1 | ...]`` along its output features
(``join_parts``), once per KV group for q/k/v laid out per group.
``interleave_rows`` reorders such a layer in place so that each device's
contiguous block holds its share of every part; ``state_dict`` keeps the
original order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fx_shard.geometry import output_dim

__all__ = ["interleave_rows", "join_parts", "split_parts"]


def join_parts(tensors: Sequence[torch.Tensor], groups: int = 1, dim: int = -1) -> torch.Tensor:
    """The fused tensor from its parts: ``[p_0 | p_1 | ...]`` along ``dim``, once per group when ``groups > 1``."""
    if groups == 1:
        return torch.cat(tensors, dim)
    dim %= tensors[0].dim()
    return torch.cat([t.unflatten(dim, (groups, -1)) for t in tensors], dim + 1).flatten(dim, dim + 1)


def split_parts(fused: torch.Tensor, sizes: Sequence[int], groups: int = 1, dim: int = -1) -> list[torch.Tensor]:
    """The inverse of ``join_parts``: each part's rows of ``fused`` (gathered from every group)."""
    if groups == 1:
        return list(torch.split(fused, list(sizes), dim))
    dim %= fused.dim()
    per_group = torch.split(fused.unflatten(dim, (groups, -1)), [s // groups for s in sizes], dim + 1)
    return [p.flatten(dim, dim + 1) for p in per_group]


def interleave_rows(module: nn.Module, sizes: Sequence[int], ways: int) -> None:
    """Reorder a fused layer's output features to ``[P0_0 P1_0 ... | P0_1 P1_1 ... | ...]`` in place.

    Sharded ``ways`` ways on the output features, device ``d`` then holds its
    share of every part (q, k and v of its heads) in one matmul. ``state_dict``
    saves and loads the original order.
    """
    dim = output_dim(module)
    module.weight = nn.Parameter(_interleave(module.weight.detach(), sizes, ways, dim), module.weight.requires_grad)
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(_interleave(module.bias.detach(), sizes, ways, 0), module.bias.requires_grad)
    module.interleaved = (tuple(sizes), ways)
    module._register_state_dict_hook(_save_interleaved)
    module._register_load_state_dict_pre_hook(_load_interleaved, with_module=True)


def _interleave(fused: torch.Tensor, sizes: Sequence[int], ways: int, dim: int) -> torch.Tensor:
    """``[P0 | P1 | ...]`` along ``dim`` reordered to ``[P0_0 P1_0 ... | P0_1 P1_1 ... | ...]``."""
    return join_parts(split_parts(fused, sizes, 1, dim), ways, dim)


def _save_interleaved(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    sizes, ways = module.interleaved
    for field, dim in (("weight", output_dim(module)), ("bias", 0)):
        if state_dict.get(prefix + field) is not None:
            state_dict[prefix + field] = torch.cat(split_parts(state_dict[prefix + field], sizes, ways, dim), dim)


def _load_interleaved(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    sizes, ways = module.interleaved
    for field, dim in (("weight", output_dim(module)), ("bias", 0)):
        if state_dict.get(prefix + field) is not None:
            state_dict[prefix + field] = _interleave(state_dict[prefix + field], sizes, ways, dim)
