"""Built-in models for the demo, the tests and the benchmarks.

Small and deterministic: ``build(name, seed)`` gives the same weights every
time, on any device including ``meta``. Each model traces whole with
``torch.fx.symbolic_trace`` when linear-like layers are leaves, and its head
counts divide 2, 4 and 8 devices.

>>> model = build("llama")
>>> logits = model(*example_inputs("llama"))   # (2, 16, 256)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fx_shard.models.gpt2 import GPT2, GPT2Config
from fx_shard.models.llama import Llama, LlamaConfig, VllmLlama
from fx_shard.models.vit import ViT, ViTConfig

__all__ = [
    "MODELS",
    "GPT2",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "ViT",
    "ViTConfig",
    "VllmLlama",
    "build",
    "example_inputs",
    "make_config",
    "reset_buffers",
]

Config = LlamaConfig | GPT2Config | ViTConfig


def _build_vllm_llama(config: LlamaConfig) -> VllmLlama:
    # Same weights as "llama" with the same seed: draw the plain model, then copy it over.
    plain = Llama(config)
    return VllmLlama(config).load_from_hf_style(plain)


_CONFIGS: dict[str, type] = {
    "llama": LlamaConfig,
    "llama-vllm": LlamaConfig,
    "gpt2": GPT2Config,
    "vit": ViTConfig,
}
_FACTORIES: dict[str, Callable[[Any], nn.Module]] = {
    "llama": Llama,
    "llama-vllm": _build_vllm_llama,
    "gpt2": GPT2,
    "vit": ViT,
}

MODELS: tuple[str, ...] = tuple(_FACTORIES)

_SEQ_LEN = 16


def _check_name(name: str) -> None:
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; built-in models are {', '.join(MODELS)}")


def make_config(name: str, **overrides: Any) -> Config:
    """The default config of model ``name``, with ``overrides`` applied to its fields."""
    _check_name(name)
    cls = _CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no field {', '.join(unknown)}; its fields are {', '.join(sorted(fields))}"
        )
    return cls(**overrides)


def build(name: str, seed: int = 0, device: torch.device | str | None = None, **overrides: Any) -> nn.Module:
    """Model ``name`` (one of ``MODELS``) with weights drawn from ``seed``, float32, in eval mode.

    ``overrides`` replace config fields (``build("llama", num_hidden_layers=4)``).
    Parameters and buffers are created directly on ``device`` (``"meta"``
    allocates nothing). The global RNG state is left as it was.
    ``"llama-vllm"`` has the same weights as ``"llama"`` for the same seed.
    """
    config = make_config(name, **overrides)
    placement = torch.device(device) if device is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), placement:
        torch.manual_seed(seed)
        model = _FACTORIES[name](config)
    return model.to(torch.float32).eval()


def example_inputs(
    name: str, batch: int = 2, seed: int = 0, seq_len: int = _SEQ_LEN, **overrides: Any
) -> tuple[torch.Tensor, ...]:
    """Inputs for ``build(name, **overrides)``, drawn from ``seed``.

    ``(batch, seq_len)`` token ids for the language models, a ``(batch, C, H, W)``
    image batch for ``"vit"`` (which ignores ``seq_len``).
    """
    config = make_config(name, **overrides)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(config, ViTConfig):
        size = config.image_size
        return (torch.randn(batch, config.in_chans, size, size, generator=generator),)
    if seq_len > config.max_position_embeddings:
        limit = config.max_position_embeddings
        raise ValueError(f"seq_len ({seq_len}) exceeds max_position_embeddings ({limit})")
    return (torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator),)


def reset_buffers(model: nn.Module) -> nn.Module:
    """Recompute every non-persistent table (rotary, position ids) in ``model``; returns ``model``.

    Needed after a ``meta`` build moved with ``to_empty``: those buffers are
    not in the ``state_dict``, so loading weights does not fill them.
    """
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    return model
