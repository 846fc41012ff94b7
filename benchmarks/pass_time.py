"""How long ``fx_shard.transform`` (capture + plan + passes) takes, from 1 to 80 Llama-70B-shaped layers.

    python benchmarks/pass_time.py                 # 1..80 layers, 3 repeats each
    python benchmarks/pass_time.py --quick         # 1, 8, 40, 80 layers, 1 repeat
    python benchmarks/pass_time.py --profile       # and a cProfile of the largest, by function

Models are built on the ``meta`` device (nothing is allocated) with Llama-70B's
shapes: hidden 8192, 64 heads, 8 KV heads, head_dim 128, intermediate 28672,
vocabulary 128256; plan ``PLANS["llama"]``, mesh ``{"tp": 8}``, example inputs
``(2, 16)`` token ids on ``meta``. No XLA is involved.

Each phase's time is what the pipeline itself measures (``Pipeline.timings``:
the model copy, capture, shape propagation, plan, each pass, the pass diff,
the summary); nested inside those, torch.fx's ``GraphModule.recompile``,
``Graph.lint`` and ShapeProp's fake copy are timed by wrapping them in this
process only.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from progress import Progress  # noqa: E402

LLAMA_70B = dict(
    hidden_size=8192,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=28672,
    vocab_size=128256,
)
MESH_SHAPE = {"tp": 8}
LAYERS = (1, 2, 4, 8, 16, 32, 48, 64, 80)
QUICK_LAYERS = (1, 8, 40, 80)
GOAL_SECONDS = 0.8
GOAL_LAYERS = 80

# Phases in the order the pipeline runs them (``Pipeline.timings``; "passes" sums its "pass X"
# entries); the NESTED ones happen inside them: "fake copy" is ShapeProp's deep copy of a
# GraphModule to fake tensors (inside "shapes"), "recompile" (Python code generation + compile of
# the GraphModule) and "lint" happen in capture and passes.
PHASES = ("copy", "capture", "shapes", "plan", "passes", "diff", "summarize", "code", "other")
NESTED = ("fake copy", "recompile", "lint")


class PhaseTimer:
    """Wall time and call count of torch.fx functions the pipeline calls, by wrapping them in this process."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list[tuple[object, str, object]] = []

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def wrap(self, owner: object, attr: str, phase: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
                self.calls[phase] += 1

        self._undo.append((owner, attr, original))
        setattr(owner, attr, timed)

    def install(self) -> "PhaseTimer":
        import torch._dynamo.utils  # ShapeProp imports deepcopy_to_fake_tensor from here at each call
        from torch import fx

        self.wrap(torch._dynamo.utils, "deepcopy_to_fake_tensor", "fake copy")
        self.wrap(fx.GraphModule, "recompile", "recompile")
        self.wrap(fx.Graph, "lint", "lint")
        return self

    def uninstall(self) -> None:
        while self._undo:
            owner, attr, original = self._undo.pop()
            setattr(owner, attr, original)


def _model_and_inputs(layers: int):
    from fx_shard import models

    model = models.build("llama", device="meta", num_hidden_layers=layers, **LLAMA_70B)
    inputs = tuple(t.to("meta") for t in models.example_inputs("llama", **LLAMA_70B))
    return model, inputs


def _transform(model, inputs) -> tuple:
    """``fx_shard.transform``'s pipeline on ``model``: the result and the seconds of each phase."""
    from fx_shard.models.plans import PLANS
    from fx_shard.pipeline import Pipeline

    pipeline = Pipeline(MESH_SHAPE)
    return pipeline.transform(model, PLANS["llama"], inputs), pipeline.timings


def measure(layers: int, repeats: int, timer: PhaseTimer) -> dict:
    """Median transform time over ``repeats`` runs on a fresh meta model of ``layers`` layers, with phases."""
    from fx_shard.capture import capture

    model, inputs = _model_and_inputs(layers)
    nodes_captured = count_nodes(capture(model))
    runs = []
    for _ in range(repeats):
        timer.reset()
        start = time.perf_counter()
        gm, timings = _transform(model, inputs)
        total = time.perf_counter() - start
        phases = {**timings, **timer.seconds}
        phases["passes"] = sum(v for k, v in timings.items() if k.startswith("pass "))
        phases["other"] = total - sum(phases.get(p, 0.0) for p in PHASES if p != "other")
        start = time.perf_counter()
        gm.code  # noqa: B018  (the graph's Python code, generated at first use: after transform, not in it)
        code = time.perf_counter() - start
        runs.append((total, phases, dict(timer.calls), code))
    total, seconds, calls, code = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    return {
        "layers": layers,
        "nodes_captured": nodes_captured,
        "nodes": count_nodes(gm),
        "seconds": total,
        "code_seconds": code,
        "all_seconds": [r[0] for r in runs],
        "phases": seconds,
        "calls": calls,
    }


def count_nodes(module) -> int:
    """Graph nodes of ``module`` if it is a GraphModule, else summed over the GraphModules inside it."""
    from torch import fx

    if isinstance(module, fx.GraphModule):
        return len(module.graph.nodes)
    return sum(len(m.graph.nodes) for m in module.modules() if isinstance(m, fx.GraphModule))


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``: (a, b, r²)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx if sxx else 0.0
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1 - ss_res / ss_tot if ss_tot else 1.0


def profile(layers: int, top: int = 25) -> dict:
    """cProfile of one transform of ``layers`` layers: the functions with the most cumulative and own time."""
    model, inputs = _model_and_inputs(layers)
    _transform(model, inputs)  # warm caches (imports, fake-tensor dispatch tables)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    _transform(model, inputs)
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler, stream=io.StringIO())

    def rows(key: str) -> list[dict]:
        entries = sorted(stats.stats.items(), key=lambda kv: kv[1][3 if key == "cumulative" else 2], reverse=True)
        out = []
        for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in entries[:top]:
            short = file.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
            out.append({"function": f"{short}:{line}({func})", "calls": ncalls,
                        "own_s": round(tottime, 4), "cumulative_s": round(cumtime, 4)})
        return out

    return {"layers": layers, "profiled_wall_s": wall, "by_cumulative": rows("cumulative"), "by_own": rows("own")}


