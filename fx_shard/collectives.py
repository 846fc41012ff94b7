"""Collectives of one forward, read from the partitioned per-device HLO.

``collectives(gm, *inputs)`` runs the forward once on the XLA device,
compiles it, and counts what XLA's SPMD partitioner inserted (the HLO before
partitioning has no collectives, docs/measurements.md: the count comes from the dump).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fx_shard import xla
from fx_shard.errors import FxShardError
from fx_shard.hlo import (
    CollectiveStats,
    collectives_in,
    dump_snapshot,
    partitioned_module_of,
    partitioned_modules,
    program_memory,
    program_signature,
)
from fx_shard.xla import xla_device

__all__ = ["Collectives", "collectives", "device_parameter_bytes", "format_bytes"]

@dataclass(frozen=True)
class Collectives(Mapping[str, int]):
    """Counts per collective (``counts["all-reduce"]``), with bytes and memory.

    ``stats`` has count and per-device result bytes per op; ``memory_bytes``
    is the per-device allocation total of the step's program(s) as XLA
    reports it; ``parameter_bytes`` is what the parameters take on one device.
    """

    stats: Mapping[str, CollectiveStats]
    memory_bytes: int | None
    parameter_bytes: int
    programs: tuple[str, ...]

    def __getitem__(self, op: str) -> int:
        return self.stats[op].count

    def __iter__(self) -> Iterator[str]:
        return iter(self.stats)

    def __len__(self) -> int:
        return len(self.stats)

    @property
    def bytes(self) -> dict[str, int]:
        return {op: s.bytes for op, s in self.stats.items()}

    def nonzero(self) -> dict[str, int]:
        """Only the collectives that occur: ``{"all-reduce": 4}``."""
        return {op: s.count for op, s in self.stats.items() if s.count}

    def __repr__(self) -> str:
        """A short summary: ``Collectives(all-reduce=5; results 2.5 KiB per device; parameters 57.2 KiB per device)``."""
        found = self.nonzero()
        counts = ", ".join(f"{op}={n}" for op, n in found.items()) or "none"
        results = f"; results {format_bytes(sum(self.bytes.values()))} per device" if found else ""
        return f"Collectives({counts}{results}; parameters {format_bytes(self.parameter_bytes)} per device)"


def collectives(model: nn.Module, *inputs, loss: Callable[[Any], torch.Tensor] | None = None, **kwargs) -> Collectives:
    """Run ``model(*inputs, **kwargs)`` once on the XLA device and count its collectives.

    Inputs are moved to the device (replicated). The forward runs without
    gradients; with ``loss`` (the model's output -> a scalar) it runs
    forward, ``loss`` and backward, and counts the program that computes the
    gradients (the parameters' ``.grad`` are left as they were). When XLA
    already compiled the same program in this process it does not dump it
    again; the earlier dump is found by its content. Needs the HLO dump that
    ``fx_shard.init_runtime`` sets up when it starts the runtime (its
    default; not with ``hlo_dump=False``).
    """
    dump = xla.require_hlo_dump()
    device = xla_device()
    moved_args, moved_kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), (inputs, kwargs))
    params = list({id(p): p for p in model.parameters()}.values())
    saved = [p.grad for p in params]
    if loss is None:
        with torch.no_grad():
            output = model(*moved_args, **moved_kwargs)
        tensors = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.device.type == "xla"]
    else:
        for p in params:
            p.grad = None
        value = loss(model(*moved_args, **moved_kwargs))
        value.backward()
        tensors = [value.detach(), *(p.grad for p in params if p.grad is not None)]
    signature = program_signature(xla.tensors_hlo(tensors))
    before = dump_snapshot(dump)
    xla.sync(tensors)
    for p, grad in zip(params, saved):
        p.grad = grad
    files = partitioned_modules(dump, before)
    if not files:  # compiled before: XLA reused it, so find its earlier dump
        earlier = partitioned_module_of(dump, signature)
        if earlier is None:
            raise FxShardError(
                f"{type(model).__name__}'s forward was compiled before XLA's HLO dump could see it; "
                "call fx_shard.collectives in a process whose runtime fx_shard.init_runtime started"
            )
        files = [earlier]
    memory = [program_memory(dump, f) for f in files]
    return Collectives(
        stats=collectives_in(files),
        memory_bytes=sum(m for m in memory if m is not None) if any(m is not None for m in memory) else None,
        parameter_bytes=device_parameter_bytes(model),
        programs=tuple(f.name for f in files),
    )


def format_bytes(n: int) -> str:
    """``n`` bytes in B, KiB, MiB or GiB, one decimal."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def device_parameter_bytes(model: nn.Module) -> int:
    """Bytes the parameters of ``model`` take on one device, read from torch_xla's shards."""
    return sum(xla.local_shard_bytes(param) for param in {id(p): p for p in model.parameters()}.values())
