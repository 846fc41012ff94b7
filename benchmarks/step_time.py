"""Step time, compilations, collectives and memory of each sharding strategy, per model, size and mesh size.

    python benchmarks/step_time.py --quick                       # a minute or two
    python benchmarks/step_time.py --json results.json           # the full run (tens of minutes on 2 cores)
    python benchmarks/step_time.py --doc docs/benchmarks.md      # the full run, pass_time.py too, and the doc

Strategies (``benchmarks/baselines.py``): ``replicated`` (the model moved to
the XLA device as is), ``seed`` (vLLM's ``shard_model`` way: fused layers
split, outputs concatenated), ``fused`` (fused weights sharded as one), ``auto``
(torch_xla's auto-sharding, ``xr.use_spmd(auto=True)``, in a process of its
own), ``fx_shard`` (``fx_shard.shard``, fused layers split), ``interleave``
(``fx_shard.shard(..., fused="interleave")``: fused QKV / gate_up layers kept
one matmul, rows reordered per device, and separate q/k/v or gate/up layers
computed as one matmul, ``FuseSiblingLinears``); not run on 1 device, where it
is ``fx_shard`` again. Modes:
``inference`` (forward under ``no_grad``) and ``training`` (forward,
cross-entropy, backward, AdamW step), the latter only for models with
trainable parameters.

The device count is fixed when a process's XLA runtime starts, so every mesh
size runs in child processes: one for the five strategies that share a
runtime, one for ``auto``. A child reports rows as JSON lines on stdout; its
stderr (XLA's log) goes to a file beside its HLO dump, in a temporary
directory removed when the child ends (when it fails, the end of the log is
shown and kept in the rows' ``log_tail``). Progress is on stderr.

What is measured, per (model, size, devices, strategy, mode):

- first step: wall time of the first step (trace, compile, run); ``compile s``
  is XLA's own compile time (``CompileTime`` metric) summed over warm-up.
- warm-up runs steps until one does not compile (training compiles twice: the
  optimizer's state appears after the first step; auto-sharding may recompile
  after it reshards the parameters), then ``--warmup`` more.
- steady step: median and spread (interquartile range over the median) of
  ``--steps`` steps, each ended by ``torch_xla.sync()`` and
  ``xm.wait_device_ops()``; ``recompiles`` counts compilations during them
  (must be 0).
- collectives per step and the per-device bytes of their results, from the
  partitioned HLO of the steady step's program (``fx_shard.hlo``, the reader
  behind ``fx_shard.collectives``; that function runs a no-grad forward only,
  so here the dump is read around the warm-up steps of either mode).
- per-device parameter bytes (``fx_shard.collectives.device_parameter_bytes``,
  from torch_xla's shards, after the timed steps so auto-sharding's choice
  counts); ``ideal`` = every tensor the model's plan shards split over all
  devices, the rest replicated (``baselines.ideal_parameter_bytes``).
- memory per device from XLA's buffer assignment of the step's program:
  ``alloc`` (all allocations, ``Collectives.memory_bytes``' figure) and
  ``peak`` (the live peak). torch_xla's own memory query does not work on
  the SPMD virtual device (recorded in the JSON).
- matmul GFLOP per device: 2 x result elements x contracted size of every
  ``dot`` in the partitioned HLO (convolutions not counted).
- inference output against the unsharded CPU model (max |error| / max |reference|).

Files: this one is the command line and runs the child processes;
``measure.py`` is what a child runs and measures, ``benchmark_doc.py`` makes
the tables and docs/benchmarks.md from the rows (also from a saved ``--json``,
with ``--from-json``), ``cases.py`` names the strategies, models and sizes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmark_doc import doc, print_tables  # noqa: E402
from cases import DEVICES, INPUT_SHAPES, MODES, OVERRIDES, SIZES, STRATEGIES, Item, has_size  # noqa: E402
from progress import Progress  # noqa: E402

# --quick: llama and gpt2 at the default size; 1 device with replicated only (every strategy is the same
# program there), 8 devices with all strategies.
QUICK = dict(devices=(1, 8), models=("llama", "gpt2"), sizes=("default",), steps=5, warmup=1,
             one_device_strategies=("replicated",))


def differs(strategy: str, devices: int) -> bool:
    """Whether ``strategy`` is a program of its own: ``interleave`` is ``fx_shard`` again on one device,
    so it is not run there (saves a compile and the timed steps)."""
    return strategy != "interleave" or devices > 1


def plan_items(devices: Iterable[int], strategies: Iterable[str], model_names: Iterable[str], sizes: Iterable[str],
               modes: Iterable[str], one_device_strategies: Iterable[str] | None = None) -> list[Item]:
    """Every configuration of the run, leaving out sizes a model does not have and programs that repeat another."""
    return [Item(d, s, m, z, mode) for d in devices for s in strategies for m in model_names for z in sizes
            for mode in modes if has_size(m, z) and differs(s, d)
            and (d > 1 or not one_device_strategies or s in one_device_strategies)]


def _follow(proc: subprocess.Popen, by_key: dict[str, Item], rows: dict, progress: Progress, info: dict) -> list[Item] | None:
    """Read a child's events until it exits; returns the case it was in when it stopped (None between cases)."""
    current = None
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event["event"] == "start":
            current = [by_key[k] for k in event["keys"]]
            c = current[0]
            progress.start(f"{c.devices} dev · {c.model} {c.size} · {c.mode} · {', '.join(i.strategy for i in current)}")
        elif event["event"] == "info":
            info.setdefault("memory_info", event["memory_info"])
        elif event["event"] == "row":
            row = event["row"]
            key = Item(*(row[f] for f in ("devices", "strategy", "model", "size", "mode"))).key
            rows[key] = row
            note = ""
            if "error" in row:
                note = f"failed: {by_key[key].label()}: {row['error'][:300]}"
            elif row.get("steady_recompiles"):
                note = f"warning: {by_key[key].label()} recompiled {row['steady_recompiles']}x in steady steps"
            progress.done(note=note)
            if current and all(i.key in rows for i in current):
                current = None
    return current


