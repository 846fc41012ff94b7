"""Linear geometry: which weight dimension holds a linear-like layer's output features.

``nn.Linear`` and ``nn.Embedding`` store ``(out, in)``; Hugging Face's ``Conv1D``
(GPT-2) stores ``(in, out)``. Everything that shards "the output features"
asks here which dimension that is.
"""

from __future__ import annotations

from torch import nn

__all__ = ["in_features", "is_transposed_linear", "out_features", "output_dim"]


def is_transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear whose weight is stored ``(in, out)``."""
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__) and hasattr(module, "nf")


def output_dim(module: nn.Module) -> int:
    """The weight dimension that indexes output features: 0, or 1 for ``Conv1D``."""
    return 1 if is_transposed_linear(module) else 0


def out_features(module: nn.Module) -> int:
    return module.weight.shape[output_dim(module)]


def in_features(module: nn.Module) -> int:
    return module.weight.shape[1 - output_dim(module)]
