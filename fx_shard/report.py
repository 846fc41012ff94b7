"""Tables of what fx_shard decided, for people (tabulate)."""

from __future__ import annotations

import math

import torch
from tabulate import tabulate
from torch import fx

from fx_shard.sharding import SHARDING_KEY, ModelSharding, layer_parameters, local_shape

__all__ = ["parameter_bytes", "report"]


def report(gm: fx.GraphModule, tablefmt: str = "simple") -> str:
    """Per-layer style, reason and per-parameter shapes, then parameter bytes."""
    summary: ModelSharding = gm.meta[SHARDING_KEY]
    mesh = summary.mesh_shape
    rows = []
    for target, record, name, param in layer_parameters(gm):
        spec = record.specs.get(name)
        rows.append([
            target, record.style, record.source, name, _shape(param.shape),
            _spec(spec), _shape(local_shape(param.shape, spec, mesh)),
        ])
    total, per_device, ideal = parameter_bytes(gm)
    lines = [
        f"fx_shard: {type(gm).__name__} on mesh {_mesh(mesh)}, tensor-parallel axis {summary.tp_axis!r}",
        f"passes: {', '.join(summary.passes)}",
        "",
        tabulate(rows, ["module", "style", "why", "param", "global", "spec", "per device"], tablefmt=tablefmt),
        "",
        tabulate(
            [["total", _bytes(total)], ["per device", _bytes(per_device)], ["per device, ideal", _bytes(ideal)]],
            ["parameter bytes", ""], tablefmt=tablefmt,
        ),
    ]
    return "\n".join(lines)


def parameter_bytes(gm: fx.GraphModule) -> tuple[int, int, int]:
    """(total, per device, ideal per device) parameter bytes, each shared tensor counted once.

    Ideal is each sharded tensor's bytes over its mesh axes' size, plus replicated bytes.
    """
    mesh = gm.meta[SHARDING_KEY].mesh_shape
    specs = {id(param): record.specs[name] for _, record, name, param in layer_parameters(gm) if name in record.specs}
    total = per_device = ideal = 0
    seen: set[int] = set()
    for param in gm.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        size = param.element_size()
        spec = specs.get(id(param))
        total += param.numel() * size
        per_device += math.prod(local_shape(param.shape, spec, mesh)) * size
        ideal += param.numel() * size // math.prod(mesh[a] for a in spec or () if a)
    return total, per_device, ideal


def _shape(shape: torch.Size | tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _spec(spec) -> str:
    return "replicated" if not spec or not any(spec) else "(" + ", ".join(repr(a) if a else "None" for a in spec) + ")"


def _mesh(mesh) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in mesh.items()) + "}"


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n:,} B"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n:,} B ({n / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]})"
