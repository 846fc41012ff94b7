"""Parameters sharded over the ``fsdp`` mesh axis too: the specs every parameter ends with on an FSDP mesh.

On a mesh whose ``fsdp`` axis is larger than 1, every parameter (of a
planned layer or not) is additionally split over ``fsdp`` on a dimension its
tensor-parallel spec leaves whole, as torchprime's ``[tensor, fsdp]`` configs
and torch_xla's FSDPv2 do: per-device parameter (and gradient, and optimizer
state) bytes fall by the fsdp size. Under SPMD the function is unchanged:
XLA all-gathers the pieces where a layer uses them.

``Pipeline.summarize`` calls ``shard_over_fsdp`` once, after the passes
(which plan for the tensor-parallel axis only and keep seeing those specs in
the graph), so ``ModelSharding`` holds the final specs that materialize,
checkpoint loading and the report read. On a mesh without ``fsdp`` nothing
changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from fx_shard.axes import FSDP_AXIS, Spec, spec_text
from fx_shard.sharding import ShardingRecord

__all__ = ["fsdp_spec", "shard_over_fsdp"]


def fsdp_spec(spec: Spec | None, shape: torch.Size | tuple[int, ...], mesh_shape: Mapping[str, int]) -> tuple[Spec | None, str | None]:
    """``(spec with fsdp added, None)``, or ``(spec, why not)`` when no dimension can take it.

    ``fsdp`` goes on the first dimension ``spec`` leaves whole (``None``:
    all of them) whose size the fsdp axis divides: for a column- or
    row-parallel weight the other dimension, for a norm weight or a bias
    the only one. A dimension that does not divide is not padded (XLA would,
    unevenly): the parameter keeps ``spec``. Without an fsdp axis larger
    than 1, ``(spec, None)``.
    """
    ways = mesh_shape.get(FSDP_AXIS, 1)
    if ways <= 1:
        return spec, None
    entries = spec if spec is not None else (None,) * len(shape)
    whole = [dim for dim, axis in enumerate(entries) if axis is None]
    for dim in whole:
        if shape[dim] % ways == 0:
            return (*entries[:dim], FSDP_AXIS, *entries[dim + 1:]), None
    if not whole:
        return spec, f"every dimension of {tuple(shape)} is sharded already {spec_text(entries)}"
    sizes = ", ".join(str(shape[dim]) for dim in whole)
    return spec, f"fsdp={ways} divides no whole dimension of {tuple(shape)} ({sizes})"


def shard_over_fsdp(
    root: nn.Module, layers: Mapping[str, ShardingRecord], mesh_shape: Mapping[str, int]
) -> tuple[dict[str, ShardingRecord], dict[str, Spec]]:
    """Every parameter's spec with ``fsdp`` added: ``(layers' records, specs of parameters in no layer)``.

    A layer's record gets a spec for each of its parameters that takes
    ``fsdp`` (a bias it replicated too), and a note for each that does not;
    a parameter of no layer that takes it gets its spec in the second dict,
    by its name in ``root`` (each tensor once; one that does not stays
    replicated, as the report's bytes show).
    """
    if mesh_shape.get(FSDP_AXIS, 1) <= 1:
        return dict(layers), {}
    records: dict[str, ShardingRecord] = {}
    covered: set[int] = set()
    for path, record in layers.items():
        specs, notes = dict(record.specs), list(record.notes)
        for name, param in root.get_submodule(path).named_parameters(recurse=False):
            covered.add(id(param))
            spec, why = fsdp_spec(specs.get(name), param.shape, mesh_shape)
            if why is None:
                specs[name] = spec
            else:
                notes.append(f"{name} not sharded over {FSDP_AXIS}: {why}")
        records[path] = replace(record, specs=specs, notes=tuple(notes))
    unplanned: dict[str, Spec] = {}
    for qualified, param in root.named_parameters():
        if id(param) in covered:
            continue
        spec, why = fsdp_spec(None, param.shape, mesh_shape)
        if why is None:
            unplanned[qualified] = spec
    return records, unplanned
