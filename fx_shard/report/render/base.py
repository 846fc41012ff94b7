"""The report's sections as tables and prose, shared by the text and markdown renderers.

``Renderer`` lays out ``report_data``'s dict section by section; a subclass
says only how its format writes a table (``tablefmt``, a tabulate format), a
title, a heading, code and prose.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

from tabulate import tabulate

from fx_shard.hlo import COLLECTIVE_OPS

# Rows shown per pass in the diff tables (after folding); the JSON form has every row.
MAX_DIFF_ROWS = 40


class Renderer(ABC):
    """A report as text, from ``report_data``'s dict: a header, then sections 1 to 4."""

    #: tabulate's ``tablefmt`` for every table.
    tablefmt: str

    def render(self, data: dict[str, Any]) -> str:
        """The whole report, ending in one newline."""
        out = self._header(data)
        out += self._diff(data)
        out += self._layers(data)
        out += self._costs(data)
        out += self._left_alone(data)
        return "\n".join(out).rstrip() + "\n"

    # -- how a format writes things

    @abstractmethod
    def title(self, text: str) -> list[str]:
        """The report's title lines (``text`` is not escaped yet)."""

    @abstractmethod
    def heading(self, text: str, level: int = 2) -> list[str]:
        """A section (level 2) or subsection (level 3) heading's lines."""

    @abstractmethod
    def code(self, text: str) -> str:
        """A module path, node or expression in a table cell ("" stays "")."""

    @abstractmethod
    def prose(self, text: str) -> str:
        """Free text, escaped where the format needs it."""

    def para(self, text: str) -> list[str]:
        return [text, ""]

    def table(self, rows: list[list[Any]], headers: list[str], numeric: Iterable[int] = ()) -> list[str]:
        numeric = set(numeric)
        align = ["right" if i in numeric else "left" for i in range(len(headers))]
        text = tabulate(rows, headers, tablefmt=self.tablefmt, disable_numparse=True, colalign=align)
        return [text, ""]

    # -- sections

    def _header(self, data: dict[str, Any]) -> list[str]:
        s = data["summary"]
        mesh = "{" + ", ".join(f"{k}: {v}" for k, v in data["mesh"].items()) + "}"
        axis = data["tp_axis"] if isinstance(data["tp_axis"], str) else tuple(data["tp_axis"])
        title = f"fx_shard report: {data['model']} on mesh {mesh}, tensor-parallel axis {axis!r}"
        if s["graphs"] == 1 and data["graphs"] == [""] and not s["opaque_modules"]:
            captured = "captured whole, as one graph"
        else:
            captured = f"captured part by part: {s['graphs']} graphs, {s['opaque_modules']} modules left opaque (section 4)"
        collectives = ", ".join(f"{op} {n}" for op, n in s["collectives_predicted"].items()) or "none"
        measured = data["costs"]["collectives"]["measured"]
        if measured is not None:
            found = ", ".join(f"{op} {n}" for op, n in measured.items() if n) or "none"
            collectives += f" (measured: {found})"
        lines = [
            f"- {captured}; passes, in order: {', '.join(data['passes'])}",
            f"- {s['layers']} layers planned: {s['sharded']} sharded, {s['replicated']} replicated",
            f"- parameters per device: {_bytes(s['parameter_bytes_per_device'])} of {_bytes(s['parameter_bytes'])}",
            f"- collectives per forward, predicted: {collectives}",
        ]
        return [*self.title(title), *map(self.prose, lines), ""]

    def _diff(self, data: dict[str, Any]) -> list[str]:
        diff = data["diff"]
        several = len(data["graphs"]) > 1
        out = self.heading("1. Graph diff: what each pass changed")
        summary_rows = [
            [p["pass"], f"{p['graphs_changed']} of {p['graphs']}", p["added"], p["removed"], p["rewritten"]]
            for p in diff["passes"]
        ]
        out += self.table(summary_rows, ["pass", "graphs changed", "added", "removed", "rewritten"], numeric=(2, 3, 4))
        quiet = [p["pass"] for p in diff["passes"] if not (p["added"] or p["removed"] or p["rewritten"])]
        if quiet:
            out += self.para(self.prose(
                f"No node changed in {', '.join(quiet)}; a pass may still change sharding records "
                "(node.meta['sharding']), which section 2 shows."
            ))
        intro_done = False
        for p in diff["passes"]:
            rows = [r for r in diff["rows"] if r["pass"] == p["pass"]]
            if not rows:
                continue
            out += self.heading(f"{p['pass']}: {p['added']} added, {p['removed']} removed, {p['rewritten']} rewritten", 3)
            if not intro_done:
                out += self.para(self.prose(
                    "A row with a count (×) stands for that many nodes that differ only in numeric indices, "
                    "written as ranges (h.0-79), and in torch.fx's name counters (cat, cat_1), shown as the first "
                    "node's."
                ))
                intro_done = True
            shown = rows[:MAX_DIFF_ROWS]
            table = [
                ([self.code(r["graph"]) or "(root)"] if several else [])
                + [r["change"], _count(r["count"]), self.code(r["node"]), self.code(r["before"]), self.code(r["after"])]
                for r in shown
            ]
            headers = (["graph"] if several else []) + ["change", "×", "node", "before", "after"]
            out += self.table(table, headers)
            if len(rows) > len(shown):
                out += self.para(f"... and {len(rows) - len(shown)} more rows (format='json' lists them all).")
        return out

    def _layers(self, data: dict[str, Any]) -> list[str]:
        out = self.heading("2. Layers: how each is split, and why")
        several = len(data["graphs"]) > 1 or any(layer["graph"] is None for layer in data["layers"])
        rows = []
        for layer in data["layers"]:
            why = "; ".join([layer["source"], *layer["notes"]])
            head = [self.code(layer["module"]), _count(layer["count"])]
            head += ["(module)" if layer["graph"] is None else self.code(layer["graph"]) or "(root)"] if several else []
            head += [layer["style"]]
            for i, p in enumerate(layer["parameters"] or [None]):
                cells = head if i == 0 else [""] * len(head)
                if p is None:
                    rows.append(cells + ["", "", "", "", self.prose(why)])
                    continue
                name = p["name"] + (f" (tied to {p['tied_to']})" if p["tied_to"] else "")
                rows.append(cells + [
                    self.prose(name), _shape(p["global_shape"]), _shape(p["per_device_shape"]),
                    _spec(p["spec"]), self.prose(why) if i == 0 else "",
                ])
        headers = ["module", "×", *(["graph"] if several else []), "style", "param", "global", "per device", "mesh axes", "why"]
        out += self.table(rows, headers)
        out += self.para(self.prose(
            "mesh axes: the mesh axis each dimension is split over, '-' where it is whole. "
            "graph '(module)': planned as a module outside any traced graph." if several else
            "mesh axes: the mesh axis each dimension is split over, '-' where it is whole."
        ))
        return out

    def _costs(self, data: dict[str, Any]) -> list[str]:
        costs = data["costs"]
        out = self.heading("3. Costs")
        out += self.heading("Parameter bytes", 3)
        b = costs["parameter_bytes"]
        rows = [[r["parameters"], r["tensors"], _bytes(r["total"]), _bytes(r["per_device"]), _bytes(r["per_device_ideal"])]
                for r in b["rows"]]
        rows.append(["all", b["tensors"], _bytes(b["total"]), _bytes(b["per_device"]), _bytes(b["per_device_ideal"])])
        out += self.table(rows, ["parameters", "tensors", "total", "per device", "per device, ideal"], numeric=(1, 2, 3, 4))
        notes = (
            "Each shared (tied) tensor counts once. Per device is what the shards take, with XLA's padding of "
            "uneven splits; ideal is each sharded tensor's bytes divided by its mesh axes' size."
        )
        if b["measured_per_device"] is not None:
            verdict = "equal to" if b["measured_per_device"] == b["per_device"] else "DIFFERENT from"
            notes += (f" Measured on the device (torch_xla's shards): {_bytes(b['measured_per_device'])} per device, "
                      f"{verdict} the computed per-device bytes.")
        out += self.para(self.prose(notes))

        c = costs["collectives"]
        out += self.heading("Collectives per forward", 3)
        measured = c["measured"]
        ops = [op for op in COLLECTIVE_OPS[:2]]
        ops += [op for op in (measured or {}) if op not in ops and (measured[op] or c["predicted"].get(op))]
        ops += [op for op in c["predicted"] if op not in ops and c["predicted"][op]]
        rows = [
            [self.code(b["block"] or "") or "(outside blocks)", _count(b["count"])]
            + [b["predicted"].get(op, 0) for op in ops] + [self.code(b["from"]) if b["from"] else "-"]
            for b in c["blocks"]
        ]
        rows.append(["predicted, whole forward", ""] + [c["predicted"].get(op, 0) for op in ops] + [""])
        if measured is not None:
            rows.append(["measured (partitioned HLO)", ""] + [measured.get(op, 0) for op in ops] + [""])
        numeric = range(2, 2 + len(ops))
        out += self.table(rows, ["block", "×", *ops, "from"], numeric=numeric)
        text = c["method"]
        if measured is not None:
            differ = [f"{op}: predicted {c['predicted'].get(op, 0)}, measured {n}"
                      for op, n in measured.items() if n != c["predicted"].get(op, 0)]
            text += (" Measured in XLA's partitioned HLO of one forward: "
                     + ("as predicted." if not differ else "differs, " + "; ".join(differ) + "."))
        out += self.para(self.prose(text))
        return out

    def _left_alone(self, data: dict[str, Any]) -> list[str]:
        left = data["left_alone"]
        out = self.heading("4. Left alone, and why")
        out += self.heading("Modules that did not trace (opaque)", 3)
        if left["opaque"]:
            out += self.table(
                [[self.code(r["module"]) or "(root)", _count(r["count"]), self.prose(r["reason"])] for r in left["opaque"]],
                ["module", "×", "reason"],
            )
            out += self.para(self.prose(
                "Their own code runs as written; the linear-like layers inside them are planned as modules "
                "(section 2, graph '(module)'), and the sub-modules that do trace are rewritten as graphs."
            ))
        else:
            out += self.para("None: every module was captured in a graph.")
        out += self.heading("Replicated layers", 3)
        if left["replicated"]:
            out += self.table(
                [[self.code(r["module"]), _count(r["count"]), r["style"], self.prose("; ".join([r["source"], *r["notes"]]))]
                 for r in left["replicated"]],
                ["module", "×", "style", "why"],
            )
        else:
            out += self.para("None: every planned layer is sharded.")
        out += self.heading("Parameters in no planned layer (replicated)", 3)
        if left["unplanned"]:
            out += self.table(
                [
                    [self.code(r["module"]) or "(root)", _count(r["count"]),
                     self.prose(", ".join(f"{p['name']} {_shape(p['shape'])}" for p in r["parameters"]))]
                    for r in left["unplanned"]
                ],
                ["module", "×", "parameters"],
            )
        else:
            out += self.para("None.")
        if left["code_kept"]:
            out += self.heading("Model code kept as written", 3)
            out += self.para("\n".join(f"- {self.prose(note)}" for note in left["code_kept"]))
        return out


def _count(n: int) -> str:
    """A folded row's count ("80×"); blank for a single row."""
    return f"{n}×" if n > 1 else ""


def _spec(spec: list[Any]) -> str:
    """A JSON spec as "(tp, -)", or "replicated" when no dimension is split."""
    if not any(spec):
        return "replicated"
    return "(" + ", ".join("-" if a is None else a if isinstance(a, str) else "×".join(a) for a in spec) + ")"


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _bytes(n: int) -> str:
    """``n`` bytes with thousands separators, and in KiB / MiB / GiB from 1 KiB on."""
    if n < 1024:
        return f"{n:,} B"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n:,} B ({n / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]})"
