"""The ``fx-shard`` command.

``demo`` shards a built-in model on an XLA mesh and checks it against the
unsharded run; ``report`` prints what fx_shard does to a built-in model and
what it costs (no XLA needed unless ``--measure``).

This module's top level imports neither torch nor the rest of fx_shard, so
``fx-shard --help`` answers at once; the commands import what they use. A
mistake in the command line is one line on stderr (``-v`` adds the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

from fx_shard.errors import FxShardError
from fx_shard.timing import timed

__all__ = ["main"]

logger = logging.getLogger("fx_shard.cli")  # also when run as python -m fx_shard.cli

# The built-in models and report formats, named here so that --help imports no torch
# (tests/test_cli.py checks them against fx_shard.models.MODELS and fx_shard.report.FORMATS).
MODELS = ("llama", "llama-vllm", "gpt2", "vit")
FORMATS = ("text", "markdown", "github", "json")

# Columns the demo's output fits by default (--full: the whole report, unwrapped).
WIDTH = 100
# Devices when neither --devices nor CPU_NUM_DEVICES says.
DEFAULT_DEVICES = 8


class UsageError(Exception):
    """A mistake in the command line the user can fix: printed as one line, no traceback."""


def demo(model_name: str, devices: int | None = None, batch: int = 2, *, full: bool = False, verbose: bool = False) -> int:
    """Shard a built-in model, run it next to the unsharded one, print what happened; 0 when they agree."""
    clock = _Clock()
    with clock("imports"):
        import torch
        import torch._dynamo  # noqa: F401  (shape propagation's fake tensors import it: 2 s, an import, not fx_shard's work)

        import fx_shard
        from fx_shard import models, xla
        from fx_shard.models.plans import PLANS
        from fx_shard.report import report_data
        from fx_shard.report.render.text import TextRenderer
    devices = _runtime_devices(devices)
    model = models.build(model_name)
    inputs = models.example_inputs(model_name, batch=batch)
    with clock("fx_shard"):  # capture, plan, rewrite: a plan that does not fit the mesh fails here, before XLA starts
        gm = _with_devices_hint(lambda: fx_shard.transform(model, PLANS[model_name], mesh_shape={"tp": devices},
                                                           example_inputs=inputs), devices)
    with clock("XLA (start, compile, run)"), _xla_notices_quiet(verbose), torch.no_grad():
        count = _start_runtime(devices)
        xla.materialize(gm, fx_shard.make_mesh())
        counts = fx_shard.collectives(gm, *inputs)  # compiles the forward and runs it once
    with clock("check"):
        result = fx_shard.check(gm, model, inputs)  # the sharded forward again (compiled), the unsharded one
        data = report_data(gm, counts, fold=not full)
        body = fx_shard.report(gm, measured=counts, fold=False) if full else TextRenderer(WIDTH).render(data, ["layers"])
    where = f"{count} XLA {os.environ.get('PJRT_DEVICE', '')} devices".replace("  ", " ")
    verdict = f"{'agrees' if result.ok else 'DISAGREES'} with the unsharded model"
    summary = _demo_summary(model_name, type(model).__name__, where, data)
    summary.insert(1, f"- result: {verdict}: max |difference| / max |output| = {result.error:.1e} "
                      f"(limit {result.tolerance:g})")
    if result.detail:
        summary.insert(2, f"- {result.detail}")
    more = "the whole report follows" if full else "--full prints the whole report: graph diff, bytes, what was left alone"
    summary.append(f"- took {clock.total():.1f} s; {more}")
    print("\n".join(_wrapped(summary, WIDTH)) + "\n")
    print(body)
    ending = [
        f"verdict: {model_name} on {where} {verdict} (error {result.error:.1e}, limit {result.tolerance:g})",
        f"took {clock.total():.1f} s: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in clock.phases.items()),
    ]
    print("\n".join(_wrapped(ending, WIDTH)))
    return 0 if result.ok else 1


def _demo_summary(name: str, cls: str, where: str, data: dict) -> list[str]:
    """The demo's first lines: what ran where, the layers, the collectives, the rewrites."""
    from fx_shard.collectives import format_bytes

    blocks = sum(b["count"] for b in data["costs"]["collectives"]["blocks"] if b["block"])
    s = data["summary"]
    c = data["costs"]["collectives"]
    measured = ", ".join(f"{op} {n}" for op, n in (c["measured"] or {}).items() if n) or "none"
    predicted = ", ".join(f"{op} {n}" for op, n in c["predicted"].items() if n) or "none"
    changed = [p for p in data["diff"]["passes"] if p["added"] or p["removed"] or p["rewritten"]]
    rewrites = ", ".join(f"{p['pass']} ({_node_changes(p)})" for p in changed) or "none"
    return [
        f"fx_shard demo: {name} (fx_shard.models.{cls}" + (f", {blocks} blocks" if blocks else "") + f") on {where}",
        f"- layers: {s['layers']} planned, {s['sharded']} sharded, {s['replicated']} replicated; parameters per "
        f"device {format_bytes(s['parameter_bytes_per_device'])} of {format_bytes(s['parameter_bytes'])}",
        f"- collectives per forward, counted in XLA's partitioned HLO: {measured}"
        + (" (as predicted)" if measured == predicted else f" (predicted: {predicted})"),
        f"- nodes changed by the passes: {rewrites}; the other {len(data['diff']['passes']) - len(changed)} "
        "passes changed no node",
    ]


