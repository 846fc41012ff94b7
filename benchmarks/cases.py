"""What the step-time benchmark can run: strategies, modes, device counts, model sizes, and one configuration (Item).

Shared by the entry point (``step_time.py``, which picks the items), the
worker (``measure.py``, which builds the models at these sizes) and the doc
(``benchmark_doc.py``, which states the sizes and orders its tables by these).
"""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("replicated", "seed", "fused", "auto", "fx_shard", "interleave")
MODES = ("inference", "training")
DEVICES = (1, 2, 4, 8)
SIZES = ("default", "large", "xl")

# "large": the biggest that keeps a full run in tens of minutes on 2 cores. Head counts divide 8
# devices; the Llamas keep grouped-query attention with 8 KV heads (as Llama-70B has).
LARGE = {
    "llama": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=16, max_position_embeddings=128),
    "gpt2": dict(vocab_size=4096, n_embd=256, n_layer=4, n_head=16, n_positions=128),
    "vit": dict(image_size=32, patch_size=4, embed_dim=256, depth=4, num_heads=16),
}
LARGE["llama-vllm"] = LARGE["llama"]
# "xl": twice the width, for the Llama the step-time goal is judged on; the other models stop at "large"
# (a replicated training step at this size on 8 virtual devices already takes several seconds here).
XL = {
    "llama": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=32, max_position_embeddings=128),
}
OVERRIDES = {"default": {}, "large": LARGE, "xl": XL}
INPUT_SHAPES = {"default": dict(batch=2, seq_len=16), "large": dict(batch=4, seq_len=64),
                "xl": dict(batch=4, seq_len=64)}

# Models with fused QKV (and gate_up) layers.
FUSED_QKV = ("llama-vllm", "gpt2", "vit")


@dataclass(frozen=True)
class Item:
    """One configuration: a strategy on a model at a size, in a mode, on a mesh of ``devices``."""

    devices: int
    strategy: str
    model: str
    size: str
    mode: str

    @property
    def key(self) -> str:
        return f"{self.devices}/{self.strategy}/{self.model}/{self.size}/{self.mode}"

    def label(self) -> str:
        return f"{self.devices} dev · {self.model} {self.size} · {self.mode} · {self.strategy}"


def build_overrides(model: str, size: str) -> dict:
    """The ``models.build`` keyword arguments of ``model`` at ``size``."""
    return dict(OVERRIDES[size].get(model, {}))


def has_size(model: str, size: str) -> bool:
    """Whether ``model`` is run at ``size`` (every model at "default", only some larger)."""
    return size == "default" or model in OVERRIDES[size]
