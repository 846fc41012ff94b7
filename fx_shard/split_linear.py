"""SplitLinear: a fused linear held as one linear per part, with the fused layer's checkpoint keys."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fx_shard.fused import join_parts, split_parts
from fx_shard.geometry import in_features, is_transposed_linear, output_dim
from fx_shard.layers import ColumnParallelLinear, LinearBase

__all__ = ["SplitLinear"]


class SplitLinear(nn.Module):
    """A fused linear (``[q | k | v]``, ``[gate | up]``) held as one linear per part.

    ``forward`` is the fused layer's own: it joins the parts' outputs, as
    vLLM's ``XlaQKVParallelLinear`` does. fx_shard's graph passes call the
    parts directly instead. ``state_dict`` saves the fused ``weight`` / ``bias``
    under the fused layer's keys and ``load_state_dict`` splits them again, so
    checkpoints keep their original layout. ``groups > 1``: the fused rows
    repeat ``[part_0 | part_1 | ...]`` per group (q/k/v per KV group).
    """

    def __init__(self, parts: dict[str, nn.Module], output_sizes: Sequence[int], groups: int = 1) -> None:
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)
        self.part_names = tuple(parts)
        self.output_sizes = list(output_sizes)
        self.groups = groups
        first = parts[self.part_names[0]]
        self.dim = output_dim(first)
        self.return_bias = getattr(first, "return_bias", False)
        self.skip_bias_add = getattr(first, "skip_bias_add", False)
        self._register_state_dict_hook(_save_fused)
        self._register_load_state_dict_pre_hook(_load_fused, with_module=True)
        self.register_load_state_dict_post_hook(_name_fused_keys)
        self._load_prefix = ""

    @classmethod
    def from_fused(cls, fused: nn.Module, names: Sequence[str], output_sizes: Sequence[int], groups: int = 1) -> SplitLinear:
        """Split ``fused``'s weight (output features) and bias by ``output_sizes`` (views of it when ``groups == 1``)."""
        parts: dict[str, nn.Module] = {}
        dim = output_dim(fused)
        weights = split_parts(fused.weight.detach(), output_sizes, groups, dim)
        biases = split_parts(fused.bias.detach(), output_sizes, groups, 0) if fused.bias is not None else None
        for i, (name, size) in enumerate(zip(names, output_sizes)):
            part = _empty_like_linear(fused, size)
            part.weight = nn.Parameter(weights[i], requires_grad=fused.weight.requires_grad)
            if biases is not None:
                part.bias = nn.Parameter(biases[i], requires_grad=fused.bias.requires_grad)
            parts[name] = part
        return cls(parts, output_sizes, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        results = [getattr(self, name)(x) for name in self.part_names]
        if not self.return_bias:
            return join_parts(results, self.groups)
        output = join_parts([r[0] for r in results], self.groups)
        biases = [r[1] for r in results]
        return output, (join_parts(biases, self.groups) if biases[0] is not None else None)


def _empty_like_linear(fused: nn.Module, out_features: int) -> nn.Module:
    """A linear of ``fused``'s kind and flags with ``out_features`` outputs, on meta until filled."""
    has_bias = fused.bias is not None
    if is_transposed_linear(fused):
        with torch.device("meta"):
            return type(fused)(out_features, in_features(fused))
    if isinstance(fused, LinearBase) or hasattr(fused, "return_bias"):
        return ColumnParallelLinear(
            in_features(fused), out_features, bias=has_bias, skip_bias_add=getattr(fused, "skip_bias_add", False),
            return_bias=fused.return_bias, device="meta",
        )
    return nn.Linear(in_features(fused), out_features, bias=has_bias, device="meta")


def _save_fused(module: SplitLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for field in ("weight", "bias"):
        keys = [f"{prefix}{name}.{field}" for name in module.part_names]
        if keys[0] in state_dict:
            dim = module.dim if field == "weight" else 0
            state_dict[prefix + field] = join_parts([state_dict.pop(k) for k in keys], module.groups, dim)


def _load_fused(module: SplitLinear, state_dict: dict, prefix: str, *args) -> None:
    module._load_prefix = prefix
    for field in ("weight", "bias"):
        fused = state_dict.pop(prefix + field, None)
        if fused is not None:
            dim = module.dim if field == "weight" else 0
            for name, piece in zip(module.part_names, split_parts(fused, module.output_sizes, module.groups, dim)):
                state_dict[f"{prefix}{name}.{field}"] = piece


def _name_fused_keys(module: SplitLinear, incompatible) -> None:
    """Report a missing fused tensor by its checkpoint key (``c_attn.weight``), not its parts' keys."""
    missing = incompatible.missing_keys
    for field in ("weight", "bias"):
        parts = [f"{module._load_prefix}{name}.{field}" for name in module.part_names]
        if any(p in missing for p in parts):
            missing[:] = [k for k in missing if k not in parts] + [module._load_prefix + field]
