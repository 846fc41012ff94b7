"""What one worker process runs and measures: each strategy placed, warmed up and timed, and its program read.

``step_time.py`` starts one such process per runtime (device count; auto-sharding
or not), because the device count is fixed when XLA starts; :func:`worker`
prints its rows as JSON lines. Step times and compilations come from torch_xla
(``CompileTime`` metric); collectives, memory and matmul FLOPs from the
partitioned HLO dump, read with ``fx_shard.hlo``. torch and torch_xla are
imported inside the functions, so importing this module starts nothing.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from cases import INPUT_SHAPES, Item, build_overrides

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch_xla.distributed.spmd import Mesh

MAX_COMPILING_STEPS = 4


def linear_weights_trainable(model: nn.Module) -> bool:
    """Whether the linear-like layers train (vLLM-style layers hold requires_grad=False weights)."""
    from fx_shard.capture import is_linear_like

    weights = [m.weight for m in model.modules() if is_linear_like(m) and getattr(m, "weight", None) is not None]
    return bool(weights) and all(w.requires_grad for w in weights)


def _sync() -> None:
    import torch_xla
    import torch_xla.core.xla_model as xm

    torch_xla.sync()
    xm.wait_device_ops()


def _compiles() -> tuple[int, float]:
    """(compilations so far, their total compile seconds) from torch_xla's CompileTime metric."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return (0, 0.0) if data is None else (int(data[0]), data[1] / 1e9)


# Partitioned programs by graph hash, for a strategy whose graph an earlier one already compiled
# (on 1 device, e.g., "seed" can be the very program "replicated" compiled: no new dump then).
_PROGRAMS: dict[str, list[Path]] = {}


