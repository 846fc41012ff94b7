"""Seconds per named phase: the one timer the pipeline (``Pipeline.timings``) and the CLI's demo use."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, MutableMapping

__all__ = ["timed"]


@contextlib.contextmanager
def timed(phases: MutableMapping[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block takes to ``phases[name]`` (a phase that runs several times adds up)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
