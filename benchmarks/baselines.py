"""The strategies fx_shard is measured against, built from fx_shard's own pieces.

- ``fused``: the plan's styles with every fused layer (``qkv``,
  ``merged_colwise``) sharded as one column-parallel weight; no rewriting.
- ``seed``: vLLM's ``shard_model`` way: fused layers split into parts whose
  outputs are concatenated again (``SplitFusedLinear`` alone), attention as
  the model wrote it.
- ``fx_shard``: the full pipeline (``fx_shard.shard``), fused layers split.
- ``interleave``: the same with ``fused="interleave"``: fused layers kept one
  matmul, their rows reordered so each device's slice holds its part of each,
  and sibling column-parallel layers of one input computed as one matmul.

The step-time benchmark adds two that shard nothing themselves:

- ``replicated``: the model moved to the XLA device as it is; under SPMD every
  device holds and computes all of it.
- ``auto``: the same, in a process whose runtime was started with
  ``xr.use_spmd(auto=True)``: XLA's auto-sharding pass chooses the shardings
  when the first step compiles (``start_runtime(devices, auto=True)``).
"""

from __future__ import annotations

import copy
import os

from torch import fx, nn

import fx_shard
from fx_shard.pipeline import Pipeline
from fx_shard.plan import ShardPlan
from fx_shard.styles import Colwise, registered
from fx_shard.xla import materialize, mesh_shape_of, to_device_keeping_ties

STRATEGIES = ("fused", "seed", "fx_shard")
#: Everything the step-time benchmark compares; ``auto`` needs a runtime of its own.
ALL_STRATEGIES = ("replicated", "seed", "fused", "auto", "fx_shard", "interleave")
#: The strategies that are ``fx_shard.shard`` itself, with the ``fused`` argument each passes.
FX_SHARD_FUSED = {"fx_shard": "split", "interleave": "interleave"}
#: The baselines: fx_shard's pipeline with only these passes.
BASELINE_PASSES = {"fused": ("AnnotateSharding",), "seed": ("AnnotateSharding", "SplitFusedLinear")}


def start_runtime(devices: int, auto: bool = False) -> int:
    """Start this process's XLA runtime in SPMD mode with ``devices`` devices (auto-sharding if ``auto``).

    Auto-sharding is a property of the runtime (``xr.use_spmd(auto=True)``
    before any XLA tensor exists), so a process is either all ``auto`` or none.
    """
    if auto:
        os.environ.setdefault("PJRT_DEVICE", "CPU")
        if os.environ["PJRT_DEVICE"] == "CPU":
            os.environ.setdefault("CPU_NUM_DEVICES", str(devices))
        import torch_xla.runtime as xr

        xr.use_spmd(auto=True)
    return fx_shard.init_runtime(devices)


def place(strategy: str, model: nn.Module, mesh, plan: dict, example_inputs: tuple) -> nn.Module:
    """``model`` ready to run on the XLA device the way ``strategy`` (one of ``ALL_STRATEGIES``) runs it."""
    if strategy in ("replicated", "auto"):
        if strategy == "auto" and os.environ.get("XLA_AUTO_SPMD") != "1":
            raise RuntimeError("strategy 'auto' needs a runtime started with start_runtime(devices, auto=True)")
        return to_device_keeping_ties(copy.deepcopy(model), fx_shard.xla_device())
    return shard_with(strategy, model, mesh, plan, example_inputs)


def shard_with(strategy: str, model: nn.Module, mesh, plan: dict, example_inputs: tuple) -> fx.GraphModule:
    """``model`` sharded on ``mesh`` the way ``strategy`` does it."""
    if strategy in FX_SHARD_FUSED:
        return fx_shard.shard(model, mesh, plan, example_inputs=example_inputs, fused=FX_SHARD_FUSED[strategy])
    pipeline = Pipeline(mesh_shape_of(mesh), only=BASELINE_PASSES[strategy])
    return materialize(pipeline.transform(model, _plan(strategy, plan), example_inputs), mesh)


def ideal_parameter_bytes(model: nn.Module, plan: dict, mesh_shape: dict[str, int], example_inputs: tuple) -> int:
    """Per-device parameter bytes if every tensor ``plan`` shards were split over the whole mesh.

    The plan as written (fused layers split into parts, each part's rows over
    the tensor-parallel axis), with no fitting to head counts: the yardstick
    for what any strategy keeps per device. No XLA needed.
    """
    from fx_shard.report import parameter_bytes

    gm = Pipeline(mesh_shape, only=BASELINE_PASSES["seed"]).transform(model, plan, example_inputs)
    return parameter_bytes(gm)[2]


def _plan(strategy: str, plan: dict) -> ShardPlan:
    base = ShardPlan(plan)
    if strategy == "seed":
        return base
    fused_styles = {s.name for s in registered() if s.fused}
    fused = {p: Colwise.name for p, layer in base.entries.items() if layer.style in fused_styles}
    # Layers the class rules make fused (vLLM-style models) are named by pattern too.
    fused.update({"*.qkv_proj": Colwise.name, "*.gate_up_proj": Colwise.name} if not plan else {})
    return ShardPlan({**plan, **fused})