def run(layer_counts: tuple[int, ...], repeats: int, do_profile: bool) -> dict:
    timer = PhaseTimer().install()
    progress = Progress(len(layer_counts) + int(do_profile), label="pass_time")
    try:
        progress.start("warm-up (imports, fake-tensor caches)")
        model, inputs = _model_and_inputs(1)
        _transform(model, inputs)
        rows = []
        for layers in layer_counts:
            progress.start(f"transform, {layers} layers x {repeats}")
            rows.append(measure(layers, repeats, timer))
            progress.done()
    finally:
        timer.uninstall()
    result = {"mesh_shape": MESH_SHAPE, "config": LLAMA_70B, "repeats": repeats, "rows": rows}
    if len(rows) >= 2:
        a, b, r2 = fit_line([r["layers"] for r in rows], [r["seconds"] for r in rows])
        an, bn, r2n = fit_line([r["nodes"] for r in rows], [r["seconds"] for r in rows])
        result["fit"] = {"intercept_s": a, "per_layer_s": b, "r2": r2, "per_node_s": bn, "r2_nodes": r2n}
    if do_profile:
        progress.start(f"cProfile of {max(layer_counts)} layers")
        result["profile"] = profile(max(layer_counts))
        progress.done()
    progress.close()
    return result


def tables(result: dict) -> str:
    """Markdown tables: time per layer count with phases, the fit, and the profile if any."""
    from tabulate import tabulate

    rows = result["rows"]
    pass_names = sorted({p for r in rows for p in r["phases"] if p.startswith("pass ")},
                        key=lambda p: list(rows[-1]["phases"]).index(p) if p in rows[-1]["phases"] else 0)
    headers = ["layers", "nodes captured", "nodes after", "transform s", "ms / layer", "µs / node",
               *PHASES, *NESTED, "code at first use s"]
    body = []
    for r in rows:
        ph, calls = r["phases"], r["calls"]
        body.append([
            r["layers"], r["nodes_captured"], r["nodes"], f"{r['seconds']:.3f}",
            f"{1000 * r['seconds'] / r['layers']:.1f}", f"{1e6 * r['seconds'] / r['nodes']:.0f}",
            *(f"{ph.get(p, 0):.3f}" for p in PHASES),
            *(f"{ph.get(p, 0):.3f} ({calls.get(p, 0)}x)" for p in NESTED),
            f"{r['code_seconds']:.3f}" if "code_seconds" in r else "",
        ])
    out = [tabulate(body, headers, tablefmt="github")]
    largest = rows[-1]
    if pass_names:
        out += ["", f"Passes at {largest['layers']} layers, each pass's own work (a graph's Python code is generated "
                "once, when first needed: not inside transform):", "",
                tabulate([[p.removeprefix("pass "), f"{largest['phases'][p]:.3f}"] for p in pass_names],
                         ["pass", "s"], tablefmt="github")]
    fit = result.get("fit")
    if fit:
        out += ["", f"Least-squares fit: transform s = {fit['intercept_s']:.3f} + {1000 * fit['per_layer_s']:.1f} ms "
                f"x layers (r² = {fit['r2']:.4f}); per graph node {1e6 * fit['per_node_s']:.0f} µs "
                f"(r² = {fit['r2_nodes']:.4f})."]
    prof = result.get("profile")
    if prof:
        out += ["", f"cProfile of one {prof['layers']}-layer transform (wall {prof['profiled_wall_s']:.2f} s under the "
                "profiler, which about doubles it): functions by cumulative time, then by own time.", "",
                tabulate([[p["function"], p["calls"], p["cumulative_s"], p["own_s"]] for p in prof["by_cumulative"]],
                         ["function", "calls", "cumulative s", "own s"], tablefmt="github"),
                "",
                tabulate([[p["function"], p["calls"], p["own_s"], p["cumulative_s"]] for p in prof["by_own"][:12]],
                         ["function", "calls", "own s", "cumulative s"], tablefmt="github")]
    return "\n".join(out)


