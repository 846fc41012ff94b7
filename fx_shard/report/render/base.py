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

from fx_shard.axes import spec_text
from fx_shard.check import CheckResult
from fx_shard.hlo import COLLECTIVE_OPS

# Rows shown per pass in the diff tables (after folding); the JSON form has every row.
MAX_DIFF_ROWS = 40

#: The report's parts, in order: the title and summary, then sections 1 to 4.
SECTIONS: tuple[str, ...] = ("header", "diff", "layers", "costs", "left_alone")

# Said once, before the first table with a folded row.
FOLD_NOTE = (
    "A row with a count (×) stands for that many rows that differ only in numeric indices, written as "
    "ranges (h.0-79), and in torch.fx's name counters (cat, cat_1), shown as the first row's."
)


class Renderer(ABC):
    """A report as text, from ``report_data``'s dict: a header, then sections 1 to 4."""

    #: tabulate's ``tablefmt`` for every table.
    tablefmt: str

    def render(self, data: dict[str, Any], sections: Sequence[str] | None = None) -> str:
        """The whole report, ending in one newline; or only ``sections`` (of ``SECTIONS``), headings unnumbered."""
        chosen = SECTIONS if sections is None else tuple(sections)
        unknown = sorted(set(chosen) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown report sections {unknown}; the sections are {', '.join(SECTIONS)}")
        number = (lambda n: f"{n}. ") if sections is None else (lambda n: "")  # noqa: E731
        folded = _first_folded(data, chosen)
        out = self._header(data) if "header" in chosen else []
        out += self._diff(data, folded == "diff", number(1)) if "diff" in chosen else []
        out += self._layers(data, folded == "layers", number(2)) if "layers" in chosen else []
        out += self._costs(data, folded == "costs", number(3)) if "costs" in chosen else []
        out += self._left_alone(data, folded, number(4)) if "left_alone" in chosen else []
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

    def bullets(self, items: list[str]) -> list[str]:
        """A list of short statements (the summary under the title), escaped."""
        return [self.prose(f"- {item}") for item in items]

    def table(self, rows: list[list[Any]], headers: list[str], numeric: Iterable[int] = (), below: int = 0) -> list[str]:
        """A table; ``below``: how many trailing columns are long text a narrow layout may put under each row."""
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
            f"{captured}; passes, in order: {', '.join(data['passes'])}",
            f"{s['layers']} layers planned: {s['sharded']} sharded, {s['replicated']} replicated",
            f"parameters per device: {_bytes(s['parameter_bytes_per_device'])} of {_bytes(s['parameter_bytes'])}",
            f"collectives per forward, predicted: {collectives}",
        ]
        check = data["check"]
        if check is not None:
            result = CheckResult(check["error"], check["tolerance"], check["first_divergence"], check["detail"])
            lines += str(result).splitlines()
        return [*self.title(title), *self.bullets(lines), ""]

    def _diff(self, data: dict[str, Any], note: bool, number: str) -> list[str]:
        diff = data["diff"]
        several = len(data["graphs"]) > 1
        out = self.heading(f"{number}Graph diff: what each pass changed")
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
        for p in diff["passes"]:
            rows = [r for r in diff["rows"] if r["pass"] == p["pass"]]
            if not rows:
                continue
            out += self.heading(f"{p['pass']}: {p['added']} added, {p['removed']} removed, {p['rewritten']} rewritten", 3)
            shown = rows[:MAX_DIFF_ROWS]
            if note and any(r["count"] > 1 for r in shown):
                out += self.para(self.prose(FOLD_NOTE))
                note = False
            table = [
                ([self.code(r["graph"]) or "(root)"] if several else [])
                + [r["change"], _count(r["count"]), self.code(r["node"]), self.code(r["before"]), self.code(r["after"])]
                for r in shown
            ]
            headers = (["graph"] if several else []) + ["change", "×", "node", "before", "after"]
            out += self.table(table, headers, below=2)
            if len(rows) > len(shown):
                out += self.para(f"... and {len(rows) - len(shown)} more rows (format='json' lists them all).")
        return out

    def _layers(self, data: dict[str, Any], note: bool, number: str) -> list[str]:
        out = self.heading(f"{number}Layers: how each is split, and why")
        out += self.para(self.prose(FOLD_NOTE)) if note else []
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
        out += self.table(rows, headers, below=1)
        out += self.para(self.prose(
            "mesh axes: the mesh axis each dimension is split over, '-' where it is whole. "
            "graph '(module)': planned as a module outside any traced graph." if several else
            "mesh axes: the mesh axis each dimension is split over, '-' where it is whole."
        ))
        return out

    def _costs(self, data: dict[str, Any], note: bool, number: str) -> list[str]:
        costs = data["costs"]
        out = self.heading(f"{number}Costs")
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
        out += self.para(self.prose(FOLD_NOTE)) if note else []
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
        out += self.table(rows, ["block", "×", *ops, "from"], numeric=numeric, below=1)
        text = c["method"]
        if measured is not None:
            differ = [f"{op}: predicted {c['predicted'].get(op, 0)}, measured {n}"
                      for op, n in measured.items() if n != c["predicted"].get(op, 0)]
            text += (" Measured in XLA's partitioned HLO of one forward: "
                     + ("as predicted." if not differ else "differs, " + "; ".join(differ) + "."))
        out += self.para(self.prose(text))
        return out

    def _left_alone(self, data: dict[str, Any], note: str | None, number: str) -> list[str]:
        left = data["left_alone"]
        out = self.heading(f"{number}Left alone, and why")
        out += self.heading("Modules that did not trace (opaque)", 3)
        if left["opaque"]:
            out += self.para(self.prose(FOLD_NOTE)) if note == "opaque" else []
            out += self.table(
                [[self.code(r["module"]) or "(root)", _count(r["count"]), self.prose(r["reason"])] for r in left["opaque"]],
                ["module", "×", "reason"], below=1,
            )
            out += self.para(self.prose(
                "Their own code runs as written; the linear-like layers inside them are planned as modules "
                "(section 2, graph '(module)'), and the sub-modules that do trace are rewritten as graphs."
            ))
        else:
            out += self.para("None: every module was captured in a graph.")
        out += self.heading("Replicated layers", 3)
        if left["replicated"]:
            out += self.para(self.prose(FOLD_NOTE)) if note == "replicated" else []
            out += self.table(
                [[self.code(r["module"]), _count(r["count"]), r["style"], self.prose("; ".join([r["source"], *r["notes"]]))]
                 for r in left["replicated"]],
                ["module", "×", "style", "why"], below=1,
            )
        else:
            out += self.para("None: every planned layer is sharded.")
        over_fsdp = any("spec" in p for r in left["unplanned"] for p in r["parameters"])
        out += self.heading("Parameters in no planned layer" + ("" if over_fsdp else " (replicated)"), 3)
        if left["unplanned"]:
            out += self.para(self.prose(FOLD_NOTE)) if note == "unplanned" else []
            out += self.table(
                [
                    [self.code(r["module"]) or "(root)", _count(r["count"]),
                     self.prose(", ".join(f"{p['name']} {_shape(p['shape'])} {_spec(p.get('spec', []))}"
                                          if over_fsdp else f"{p['name']} {_shape(p['shape'])}"
                                          for p in r["parameters"]))]
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


def _first_folded(data: dict[str, Any], sections: Sequence[str]) -> str | None:
    """Where the fold note goes: the first table shown with a folded row (count > 1), if any.

    A section's name, or for section 4 its table's (``"opaque"``, ``"replicated"``, ``"unplanned"``).
    """
    per_pass: dict[str, list[dict[str, Any]]] = {}
    for row in data["diff"]["rows"]:
        per_pass.setdefault(row["pass"], []).append(row)
    shown_diff = [r for rows in per_pass.values() for r in rows[:MAX_DIFF_ROWS]]
    left = data["left_alone"]
    tables = [
        ("diff", "diff", shown_diff), ("layers", "layers", data["layers"]),
        ("costs", "costs", data["costs"]["collectives"]["blocks"]),
        ("left_alone", "opaque", left["opaque"]), ("left_alone", "replicated", left["replicated"]),
        ("left_alone", "unplanned", left["unplanned"]),
    ]
    return next((name for section, name, rows in tables if section in sections and any(r["count"] > 1 for r in rows)), None)


def _count(n: int) -> str:
    """A folded row's count ("80×"); blank for a single row."""
    return f"{n}×" if n > 1 else ""


def _spec(spec: list[Any]) -> str:
    """A JSON spec as "(tp, -)", or "replicated" when no dimension is split."""
    return spec_text(spec) if any(spec) else "replicated"


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _bytes(n: int) -> str:
    """``n`` bytes with thousands separators, and in KiB / MiB / GiB from 1 KiB on."""
    if n < 1024:
        return f"{n:,} B"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n:,} B ({n / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]})"
