"""The ``fx-shard`` command: ``demo`` shards a built-in model on an XLA mesh and checks it."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

__all__ = ["main"]

# float32 agreement asked of a sharded model: max |error| relative to the output's scale.
TOLERANCE = 1e-5


def demo(model_name: str, devices: int, batch: int) -> int:
    """Shard a built-in model, run it next to the unsharded one, print the report; 0 when they agree."""
    import fx_shard
    from fx_shard import models
    from fx_shard.models.plans import PLANS

    count = fx_shard.init_runtime(devices)
    model = models.build(model_name)
    inputs = models.example_inputs(model_name, batch=batch)
    with torch.no_grad():
        expected = model(*inputs)
        mesh = fx_shard.make_mesh()
        gm = fx_shard.shard(model, mesh, PLANS[model_name], example_inputs=inputs)
        counts = fx_shard.collectives(gm, *inputs)
        device = fx_shard.xla_device()
        actual = gm(*(t.to(device) for t in inputs)).cpu()
    print(fx_shard.report(gm))
    found = ", ".join(f"{op} {n}" for op, n in counts.nonzero().items()) or "none"
    print(f"\ncollectives in one forward (XLA's partitioned HLO): {found}")
    error = (actual - expected).abs().max().item() / expected.abs().max().item()
    agree = error <= TOLERANCE
    print(
        f"\n{model_name}: sharded over {count} XLA devices; max |error| relative to the output scale "
        f"{error:.2e} ({'within' if agree else 'OVER'} {TOLERANCE:g})"
    )
    return 0 if agree else 1


def main(argv: list[str] | None = None) -> int:
    from fx_shard.models import MODELS

    parser = argparse.ArgumentParser(prog="fx-shard", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log each pass and decision")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="shard a built-in model on a mesh and check it against the unsharded run")
    run.add_argument("--model", choices=MODELS, default="llama")
    run.add_argument("--devices", type=int, default=8, help="virtual CPU devices when no TPU is attached (default 8)")
    run.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return demo(args.model, args.devices, args.batch)


if __name__ == "__main__":
    sys.exit(main())