def goal(result: dict) -> tuple[bool, str]:
    """Whether the 80-layer transform took under ``GOAL_SECONDS``, and a sentence saying so."""
    row = next((r for r in result["rows"] if r["layers"] == GOAL_LAYERS), None)
    if row is None:
        return False, f"no {GOAL_LAYERS}-layer run"
    ok = row["seconds"] < GOAL_SECONDS
    ratio = row["seconds"] / GOAL_SECONDS
    return ok, (f"{GOAL_LAYERS} layers ({row['nodes']} nodes): {row['seconds']:.2f} s, "
                f"{'under' if ok else 'over'} the {GOAL_SECONDS:g} s goal ({ratio:.2f}x the goal)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", help=f"layer counts (default {' '.join(map(str, LAYERS))})")
    parser.add_argument("--repeats", type=int, help="runs per layer count; the median is kept (default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help=f"layers {' '.join(map(str, QUICK_LAYERS))}, 1 repeat")
    parser.add_argument("--profile", action="store_true", help="add a cProfile of the largest model, by function")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    layer_counts = tuple(args.layers or (QUICK_LAYERS if args.quick else LAYERS))
    repeats = args.repeats or (1 if args.quick else 3)
    result = run(layer_counts, repeats, args.profile)
    result["goal"] = dict(zip(("met", "text"), goal(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(tables(result))
    print()
    print(result["goal"]["text"])


if __name__ == "__main__":
    main()