def run_group(items: list[Item], args: argparse.Namespace, progress: Progress, info: dict) -> list[dict]:
    """Run ``items`` (same devices; all auto or none) in child processes, restarting after a crash."""
    rows: dict[str, dict] = {}
    remaining = list(items)
    while remaining:
        spec = {"items": [asdict(i) for i in remaining], "steps": args.steps, "warmup": args.warmup,
                "max_seconds": args.max_seconds}
        # The child's HLO dump and its stderr (XLA's log) in a directory of this run's, removed whatever happens.
        scratch = Path(tempfile.mkdtemp(prefix="fx_shard_bench_"))
        log = scratch / "worker.log"
        env = {**os.environ, "XLA_FLAGS": f"--xla_dump_to={scratch / 'hlo'} --xla_dump_hlo_as_text"}
        if env.get("PJRT_DEVICE", "CPU") == "CPU":
            env.update(PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(remaining[0].devices))
        current = None
        try:
            with log.open("w") as err:
                proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                        stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
                try:
                    current = _follow(proc, {i.key: i for i in remaining}, rows, progress, info)
                finally:  # also on Ctrl-C: no orphaned child
                    if proc.poll() is None:
                        proc.kill()
                    proc.wait()
            tail = log.read_text(errors="replace").strip().splitlines()[-25:]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        remaining = [i for i in remaining if i.key not in rows]
        if not remaining:
            break
        # The child died. Inside a case: that case's unreported strategies failed and the rest get a
        # new process. Before any case (or between cases): everything left failed the same way.
        reason = next((t for t in reversed(tail) if "Check failed" in t or "Error" in t), tail[-1] if tail else "")
        error = {"error": f"process exited with {proc.returncode}: {reason.strip()[:600]}", "log_tail": tail}
        crashed = [i for i in (current or []) if i.key not in rows] or remaining
        for item in crashed:
            rows[item.key] = {**asdict(item), **error}
        more = f" and {len(crashed) - 1} more" if len(crashed) > 1 else ""
        log_tail = "\n".join(f"    {line}" for line in tail[-10:])
        progress.done(len(crashed), note=f"crashed: {crashed[0].label()}{more} (exit {proc.returncode}): "
                                         f"{reason.strip()[:200]}; the end of its log:\n{log_tail}")
        remaining = [i for i in remaining if i.key not in rows]
    return [rows[i.key] for i in items if i.key in rows]


