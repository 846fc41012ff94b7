"""A progress line for long benchmark runs, on stderr: what is running, how far, how long is left.

    progress = Progress(total=40)
    progress.start("8 devices · fx_shard · llama large · training")
    ...                                   # the work
    progress.done()                       # one item finished
    progress.close()

On a terminal the line is redrawn in place; otherwise (a log file, CI) one
line per change is printed, so the log shows the run's history. Nothing goes
to stdout, which stays free for results.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts finished items out of ``total`` and shows the one running, with elapsed time and an estimate.

    The estimate is the mean time per finished item times the items left; it
    is shown once at least one item has finished.
    """

    def __init__(self, total: int, stream: TextIO | None = None, label: str = "") -> None:
        self.total = total
        self.finished = 0
        self.label = label
        self.current = ""
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()
        self._width = 0

    def start(self, what: str) -> None:
        """Say that ``what`` is now running."""
        self.current = what
        self._show()

    def done(self, count: int = 1, note: str = "") -> None:
        """Mark ``count`` items finished (``note``, e.g. a failure, is printed on its own line)."""
        self.finished = min(self.total, self.finished + count)
        if note:
            self.message(note)
        self._show()

    def message(self, text: str) -> None:
        """A line of its own (a warning, a failure), not overwritten by the progress line."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text.rstrip() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Finish the line (terminal) and print the total time."""
        elapsed = time.perf_counter() - self.started
        self.current = ""
        if self.tty and self._width:
            self.stream.write("\n")
        self.stream.write(f"{self.label + ': ' if self.label else ''}{self.finished}/{self.total} done in "
                          f"{format_seconds(elapsed)}\n")
        self.stream.flush()

    def line(self) -> str:
        """The progress line as it would be shown now."""
        elapsed = time.perf_counter() - self.started
        pct = 100 * self.finished / self.total if self.total else 100
        eta = ""
        if 0 < self.finished < self.total:
            eta = f", ~{format_seconds(elapsed / self.finished * (self.total - self.finished))} left"
        head = f"{self.label} " if self.label else ""
        running = f" | {self.current}" if self.current else ""
        return f"{head}[{self.finished}/{self.total} {pct:3.0f}%] {format_seconds(elapsed)} elapsed{eta}{running}"

    def _show(self) -> None:
        text = self.line()
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
