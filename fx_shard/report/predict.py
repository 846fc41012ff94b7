"""The collectives a forward needs, predicted per block from the sharding records (not by XLA).

How each layer's style maps to collectives is ``PREDICTION``, the text the
report shows beside the numbers; XLA's own count (``measured=``) sits beside it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from torch import nn

from fx_shard import styles
from fx_shard.hlo import COLLECTIVE_OPS
from fx_shard.report.gather import Layer, graph_modules
from fx_shard.sharding import ModelSharding, recorded_layers

PREDICTION = (
    "Predicted from the sharding records, not by XLA: one all-reduce per call of a row-parallel layer "
    "(each device holds a partial sum of its output) and one per vocabulary-parallel embedding (each device "
    "looks up only its own rows); one all-gather per layer whose output is pinned replicated (gather_output); "
    "none for column-parallel, fused-part and replicated layers. It assumes that what runs between a "
    "column-parallel layer and its row-parallel partner stays on each device, which fx_shard's rewrites "
    "(fused QKV split and rewired, attention as einsum, heads kept whole) are there to ensure. "
    "Layers planned as modules outside any graph count once each."
)


def predicted_blocks(model: nn.Module, summary: ModelSharding, layers: list[Layer]) -> list[dict[str, Any]]:
    """Per block (the module path up to its first numeric part): predicted collectives and their layers.

    Layers outside any block come last, as one row with block ``""``.
    """
    calls = _calls(model, summary)
    blocks: dict[str, dict[str, Any]] = {}
    for layer in layers:
        block, rest = _block_of(layer.path)
        row = blocks.setdefault(block, {"block": block, "ops": Counter(), "from": []})
        n = calls.get(layer.path, 0)
        for op, k in _per_call(layer).items():
            row["ops"][op] += k * n
            times = f" ×{n}" if n != 1 else ""
            row["from"].append(f"{rest} ({layer.record.style}: {op}{times})")
    ordered = sorted(blocks.values(), key=lambda r: r["block"] == "")  # layers outside blocks last
    return [
        {"block": r["block"], "predicted": {op: r["ops"][op] for op in COLLECTIVE_OPS}, "from": ", ".join(r["from"])}
        for r in ordered
    ]


def predicted_total(blocks: list[dict[str, Any]]) -> dict[str, int]:
    """The whole forward's predicted count of each collective: the blocks' sum."""
    return {op: sum(b["predicted"][op] for b in blocks) for op in COLLECTIVE_OPS}


def measured_counts(measured: Mapping[str, int]) -> dict[str, int]:
    """``measured`` as plain counts: every known collective (0 if absent), then any other op it has."""
    ops = list(COLLECTIVE_OPS) + [op for op in measured if op not in COLLECTIVE_OPS]
    return {op: int(measured.get(op, 0)) for op in ops}


def _calls(model: nn.Module, summary: ModelSharding) -> Counter[str]:
    """How many times each recorded layer is called: its call_module nodes, or once outside graphs."""
    calls: Counter[str] = Counter()
    for prefix, gm in graph_modules(model):
        for target, _ in recorded_layers(gm):
            calls[f"{prefix}.{target}" if prefix else target] += 1
    for path in summary.layers:
        calls.setdefault(path, 1)
    return calls


def _per_call(layer: Layer) -> dict[str, int]:
    """Collectives one call of ``layer`` needs (see PREDICTION)."""
    record = layer.record
    if not layer.sharded:
        return {}
    ops: Counter[str] = Counter(styles.get(record.style).collectives_per_call)
    if record.output_spec is not None and not any(record.output_spec):
        ops["all-gather"] += 1
    return dict(ops)


def _block_of(path: str) -> tuple[str, str]:
    """``("model.layers.3", "mlp.down_proj")``; ``("", path)`` when the path has no numeric part."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i + 1 < len(parts):
            return ".".join(parts[: i + 1]), ".".join(parts[i + 1:])
    return "", path