def run(args: argparse.Namespace) -> dict:
    """Every configuration ``args`` asks for, one device count (and auto or not) per child process, with the
    run's metadata."""
    items = plan_items(args.devices, args.strategies, args.models, args.sizes, args.modes, args.one_device_strategies)
    groups: list[list[Item]] = []
    for devices in args.devices:
        spmd = [i for i in items if i.devices == devices and i.strategy != "auto"]
        auto = [i for i in items if i.devices == devices and i.strategy == "auto"]
        groups += [g for g in (spmd, auto) if g]
    progress = Progress(len(items), label="step_time")
    info: dict = {"source_hash_start": source_hash(), "git_start": machine()["git"]}
    rows = []
    for group in groups:
        rows += run_group(group, args, progress, info)
    progress.close()
    return {"meta": machine() | {"memory_info": info.get("memory_info"), "argv": sys.argv[1:],
                                  "source_hash_start": info["source_hash_start"], "source_hash_end": source_hash(),
                                  "git_start": info["git_start"],
                                  "steps": args.steps, "warmup": args.warmup, "overrides": OVERRIDES,
                                  "input_shapes": INPUT_SHAPES}, "rows": rows}


def source_hash() -> str:
    """A hash of fx_shard's sources (fx_shard/, passes/), to tell whether they changed during a run."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("fx_shard/**/*.py"), *ROOT.glob("passes/**/*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine() -> dict:
    """nproc, memory, CPU model, versions, git commit: what the doc states about the run."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    try:
        from importlib.metadata import version

        xla_version = version("torch_xla")
    except Exception:  # noqa: BLE001
        xla_version = "?"
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split("\n")
    return {"nproc": os.cpu_count(), "memory_bytes": mem, "cpu": cpu, "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_xla": xla_version,
            "git": git, "git_modified": sorted(line[3:] for line in dirty if line.strip()),
            "date": datetime.date.today().isoformat()}


def run_pass_time(quick: bool) -> dict:
    """pass_time.py in a child process (no XLA there), with a profile of the largest model unless quick."""
    with tempfile.TemporaryDirectory(prefix="fx_shard_pass_time_") as scratch:
        out = Path(scratch) / "pass_time.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "pass_time.py"), "--json", str(out)]
        proc = subprocess.run(cmd + (["--quick"] if quick else ["--profile"]), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or [""])[-1]
            raise RuntimeError(f"pass_time.py exited with {proc.returncode}: {last}")
        return json.loads(out.read_text())


def main() -> None:
    """Measure (or, with ``--from-json``, load) the rows, print the tables, write ``--json`` and ``--doc``;
    with ``--worker``, be one child process."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--sizes", nargs="+", choices=SIZES)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default 10, quick 5)")
    parser.add_argument("--warmup", type=int, help="steps after the last compiling one, untimed (default 2, quick 1)")
    parser.add_argument("--max-seconds", type=float, default=20.0,
                        help="stop timing a configuration after this long (at least 3 steps)")
    parser.add_argument("--quick", action="store_true",
                        help="1 and 8 devices, llama and gpt2 at the default size, 5 steps: a minute or two")
    parser.add_argument("--json", type=Path, help="write all rows (with every step's time) as JSON here")
    parser.add_argument("--doc", type=Path, help="also run pass_time.py and write this markdown file")
    parser.add_argument("--from-json", type=Path, help="make the tables (and --doc) from a saved --json, run nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from measure import worker

        worker(json.loads(args.worker))
        return
    from fx_shard import models

    quick = QUICK if args.quick else {}
    args.devices = tuple(args.devices or quick.get("devices", DEVICES))
    args.models = tuple(args.models or quick.get("models", models.MODELS))
    args.sizes = tuple(args.sizes or quick.get("sizes", SIZES))
    args.steps = args.steps or quick.get("steps", 10)
    args.warmup = args.warmup if args.warmup is not None else quick.get("warmup", 2)
    args.one_device_strategies = quick.get("one_device_strategies")

    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        result = run(args)
        result["meta"]["command"] = "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
        if args.json:  # written now, so a failure below loses nothing
            args.json.write_text(json.dumps(result, indent=1))
        if args.doc:
            try:
                result["pass_time"] = run_pass_time(args.quick)
            except Exception as e:  # noqa: BLE001 - the step-time results stand on their own
                result["pass_time_error"] = f"{type(e).__name__}: {e}"
                print(f"pass_time.py failed: {e}", file=sys.stderr)
            if args.json:
                args.json.write_text(json.dumps(result, indent=1))
    print_tables(result)
    if args.doc:
        args.doc.write_text(doc(result))
        print(f"\nwrote {args.doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
