"""Folding rows that differ only in numeric indices into one row with a count.

``model.layers.0.mlp`` ... ``model.layers.79.mlp`` become ``model.layers.0-79.mlp``
with ``count`` 80 and the list of what the row stands for, so a deep model's
report stays as long as one block's and nothing is lost (``fold=False`` keeps
every row). Fields that are not strings are compared as JSON text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fx_shard.report.gather import Layer

# Folding compares strings up to their numeric indices. In a module path an
# index is a whole dotted part ("layers.3"). In node text it is a dotted part
# after a name ("h.3.attn") or a part of an identifier between underscores
# ("layers_3_mlp"); an identifier's trailing "_<n>" is torch.fx's counter for
# repeated names ("cat", "cat_1"), ignored when comparing. Literal numbers
# ("64", "dim=2", "0.5") are neither.
_INDEX, _COUNTER = ("index",), ("counter",)
_TEXT_TOKEN = re.compile(r"(?<=[A-Za-z_]\.)\d+(?![A-Za-z0-9_])|[A-Za-z_][A-Za-z0-9_]*")
_MID_INDEX = re.compile(r"(?<=[A-Za-z0-9]_)(\d+)(?=_[A-Za-z0-9])")
_TRAILING_COUNTER = re.compile(r"(?<=[A-Za-z0-9])_(\d+)$")
_FOLDABLE = ("path", "text")


def fold_diff(rows_by_pass: list[list[dict[str, str]]], fold: bool) -> list[dict[str, Any]]:
    """The pass diff's rows, folded within each pass; members are ``[graph, node]``."""
    kinds = {"pass": "exact", "graph": "path", "change": "exact", "node": "text", "before": "text", "after": "text"}
    folded = []
    for pass_rows in rows_by_pass:
        folded.extend(_fold_rows(pass_rows, kinds, "members", fold, member=lambda r: [r["graph"], r["node"]]))
    return folded


def fold_layers(layers: list[Layer], fold: bool) -> list[dict[str, Any]]:
    """The layers as report rows; layers alike but for indices fold, tied parameters up to indices."""
    rows = [
        {
            "module": layer.path,
            "graph": "-" if layer.graph is None else layer.graph,
            "style": layer.record.style,
            "sharded": layer.sharded,
            "source": layer.record.source,
            "notes": "\n".join(layer.record.notes),
            # Shapes and specs compare exactly; what a parameter is tied to, up to indices.
            "shapes": json.dumps([{**p, "tied_to": None} for p in layer.parameters]),
            "tied_to": "\n".join(p["tied_to"] or "" for p in layer.parameters),
        }
        for layer in layers
    ]
    kinds = {"module": "path", "graph": "path", "style": "exact", "sharded": "exact", "source": "text",
             "notes": "text", "shapes": "exact", "tied_to": "text"}
    out = []
    for r in _fold_rows(rows, kinds, "modules", fold):
        tied = r["tied_to"].split("\n")
        out.append({
            "module": r["module"], "count": r["count"], "modules": r["modules"],
            "graph": None if r["graph"] == "-" else r["graph"],
            "style": r["style"], "sharded": r["sharded"], "source": r["source"],
            "notes": r["notes"].split("\n") if r["notes"] else [],
            "parameters": [{**p, "tied_to": t or None} for p, t in zip(json.loads(r["shapes"]), tied)],
        })
    return out


def fold_blocks(blocks: list[dict[str, Any]], fold: bool) -> list[dict[str, Any]]:
    """The predicted collectives per block; blocks alike but for their index fold (block None: outside blocks)."""
    rows = [{**b, "predicted": json.dumps(b["predicted"])} for b in blocks]
    folded = _fold_rows(
        rows, {"block": "path", "from": "text", "predicted": "exact"}, "blocks", fold, member=lambda r: r["block"] or None,
    )
    return [
        {"block": r["block"] or None, "count": r["count"], "blocks": r["blocks"],
         "predicted": json.loads(r["predicted"]), "from": r["from"]}
        for r in folded
    ]


def fold_opaque(opaque: Mapping[str, str], fold: bool) -> list[dict[str, Any]]:
    """The modules that did not trace (path -> reason) as rows."""
    rows = [{"module": path, "reason": reason} for path, reason in opaque.items()]
    return _fold_rows(rows, {"module": "path", "reason": "text"}, "modules", fold)


