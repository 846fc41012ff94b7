"""The zoo (tests/zoo.py) sharded with plan="auto": writes docs/zoo.md.

    python benchmarks/zoo.py                     # 4 devices, about 4 minutes on 2 cores
    python benchmarks/zoo.py --devices 2 --out FILE --only llama,bert

Per model: whether ``shard`` and the ``torch.compile`` backend give the
unsharded output, the collectives of one forward counted in XLA's
partitioned HLO against the Megatron optimum, the share of the shardable
matrices' bytes that is split, how the model was captured, and the time
``shard`` took. Every figure is measured here; nothing is written by hand.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fx_shard  # noqa: E402
from fx_shard import xla  # noqa: E402
from fx_shard.errors import FxShardError  # noqa: E402
from fx_shard.geometry import is_transposed_linear  # noqa: E402
from fx_shard.report.gather import graph_modules, model_sharding  # noqa: E402
from tests import zoo  # noqa: E402

TOLERANCE = 1e-5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4, help="mesh size (default 4)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "zoo.md", help="the page to write")
    parser.add_argument("--only", default="", help="comma-separated case names (default: every case)")
    args = parser.parse_args()
    fx_shard.init_runtime(args.devices)  # dumps the HLO (counting needs it) into a directory removed at exit
    mesh = fx_shard.make_mesh()
    names = args.only.split(",") if args.only else [c.name for c in zoo.CASES]
    started = time.perf_counter()
    rows = [measure(zoo.case(name), mesh) for name in names]
    args.out.write_text(page(rows, args, time.perf_counter() - started))
    print(f"wrote {args.out}")


def measure(case: zoo.Case, mesh) -> dict:
    """One table row: the case sharded, run, counted and compiled through the backend."""
    model, args, kwargs = case.build()
    with torch.no_grad():
        expected = zoo.first_tensor(model(*args, **kwargs))
    row = {"model": case.name, "family": case.family}
    start = time.perf_counter()
    try:
        gm = fx_shard.shard(model, mesh, "auto", example_inputs=args, example_kwargs=kwargs)
    except FxShardError as e:
        print(f"{case.name}: {e}", flush=True)
        return {**row, "shard()": f"refused: {str(e)[:60]}"}
    row["shard time"] = f"{time.perf_counter() - start:.1f} s"
    device = fx_shard.xla_device()
    moved = [v.to(device) if isinstance(v, torch.Tensor) else v for v in args]
    moved_kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with torch.no_grad():
        row["shard()"] = _agreement(zoo.first_tensor(gm(*moved, **moved_kwargs)), expected)
    counts = fx_shard.collectives(gm, *args, **kwargs)
    others = {op: n for op, n in counts.nonzero().items() if op != "all-reduce"}
    row["all-reduce"] = f"{counts['all-reduce']} (optimum {case.optimum})"
    row["other collectives"] = ", ".join(f"{n} {op}" for op, n in others.items()) or "none"
    row["shardable bytes split"] = f"{_split_share(gm):.0%}"
    summary = model_sharding(gm)
    parts = sum(1 for _ in graph_modules(gm))
    row["capture"] = "one graph" if isinstance(gm, torch.fx.GraphModule) else f"{parts} graphs, {len(summary.opaque)} kept"
    row["backend"] = _backend(case, model, moved, moved_kwargs, expected, mesh)
    print(", ".join(f"{k}: {v}" for k, v in row.items()), flush=True)
    return row


def _agreement(actual: torch.Tensor, expected: torch.Tensor) -> str:
    error = ((actual.cpu() - expected).abs().max() / expected.abs().max()).item()
    return f"{'exact' if error <= TOLERANCE else 'DIFFERS'} ({error:.0e})"


def _backend(case: zoo.Case, model: nn.Module, args: list, kwargs: dict, expected: torch.Tensor, mesh) -> str:
    if case.openxla_fails:
        return f"openxla itself fails ({case.openxla_fails})"
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model).to(fx_shard.xla_device()), backend=fx_shard.backend(mesh, plan="auto"))
    with torch.no_grad():
        return _agreement(zoo.first_tensor(compiled(*args, **kwargs)), expected)


def _split_share(gm: nn.Module) -> float:
    """Bytes of the shardable matrices that are split over the mesh, over all of them.

    Shardable: linear and Conv1D weights, packed attention ``in_proj_weight``, token embeddings (rows = vocabulary).
    """
    total = split = 0
    seen: set[int] = set()
    for module in gm.modules():
        for name, param in module.named_parameters(recurse=False):
            shardable = (
                (name == "weight" and (isinstance(module, nn.Linear) or is_transposed_linear(module)))
                or (name == "weight" and isinstance(module, nn.Embedding) and module.num_embeddings == zoo.VOCAB)
                or name == "in_proj_weight"
            )
            if not shardable or id(param) in seen:
                continue
            seen.add(id(param))
            size = param.numel() * param.element_size()
            total += size
            split += size if xla.local_shard_bytes(param) < size else 0
    return split / total if total else 0.0


def page(rows: list[dict], args: argparse.Namespace, seconds: float) -> str:
    columns = ["model", "family", "shard()", "backend", "all-reduce", "other collectives", "shardable bytes split",
               "capture", "shard time"]
    table = tabulate([[row.get(c, "") for c in columns] for row in rows], columns, tablefmt="github")
    exact = sum(row.get("shard()", "").startswith("exact") for row in rows)
    optimal = sum(row.get("all-reduce", "").split(" ")[0] == str(zoo.case(row["model"]).optimum)
                  and row.get("other collectives") == "none" and int(row.get("shardable bytes split", "0%")[:-1]) >= 95
                  for row in rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    command = "python benchmarks/zoo.py" + (f" --devices {args.devices}" if args.devices != 4 else "")
    return "\n".join([
        f"<!-- generated by `{command}`: do not edit -->",
        "",
        "# The zoo: public architectures sharded with plan=\"auto\"",
        "",
        f"{len(rows)} architectures from tiny configs with random weights (tests/zoo.py), each sharded over "
        f"{args.devices} XLA CPU devices with `fx_shard.shard(model, mesh, \"auto\", example_inputs / example_kwargs)` "
        "and compiled with `fx_shard.backend(mesh, plan=\"auto\")`, each against the unsharded model "
        f"(exact: max |difference| / max |output| <= {TOLERANCE:g} in float32).",
        "",
        f"- exact through `shard()`: {exact} of {len(rows)}",
        f"- at the optimum (the all-reduces below, no other collective, >= 95% of the shardable bytes split): "
        f"{optimal} of {len(rows)}",
        "",
        "Optimum: 2 all-reduces per block (1 where attention and MLP run in parallel, +1 per cross-attention), "
        "1 per vocabulary-parallel embedding lookup; counted in XLA's partitioned HLO of one forward. "
        "Shardable bytes: linear and Conv1D weights, packed `in_proj_weight`, token embeddings. Capture: one "
        "torch.fx graph, or part by part (graphs, and modules kept as written: their linear layers planned as modules).",
        "",
        table,
        "",
        f"Measured on {os.cpu_count()} {platform.machine()} cores, torch {torch.__version__}, git {commit}, "
        f"{datetime.date.today()}, in {seconds / 60:.1f} minutes.",
        "",
    ])


if __name__ == "__main__":
    main()