def _node_changes(p: dict) -> str:
    """A pass's diff counts in words: "8 added, 2 removed, 2 rewritten" (zeros left out)."""
    return ", ".join(f"{p[what]} {what}" for what in ("added", "removed", "rewritten") if p[what])


# File name extension of a saved report, per format.
_EXTENSIONS = {"text": "txt", "markdown": "md", "github": "md", "json": "json"}


def model_report(
    model_name: str,
    devices: int = DEFAULT_DEVICES,
    format: str = "text",
    plan: str = "builtin",
    measure: bool = False,
    fold: bool = True,
    overrides: dict | None = None,
) -> str:
    """The report on built-in model ``model_name`` sharded over ``devices`` on one ``tp`` axis.

    ``plan``: ``"builtin"`` (``fx_shard.models.plans.PLANS``) or ``"auto"``.
    Without ``measure`` only the graph rewrite runs (``transform``, no XLA);
    with it the model is sharded on an XLA mesh of ``devices`` devices, one
    forward's collectives are counted and the self-check runs (this process's
    runtime must have that many devices, or not have started yet).
    """
    import torch

    import fx_shard
    from fx_shard import models, xla
    from fx_shard.models.plans import PLANS

    overrides = overrides or {}
    model = models.build(model_name, **overrides)
    inputs = models.example_inputs(model_name, **overrides)
    chosen = PLANS[model_name] if plan == "builtin" else plan
    gm = _with_devices_hint(
        lambda: fx_shard.transform(model, chosen, mesh_shape={"tp": devices}, example_inputs=inputs), devices,
    )
    if not measure:
        return fx_shard.report(gm, format, fold=fold)
    _start_runtime(devices)
    with torch.no_grad():
        xla.materialize(gm, fx_shard.make_mesh())
        counts = fx_shard.collectives(gm, *inputs)
    fx_shard.check(gm, model, inputs)  # kept on gm: the report's self-check line
    return fx_shard.report(gm, format, measured=counts, fold=fold)


