"""Token generation for a sharded Hugging Face causal LM, compiled a bounded number of times.

transformers' ``generate()`` is not compile-stable on XLA (about two
programs per new token, issue 14). This loop is: the prompt is left-padded
to a power-of-two bucket, the KV cache (transformers' ``StaticCache``) has a
power-of-two length, and every value that changes per step (the cache slot,
the positions, the last token, the mask) is a device tensor of fixed shape.
So XLA compiles one prefill per (batch, prompt bucket, cache length) and one
decode step per (batch, cache length), and the host reads the tokens once,
at the end. The cache is sharded by KV heads like the ``k_proj`` that fills
it, so its updates stay on each device.
"""

from __future__ import annotations

import torch

from fx_shard import xla
from fx_shard.axes import Spec
from fx_shard.errors import FxShardError
from fx_shard.sharding import transformed

__all__ = ["generate", "prompt_bucket"]

MIN_BUCKET = 8


def prompt_bucket(length: int) -> int:
    """The padded length a prompt of ``length`` tokens is prefilled at: the next power of two, at least 8."""
    return max(MIN_BUCKET, 1 << (length - 1).bit_length())


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    return_cache: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Prompt + ``max_new_tokens`` new tokens (on the CPU) for each row of ``input_ids``, from ``model`` sharded by fx_shard.

    ``attention_mask`` marks left padding (1 for tokens, 0 for pads), as in
    transformers. Greedy by default; ``do_sample`` samples from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most
    likely tokens. No stop token: every row gets ``max_new_tokens``.
    ``return_cache=True`` also returns the KV cache, a ``(keys, values)``
    pair per layer, each ``(batch, kv_heads, cache length, head_dim)`` on the
    device, the first ``prompt_bucket(prompt length)`` slots the padded prompt.
    """
    from transformers.cache_utils import StaticCache

    mesh, specs = _cache_layout(model)
    if max_new_tokens < 1:
        raise ValueError(f"fx_shard.generate: max_new_tokens={max_new_tokens}; ask for at least 1 new token")
    if do_sample and (temperature <= 0 or (top_k is not None and top_k < 1)):
        raise ValueError(f"fx_shard.generate: temperature={temperature}, top_k={top_k}; sampling needs temperature > 0 and top_k >= 1")
    device = next(model.parameters()).device
    input_ids = input_ids.cpu()
    batch, length = input_ids.shape
    bucket = prompt_bucket(length)
    cache_len = 1 << (bucket + max_new_tokens - 1).bit_length()
    valid = torch.ones_like(input_ids) if attention_mask is None else attention_mask.cpu().to(input_ids.dtype)
    pad = bucket - length
    ids = torch.nn.functional.pad(input_ids, (pad, 0)).to(device)
    # Which cache slots hold a token of each row: not the pads, every slot after the bucket.
    keys_valid = torch.cat([torch.zeros(batch, pad), valid, torch.ones(batch, cache_len - bucket)], dim=1).to(device).bool()
    positions = (valid.cumsum(-1) - 1).clamp(min=0)
    positions = torch.nn.functional.pad(positions, (pad, 0)).to(device)

    config = model.config
    cache = StaticCache(config=config, max_cache_len=cache_len)
    if any(layer.is_sliding for layer in cache.layers):
        raise FxShardError(
            f"fx_shard.generate: {type(model).__name__} has sliding-window attention layers, whose cache and masks "
            "it does not build yet (issue 14); use transformers' generate, or a config without sliding_window"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache.early_initialization(batch, config.num_key_value_heads, head_dim, model.dtype, device)
    for layer, spec in zip(cache.layers, specs):
        xla.mark(layer.keys, mesh, spec)
        xla.mark(layer.values, mesh, spec)

    slots = torch.arange(cache_len, device=device)
    new = torch.zeros(batch, cache_len - bucket, dtype=input_ids.dtype, device=device)
    step = torch.zeros(1, dtype=torch.long, device=device)  # which new token the forward picks

    def forward(ids: torch.Tensor, positions: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
        mask = keys_valid[:, None, None, :] & (slots[None, None, None, :] <= query_slots[None, None, :, None])
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        token = _pick(out.logits[:, -1].float(), do_sample, temperature, top_k)
        new.index_copy_(1, step, token[:, None])
        return token[:, None]

    with torch.no_grad():
        token = forward(ids, positions, slots[:bucket])
        position = positions[:, -1:] + 1
        xla.step()
        for _ in range(max_new_tokens - 1):
            step += 1
            token = forward(token, position, step + (bucket - 1))  # the last token goes to slot bucket + step - 1
            position = position + 1
            xla.step()
    tokens = torch.cat([input_ids, new.cpu()[:, :max_new_tokens]], dim=1)
    if return_cache:
        return tokens, [(layer.keys, layer.values) for layer in cache.layers]
    return tokens


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None) -> torch.Tensor:
    """The next token of each row of ``(batch, vocab)`` logits: the argmax, or a sample (Gumbel-max, on the device)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(min=1e-20)))
    return (logits + gumbel).argmax(-1)


def _cache_layout(model: torch.nn.Module) -> tuple[object, list[Spec]]:
    """The mesh ``model`` is sharded on and each layer's cache spec: KV heads split like its ``k_proj``'s output features."""
    summary = transformed(model)
    mesh = getattr(model, "meta", {}).get(xla.MESH_KEY)
    if summary is None or mesh is None:
        raise FxShardError(
            f"fx_shard.generate drives a model fx_shard.shard returned; {type(model).__name__} was not sharded "
            "by it: call fx_shard.shard(model, mesh, 'auto', example_kwargs=...) first"
        )
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_key_value_heads"):
        raise FxShardError(
            f"fx_shard.generate drives Hugging Face causal LMs (a config with num_key_value_heads, a forward taking "
            f"cache=); {type(model).__name__} is not one: fx_shard's built-in models are not supported yet (issue 14)"
        )
    k_projs = [record for path, record in summary.layers.items() if path.rsplit(".", 1)[-1] == "k_proj"]
    if len(k_projs) != config.num_hidden_layers:
        raise FxShardError(
            f"fx_shard.generate shards the KV cache like each layer's k_proj; {type(model).__name__} has "
            f"{len(k_projs)} layers named k_proj for {config.num_hidden_layers} decoder layers: a model with "
            "fused or renamed k/v projections is not supported yet (issue 14)"
        )
    return mesh, [(None, record.specs.get("weight", (None,))[0], None, None) for record in k_projs]
