"""The report as plain text: ``tabulate``'s simple tables, headings underlined, nothing escaped.

With a ``width``, no line is longer (short of a single word that is): prose
is wrapped, and a table too wide for it first moves its long trailing
columns (a layer's "why", a node's "before" and "after") under each row,
then wraps its widest cells, module paths at their dots.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable
from typing import Any

from tabulate import MIN_PADDING, tabulate

from fx_shard.report.render.base import Renderer

# Space tabulate's "simple" format puts between two columns.
_GAP = 2
# The narrowest a column is wrapped to before the table's first column is wrapped too.
_MIN_CAP = 12
# Indent of a column shown under its row.
_BELOW = "    "


class TextRenderer(Renderer):
    """For a terminal or a log: what ``report(model)`` prints by default."""

    tablefmt = "simple"

    def __init__(self, width: int | None = None) -> None:
        self.width = width

    def title(self, text: str) -> list[str]:
        return [*self._wrap(text), ""]

    def heading(self, text: str, level: int = 2) -> list[str]:
        return [text, ("=" if level <= 2 else "-") * len(text), ""]

    def code(self, text: str) -> str:
        return text

    def prose(self, text: str) -> str:
        return text

    def para(self, text: str) -> list[str]:
        return [*self._wrap(text), ""]

    def bullets(self, items: list[str]) -> list[str]:
        return [line for item in items for line in self._wrap(f"- {item}", "  ")]

    def table(self, rows: list[list[Any]], headers: list[str], numeric: Iterable[int] = (), below: int = 0) -> list[str]:
        numeric = set(numeric)
        if self.width is None or _table_width(rows, headers) <= self.width:
            return super().table(rows, headers, numeric)
        kept = len(headers) - below
        main = [[str(cell) for cell in row[:kept]] for row in rows]
        caps = _column_caps(main, headers[:kept], numeric, self.width)
        if caps is not None:
            main = [[cell if cap is None else "\n".join(_wrap_cell(cell, cap)) for cell, cap in zip(row, caps)] for row in main]
        align = ["right" if i in numeric else "left" for i in range(kept)]
        lines = tabulate(main, headers[:kept], tablefmt=self.tablefmt, disable_numparse=True, colalign=align).split("\n")
        label = max((len(h) for h in headers[kept:]), default=0) + 2
        out, pos, pending = lines[:2], 2, []
        for row, cells in zip(rows, main):
            if cells and cells[0]:  # a new row, not the continuation of one (a layer's next parameter)
                out += pending
                pending = []
            height = max((cell.count("\n") + 1 for cell in cells), default=1)
            out += lines[pos:pos + height]
            pos += height
            for header, value in zip(headers[kept:], row[kept:]):
                if value:
                    pending += self._wrap(f"{_BELOW}{header + ':':<{label}}{value}", _BELOW + " " * label)
        return ["\n".join(out + pending), ""]

    def _wrap(self, text: str, indent: str = "") -> list[str]:
        if self.width is None:
            return [text]
        return textwrap.wrap(text, self.width, subsequent_indent=indent, break_on_hyphens=False) or [""]


def _natural(rows: list[list[Any]], headers: list[str], i: int) -> int:
    """Column ``i``'s width as tabulate lays it out: its longest cell line, or its header and padding."""
    return max([len(headers[i]) + MIN_PADDING, *(len(line) for row in rows for line in str(row[i]).split("\n"))])


def _table_width(rows: list[list[Any]], headers: list[str]) -> int:
    return sum(_natural(rows, headers, i) for i in range(len(headers))) + _GAP * (len(headers) - 1)


def _column_caps(rows: list[list[str]], headers: list[str], numeric: set[int], width: int) -> list[int | None] | None:
    """Widths to wrap each column at (``None``: as wide as it is) so the table fits ``width``; ``None`` if it fits.

    The widest text columns are narrowed first, all to one cap, the largest
    that fits; numeric columns are never wrapped, no column gets narrower
    than its header, and the first column (the row's name) is wrapped only
    when the others cannot make room at ``_MIN_CAP`` characters.
    """
    natural = [_natural(rows, headers, i) for i in range(len(headers))]
    budget = width - _GAP * (len(headers) - 1)
    if sum(natural) <= budget:
        return None
    floor = [len(h) + MIN_PADDING for h in headers]
    for wrappable in ([i for i in range(1, len(headers)) if i not in numeric],
                      [i for i in range(len(headers)) if i not in numeric]):
        def total(cap: int) -> int:
            return sum(max(min(w, cap), floor[i]) if i in wrappable else w for i, w in enumerate(natural))

        cap = max(natural)
        while cap > 1 and total(cap) > budget:
            cap -= 1
        if cap >= _MIN_CAP or wrappable[:1] == [0]:
            return [max(cap, floor[i]) if i in wrappable and natural[i] > cap else None for i in range(len(headers))]
    raise AssertionError("unreachable")


def _wrap_cell(text: str, cap: int) -> list[str]:
    """``text`` in lines of at most ``cap`` characters: at spaces, else after a '.' or '_', else anywhere."""
    lines = []
    for line in textwrap.wrap(text, cap, break_long_words=False, break_on_hyphens=False) or [""]:
        while len(line) > cap:
            cut = max((m.end() for m in re.finditer(r"[._,]", line[:cap])), default=cap)
            lines.append(line[:cut])
            line = line[cut:]
        lines.append(line)
    return lines