class Runner:
    """One strategy's model, placed, with its step function, its warm-up results and its timed steps."""

    def __init__(self, item: Item, model: nn.Module, inputs: tuple[torch.Tensor, ...], mesh: Mesh) -> None:
        import torch
        import torch.nn.functional as F
        from baselines import place

        import fx_shard
        from fx_shard.collectives import device_parameter_bytes
        from fx_shard.models.plans import PLANS
        from fx_shard.report import parameter_bytes
        from fx_shard.sharding import SHARDING_KEY

        self.item = item
        self.row: dict = {}
        self.samples: list[float] = []
        self.recompiles = 0
        self.recompile_s = 0.0
        self.programs: list[Path] | None = None
        self.other_programs: list[str] = []
        start = time.perf_counter()
        self.module = place(item.strategy, model, mesh, PLANS[item.model], inputs)
        self.row["setup_s"] = time.perf_counter() - start
        if SHARDING_KEY in getattr(self.module, "meta", {}):
            self.row["parameter_bytes_plan_ideal"] = parameter_bytes(self.module)[2]
        self.row["parameter_bytes_placed"] = device_parameter_bytes(self.module)
        device = fx_shard.xla_device()
        self.x = tuple(t.to(device) for t in inputs)
        self.training = item.mode == "training"
        if not self.training:
            self.module.eval()
            return
        self.module.train()
        if item.model == "vit":
            generator = torch.Generator().manual_seed(1)
            target = torch.randint(0, model.config.num_classes, (inputs[0].shape[0],), generator=generator)
        else:
            target = torch.roll(inputs[0], -1, dims=1)
        self.target = target.to(device)
        self.optimizer = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=1e-4)
        self._loss = F.cross_entropy

    def step(self) -> torch.Tensor:
        """One step, not synchronised; returns the output (inference) or the loss (training)."""
        import torch

        if not self.training:
            with torch.no_grad():
                return self.module(*self.x)
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.module(*self.x)
        loss = self._loss(logits.flatten(0, -2), self.target.flatten())
        loss.backward()
        self.optimizer.step()
        return loss

    def _pending(self, out: torch.Tensor) -> list[torch.Tensor]:
        """The tensors the step leaves pending, for a graph hash that names the step's program."""
        if not self.training:
            return [out]
        tensors = [out]
        for p in self.module.parameters():
            tensors.append(p)
            if p.grad is not None:
                tensors.append(p.grad)
        for state in self.optimizer.state.values():
            tensors += [t for t in state.values() if hasattr(t, "device") and t.device.type == "xla"]
        return tensors

    def timed(self, dump: Path | None = None) -> tuple[float, int, float, torch.Tensor]:
        """(seconds, compilations, compile seconds, output) of one synchronised step.

        With ``dump``, also find the partitioned programs compiled for it: the model's step
        (``SyncTensorsGraph``) is remembered under the graph's hash (``self.programs``); others
        (auto-sharding's ``ReshardData``) are listed in ``self.other_programs``.
        """
        import torch_xla

        from fx_shard.hlo import (
            dump_snapshot,
            is_transfer_program,
            partitioned_modules,
            program_name,
        )

        before = dump_snapshot(dump) if dump is not None else None
        count0, seconds0 = _compiles()
        t0 = time.perf_counter()
        out = self.step()
        key = torch_xla._XLAC._get_graph_hash(self._pending(out)).hex() if dump is not None else None
        _sync()
        elapsed = time.perf_counter() - t0
        count1, seconds1 = _compiles()
        if dump is not None:
            files = [f for f in partitioned_modules(dump, before) if not is_transfer_program(f)]
            step_files = [f for f in files if program_name(f).startswith("SyncTensorsGraph")]
            self.other_programs += [program_name(f).split(".")[0] for f in files if f not in step_files]
            if step_files:
                _PROGRAMS[key] = step_files
            self.programs = _PROGRAMS.get(key)
        return elapsed, count1 - count0, seconds1 - seconds0, out

    def warm_up(self, dump: Path) -> torch.Tensor:
        """Steps until one compiles nothing; returns the first step's output."""
        counts, seconds, first = [], 0.0, None
        for i in range(MAX_COMPILING_STEPS + 1):
            elapsed, compiled, compile_s, out = self.timed(dump)
            if i == 0:
                first, self.row["first_step_s"] = out, elapsed
            if compiled == 0:
                break
            counts.append(compiled)
            seconds += compile_s
        self.row.update(compile_s=seconds, warmup_compiles=sum(counts), compiling_steps=len(counts))
        return first

    def finish(self) -> dict:
        """Step statistics, collectives, memory and FLOPs of the steady program, parameter bytes."""
        from fx_shard.collectives import device_parameter_bytes
        from fx_shard.hlo import collectives_in, matmul_flops, program_memory, program_peak_memory

        samples = self.samples
        quartiles = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
        row = self.row
        row.update(step_s_median=statistics.median(samples), step_s_min=min(samples), step_s_max=max(samples),
                   step_s_iqr=quartiles[2] - quartiles[0], step_samples=samples, steady_recompiles=self.recompiles,
                   steady_recompile_s=self.recompile_s, other_programs=sorted(set(self.other_programs)))
        programs = self.programs
        if programs:
            dump = programs[0].parent
            stats = collectives_in(programs)
            row["collectives"] = {op: s.count for op, s in stats.items()}
            row["collective_bytes"] = sum(s.bytes for s in stats.values())
            memory = [program_memory(dump, f) for f in programs]
            peaks = [program_peak_memory(dump, f) for f in programs]
            row["memory_alloc_bytes"] = sum(m for m in memory if m is not None) if None not in memory else None
            row["memory_peak_bytes"] = sum(p for p in peaks if p is not None) if None not in peaks else None
            row["matmul_flops"] = sum(matmul_flops(f.read_text(errors="replace")) for f in programs)
            row["programs"] = [f.name for f in programs]
        else:
            row["programs_note"] = "no partitioned program found for the steady step's graph"
        row["parameter_bytes"] = device_parameter_bytes(self.module)
        return row