def fold_replicated(layers: list[Layer], fold: bool) -> list[dict[str, Any]]:
    """The planned layers that are not sharded, as rows."""
    rows = [
        {"module": layer.path, "style": layer.record.style, "source": layer.record.source, "notes": "\n".join(layer.record.notes)}
        for layer in layers if not layer.sharded
    ]
    folded = _fold_rows(rows, {"module": "path", "style": "exact", "source": "text", "notes": "text"}, "modules", fold)
    for row in folded:
        row["notes"] = row["notes"].split("\n") if row["notes"] else []
    return folded


def fold_unplanned(unplanned: list[dict[str, Any]], fold: bool) -> list[dict[str, Any]]:
    """The modules with parameters in no planned layer; their parameters' names and shapes compare exactly."""
    rows = [{**row, "parameters": json.dumps(row["parameters"])} for row in unplanned]
    folded = _fold_rows(rows, {"module": "path", "parameters": "exact"}, "modules", fold)
    for row in folded:
        row["parameters"] = json.loads(row["parameters"])
    return folded


def _fold_rows(
    rows: list[dict[str, Any]], kinds: Mapping[str, str], members_key: str, fold: bool,
    member: Callable[[dict[str, Any]], Any] | None = None,
) -> list[dict[str, Any]]:
    """Rows equal but for numeric indices become one row, with ``count`` and the members it stands for.

    ``kinds`` says how each field compares: ``"path"`` / ``"text"`` up to
    indices, ``"exact"`` as is. The folded row sits where its first member was.
    """
    member = member or (lambda r: r["module"])
    groups: dict[Any, list[dict[str, Any]]] = {}
    for i, row in enumerate(rows):
        key = tuple(_normalize(str(row[k]), kind) for k, kind in kinds.items()) if fold else i
        groups.setdefault(key, []).append(row)
    folded = []
    for group in groups.values():
        out = {k: _merge([str(r[k]) for r in group], kind) if kind in _FOLDABLE else group[0][k] for k, kind in kinds.items()}
        out.update({k: v for k, v in group[0].items() if k not in kinds})
        out["count"] = len(group)
        out[members_key] = [member(r) for r in group]
        folded.append(out)
    return folded


def _tokens(value: str, kind: str) -> tuple[tuple, list[int | None]]:
    """``value`` as a template (literal strings and slots) and the slots' values."""
    template: list = []
    values: list[int | None] = []
    if kind == "path":
        for i, part in enumerate(value.split(".")):
            template.append("." if i else "")
            if part.isdigit():
                template.append(_INDEX)
                values.append(int(part))
            else:
                template.append(part)
        return tuple(template), values
    pos = 0
    for match in _TEXT_TOKEN.finditer(value):
        template.append(value[pos:match.start()])
        pos = match.end()
        token = match.group()
        if token.isdigit():
            template.append(_INDEX)
            values.append(int(token))
            continue
        counter = _TRAILING_COUNTER.search(token)
        if counter:
            token = token[: counter.start()]
        for i, piece in enumerate(_MID_INDEX.split(token)):
            if i % 2:
                template.append(_INDEX)
                values.append(int(piece))
            else:
                template.append(piece)
        template.append(_COUNTER)
        values.append(int(counter.group(1)) if counter else None)
    template.append(value[pos:])
    return tuple(template), values


def _normalize(value: str, kind: str) -> Any:
    """What ``value`` compares as: its template for a path or text, itself otherwise."""
    return _tokens(value, kind)[0] if kind in _FOLDABLE else value


def _merge(values: Sequence[str], kind: str) -> str:
    """One string for values equal up to their indices: a varying index as a range
    ("0-79", "{0-2,5}", "*" beyond three runs), counters as in the first value."""
    if kind not in _FOLDABLE or all(v == values[0] for v in values):
        return values[0]
    tokens = [_tokens(v, kind) for v in values]
    out = []
    slot = 0
    for piece in tokens[0][0]:
        if isinstance(piece, str):
            out.append(piece)
            continue
        found = [t[1][slot] for t in tokens]
        slot += 1
        if piece is _INDEX:
            out.append(_ranges(sorted(set(found))))
        else:
            out.append("" if found[0] is None else f"_{found[0]}")
    return "".join(out)


def _ranges(numbers: list[int]) -> str:
    """Sorted distinct numbers as runs: "3", "0-79", "{0-1,3}", or "*" beyond three runs."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    if len(runs) == 1:
        a, b = runs[0]
        return str(a) if a == b else f"{a}-{b}"
    if len(runs) > 3:
        return "*"
    return "{" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) + "}"