def config_report(path: str, devices: int = DEFAULT_DEVICES, format: str = "text", fold: bool = True) -> str:
    """The report on the Hugging Face model a local ``config.json`` (or its folder) describes, built on the meta device.

    Nothing is downloaded, allocated or compiled: the model takes its config's dtype, is planned with its own
    plan and inference (``plan="auto"``) for ``devices`` on one ``tp`` axis, and the report gives the
    parameter bytes per device and the collectives predicted per forward: will it fit, and what will it cost.
    """
    import torch

    import fx_shard

    try:
        import transformers
    except ImportError as e:
        raise UsageError("--config builds the model with Hugging Face transformers: pip install transformers") from e
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"--config {path}: not a Hugging Face config this transformers reads ({e})") from e
    dtype = getattr(config, "dtype", None) or torch.float32
    with torch.device("meta"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError:  # not a causal LM: the base model
            model = transformers.AutoModel.from_config(config, dtype=dtype)
    gm = _with_devices_hint(lambda: fx_shard.transform(model, "auto", mesh_shape={"tp": devices}), devices)
    return fx_shard.report(gm, format, fold=fold)


def report_command(args: argparse.Namespace) -> int:
    """``fx-shard report``: print each model's report, or write it to ``--output-dir``."""
    from fx_shard import models

    if args.config is not None:
        if args.models or args.measure or args.set or args.plan != "builtin":
            raise UsageError("--config reports the configured model alone, planned 'auto' without XLA: "
                             "drop MODEL, --measure, --set and --plan")
        text = config_report(args.config, args.devices or DEFAULT_DEVICES, args.format, not args.no_fold)
        print(text, end="" if text.endswith("\n") else "\n")
        return 0
    unknown = [name for name in args.models if name not in (*MODELS, "all")]
    if unknown or not args.models:
        found = f"unknown model {unknown[0]!r}; " if unknown else ""
        raise UsageError(f"{found}name a built-in model ({', '.join(MODELS)}) or 'all', or give --config PATH")
    names = list(MODELS) if "all" in args.models else list(dict.fromkeys(args.models))
    overrides = dict(_override(item) for item in args.set)
    for name in names:
        try:
            models.make_config(name, **overrides)
        except ValueError as e:
            raise UsageError(f"--set {' --set '.join(args.set)}: {e}") from e
    devices = _runtime_devices(args.devices) if args.measure else args.devices or DEFAULT_DEVICES
    with _xla_notices_quiet(bool(args.verbose)) if args.measure else contextlib.nullcontext():
        for i, name in enumerate(names):
            text = model_report(name, devices, args.format, args.plan, args.measure, not args.no_fold, overrides)
            if args.output_dir is None:
                print(("\n" if i else "") + text, end="" if text.endswith("\n") else "\n")
                continue
            if args.format in ("markdown", "github"):
                text = f"<!-- generated by `{_command(name, devices, args)}`: do not edit -->\n\n{text}"
            path = Path(args.output_dir) / f"{name}.{_EXTENSIONS[args.format]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    return 0


def _command(name: str, devices: int, args: argparse.Namespace) -> str:
    """The command that regenerates one saved report."""
    words = ["fx-shard", "report", name, "--devices", str(devices), "--format", args.format]
    words += ["--plan", args.plan] if args.plan != "builtin" else []
    words += ["--measure"] if args.measure else []
    words += ["--no-fold"] if args.no_fold else []
    for item in args.set:
        words += ["--set", item]
    return shlex.join(words)


def _override(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"--set takes FIELD=VALUE (e.g. num_hidden_layers=4), not {item!r}")
    for convert in (int, float):
        try:
            return key, convert(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


# -- devices, the XLA runtime and its notices ---------------------------------------------------------


def _on_cpu() -> bool:
    """Whether XLA will run on its CPU backend, as far as the environment says (fx_shard.xla chooses it when unset)."""
    return os.environ.get("PJRT_DEVICE", "CPU") == "CPU"


def _runtime_devices(devices: int | None) -> int:
    """The device count to start XLA with: ``--devices``, else ``CPU_NUM_DEVICES``, else 8.

    XLA's CPU backend takes its count from ``CPU_NUM_DEVICES`` when the runtime
    starts; a ``--devices`` that contradicts it is a mistake to name, not to
    find out from the runtime.
    """
    preset = os.environ.get("CPU_NUM_DEVICES") if _on_cpu() else None
    if devices is None:
        return int(preset) if preset and preset.isdigit() and int(preset) > 0 else DEFAULT_DEVICES
    if preset is not None and preset != str(devices):
        raise UsageError(
            f"--devices {devices}, but CPU_NUM_DEVICES={preset} is set and XLA's CPU backend takes its device count "
            f"from it: run with --devices {preset}, or unset CPU_NUM_DEVICES"
        )
    return devices


def _start_runtime(devices: int) -> int:
    """Start XLA with ``devices`` devices; a runtime with another count is a mistake that names ``--devices``."""
    from fx_shard import xla

    # On the CPU with no CPU_NUM_DEVICES, XLA starts with ``devices``; else it has the count it has.
    count = xla.init_runtime(devices if _on_cpu() and "CPU_NUM_DEVICES" not in os.environ else None)
    if count != devices:
        raise UsageError(f"this process's XLA runtime has {count} devices, not {devices}: run with --devices {count}")
    return count


def _with_devices_hint(run, devices: int):
    """``run()``; a plan that does not fit the mesh says that ``--devices`` sets the mesh's size."""
    from fx_shard.errors import PlanError

    try:
        return run()
    except PlanError as e:
        raise UsageError(f"{e} (--devices {devices} is that axis's size: try --devices 2, 4 or 8)") from e


@contextlib.contextmanager
def _xla_notices_quiet(keep: bool) -> Iterator[None]:
    """XLA's C++ warnings off for this process, unless ``keep`` (``-v``) or the user set ``TF_CPP_MIN_LOG_LEVEL``.

    XLA warns at each compile that "GSPMD sharding propagation is going to be
    deprecated": torch_xla 2.9 partitions with GSPMD, so there is nothing to
    act on. XLA's C++ logging reads ``TF_CPP_MIN_LOG_LEVEL`` once, at its first
    message (the first compile, inside this block); the variable is then put
    back as it was, so child processes see the user's environment.
    """
    if keep or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        if keep:
            logger.info("XLA's C++ notices are shown; 'GSPMD sharding propagation is going to be deprecated' "
                        "comes at each compile and needs no action (torch_xla 2.9 partitions with GSPMD)")
        yield
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # errors only
    try:
        yield
    finally:
        os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)


# -- output ---------------------------------------------------------------------------------------------


class _Clock:
    """Seconds per named phase, and in all since it was made."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    def __call__(self, name: str) -> contextlib.AbstractContextManager[None]:
        return timed(self.phases, name)

    def total(self) -> float:
        return time.perf_counter() - self.start


def _wrapped(lines: list[str], width: int) -> list[str]:
    """Each line wrapped at ``width``; a list item's continuation indented under its text."""
    out = []
    for line in lines:
        indent = "  " if line.startswith("- ") else "    "
        out += textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False) or [""]
    return out