def measure_case(items: list[Item], mesh: Mesh, dump: Path, steps: int, warmup: int, max_seconds: float) -> list[dict]:
    """Rows for strategies ``items`` (same model, size, mode, devices), timed in interleaved rounds.

    Each strategy is placed and warmed up in turn; then every round runs one
    step of each (in a rotating order), so load from outside this process
    (other jobs on the same cores) falls on all strategies alike.
    """
    import torch
    import torch_xla.runtime as xr

    from fx_shard import models

    first = items[0]
    base = {"device_type": xr.device_type()}
    overrides = build_overrides(first.model, first.size)
    model = models.build(first.model, **overrides)
    inputs = models.example_inputs(first.model, **INPUT_SHAPES[first.size], **overrides)
    if first.mode == "training" and not linear_weights_trainable(model):
        return [{**asdict(i), **base, "skipped": "linear-like weights have requires_grad=False (vLLM-style "
                 "layers are for inference)"} for i in items]
    from baselines import ideal_parameter_bytes

    from fx_shard.models.plans import PLANS

    total_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    ideal = ideal_parameter_bytes(model, PLANS[first.model], {"tp": first.devices}, inputs)
    base.update(parameter_bytes_total=total_bytes, parameter_bytes_ideal=ideal)
    reference = None
    if first.mode == "inference":
        with torch.no_grad():
            reference = model(*inputs)

    rows: dict[str, dict] = {}
    runners: list[Runner] = []
    for item in items:
        try:
            runner = Runner(item, model, inputs, mesh)
            out = runner.warm_up(dump)
            if reference is not None:
                runner.row["rel_error"] = ((out.cpu() - reference).abs().max() / reference.abs().max()).item()
            runners.append(runner)
        except Exception as e:  # noqa: BLE001 - one failing strategy must not stop the others
            traceback.print_exc()
            rows[item.key] = {**asdict(item), **base, "error": f"{type(e).__name__}: {str(e).strip()[:600]}"}
    for _ in range(warmup):
        for runner in runners:
            runner.timed()
    loads = [os.getloadavg()[0]]
    start = time.perf_counter()
    for round_ in range(steps):
        for k in range(len(runners)):
            runner = runners[(round_ + k) % len(runners)]
            elapsed, compiled, compile_s, _ = runner.timed()
            runner.samples.append(elapsed)
            runner.recompiles += compiled
            runner.recompile_s += compile_s
        if round_ >= 2 and time.perf_counter() - start > max_seconds:
            break
    loads.append(os.getloadavg()[0])
    for runner in runners:
        row = {**asdict(runner.item), **base, **runner.finish(), "load_avg_1min": loads}
        rows[runner.item.key] = row
    return [rows[i.key] for i in items]


def xla_memory_info_note() -> str:
    """What torch_xla's memory query says on this runtime (it fails on the SPMD virtual device)."""
    import torch_xla.core.xla_model as xm

    import fx_shard

    try:
        return f"xm.get_memory_info: {xm.get_memory_info(fx_shard.xla_device())}"
    except Exception as e:  # noqa: BLE001 - recorded, not handled
        return f"xm.get_memory_info: {type(e).__name__}: {str(e).strip().splitlines()[0]}"


def worker(spec: dict) -> None:
    """Run ``spec["items"]`` (one device count; auto or not), one case (model, size, mode) at a time,
    printing one JSON line per event."""
    import gc

    from baselines import start_runtime

    import fx_shard
    from fx_shard.xla import hlo_dump_dir

    def emit(event: dict) -> None:
        print(json.dumps(event), flush=True)

    items = [Item(**i) for i in spec["items"]]
    devices = items[0].devices
    auto = items[0].strategy == "auto"
    try:
        start_runtime(devices, auto=auto)
        mesh = fx_shard.make_mesh()
    except Exception as e:  # noqa: BLE001 - every item of this runtime fails the same way
        for item in items:
            emit({"event": "row", "row": {**asdict(item), "error": f"runtime: {type(e).__name__}: {e}"}})
        return
    emit({"event": "info", "memory_info": xla_memory_info_note()})
    dump = hlo_dump_dir()
    cases: dict[tuple, list[Item]] = {}
    for item in items:
        cases.setdefault((item.model, item.size, item.mode), []).append(item)
    for case in cases.values():
        emit({"event": "start", "keys": [i.key for i in case]})
        try:
            rows = measure_case(case, mesh, dump, spec["steps"], spec["warmup"], spec["max_seconds"])
        except Exception as e:  # noqa: BLE001 - one failing case must not stop the run
            traceback.print_exc()
            rows = [{**asdict(i), "error": f"{type(e).__name__}: {str(e).strip()[:600]}"} for i in case]
        for row in rows:
            emit({"event": "row", "row": row})
        gc.collect()