# -- the command line -----------------------------------------------------------------------------------


def _count(text: str) -> int:
    """A positive whole number, for argparse."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fx-shard", description=__doc__.split("\n\n")[1].replace("``", "'"))
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log each pass and each layer's decision, show XLA's notices and the traceback of an "
                        "error; -vv also logs each parameter's placement")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="demo or report; fx-shard COMMAND --help for its options")
    devices_help = (f"XLA devices to shard over, the mesh's 'tp' axis (default: $CPU_NUM_DEVICES if set, else "
                    f"{DEFAULT_DEVICES}); virtual CPU devices when no TPU is attached")
    run = commands.add_parser(
        "demo", help="shard a built-in model on a mesh and check it against the unsharded run",
        description="Shard a built-in model (fx_shard.models) with its plan on an XLA mesh, run it next to the "
        f"unsharded model, and print a summary, how each layer is split, the verdict and the time taken, "
        f"in {WIDTH} columns. Exit status 0 when the two agree.",
    )
    run.add_argument("--model", choices=MODELS, default="llama", help="the built-in model (default llama)")
    run.add_argument("--devices", type=_count, metavar="N", help=devices_help)
    run.add_argument("--batch", type=_count, default=2, metavar="N", help="examples in the input batch, each 16 tokens or one "
                     "image (default 2)")
    run.add_argument("--full", action="store_true", help="print the whole report, every row unfolded and unwrapped")
    rep = commands.add_parser(
        "report", help="what fx_shard does to a built-in model: graph diff, layers, costs, what was left alone",
        description="Print the report on built-in models sharded over one 'tp' mesh axis. Only the graph rewrite "
        "runs (no XLA) unless --measure is given.",
    )
    rep.add_argument("models", nargs="*", metavar="MODEL",  # checked in report_command: argparse rejects no MODEL
                     help=f"a built-in model ({', '.join(MODELS)}), several, or 'all'")
    rep.add_argument("--config", metavar="PATH",
                     help="instead of MODEL: a Hugging Face config.json (a local file or folder, nothing is "
                     "downloaded); the model is built on the meta device in the config's dtype, planned 'auto' for "
                     "--devices and reported (bytes per device, collectives per forward) without XLA")
    rep.add_argument("--devices", type=_count, metavar="N", help=f"size of the mesh's 'tp' axis (default {DEFAULT_DEVICES}; with "
                     "--measure, $CPU_NUM_DEVICES if set)")
    rep.add_argument("--format", choices=FORMATS, default="text", help="text tables (default), markdown, github, or json")
    rep.add_argument("--plan", choices=("builtin", "auto"), default="builtin",
                     help="the model's plan from fx_shard.models.plans (default), or 'auto' (inferred from the graph)")
    rep.add_argument("--measure", action="store_true",
                     help="also shard on an XLA mesh of --devices devices (virtual CPU devices when no TPU is "
                     "attached), show one forward's collectives counted in the partitioned HLO and the self-check "
                     "against the unsharded model")
    rep.add_argument("--no-fold", action="store_true", help="one row per layer and node; no folding of repeated blocks")
    rep.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                     help="override a model config field, e.g. --set num_hidden_layers=4 (repeatable)")
    rep.add_argument("--output-dir", metavar="DIR", help="write each report to DIR/MODEL.{txt,md,json} instead of printing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("fx_shard").setLevel(
        logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    )
    try:
        if args.command == "report":
            return report_command(args)
        return demo(args.model, args.devices, args.batch, full=args.full, verbose=bool(args.verbose))
    except (UsageError, FxShardError, ValueError) as e:
        if args.verbose:
            raise
        print(f"fx-shard {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
