"""What fx_shard did to a model and what it costs, as tables a user reads top to bottom.

``report(model)`` reads only what ``transform`` / ``shard`` left on the model
(``model.meta["sharding"]``: the records, the pass diff, what stayed opaque)
and the parameters' shapes; it never touches parameter data and never
imports torch_xla, so it works on ``meta`` models and before any XLA device
exists. Sections, in order:

1. the graph diff: nodes each pass added, removed and rewrote, per graph;
2. the layers: style, why, per-parameter global -> per-device shape, mesh axes;
3. the costs: parameter bytes (total, per device, ideal) and collectives per
   block, predicted from the records and, given ``measured=``, counted in
   XLA's partitioned HLO;
4. what was left alone: modules that did not trace, replicated layers,
   parameters no layer plan covers.

Rows that differ only in a numeric index (``layers.3`` / ``layers.4``, node
names ``..._3_...``) and are otherwise identical fold into one row with a
count: ``model.layers.0-79.mlp.down_proj  80×``.

>>> gm = fx_shard.transform(model, plan, mesh_shape={"tp": 8}, example_inputs=inputs)
>>> print(fx_shard.report(gm))                       # plain text
>>> data = json.loads(fx_shard.report(gm, "json"))   # the same content for tools
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from tabulate import tabulate
from torch import fx, nn

from fx_shard.errors import FxShardError
from fx_shard.hlo import COLLECTIVE_OPS
from fx_shard.sharding import (
    SHARDING_KEY,
    ModelSharding,
    ShardingRecord,
    Spec,
    axis_size,
    layer_parameters,
    local_shape,
    recorded_layers,
)

__all__ = ["FORMATS", "SCHEMA", "parameter_bytes", "report", "report_data"]

FORMATS: tuple[str, ...] = ("text", "markdown", "github", "json")
#: The ``"schema"`` value of the JSON report; bumped when a key changes meaning.
SCHEMA = "fx_shard.report/1"

# Rows shown per pass in the diff tables (after folding); the JSON form has every row.
MAX_DIFF_ROWS = 40

_TABLEFMT = {"text": "simple", "markdown": "pipe", "github": "github"}
_CHANGES = ("removed", "added", "rewritten")

PREDICTION = (
    "Predicted from the sharding records, not by XLA: one all-reduce per call of a row-parallel layer "
    "(each device holds a partial sum of its output) and one per vocabulary-parallel embedding (each device "
    "looks up only its own rows); one all-gather per layer whose output is pinned replicated (gather_output); "
    "none for column-parallel, fused-part and replicated layers. It assumes that what runs between a "
    "column-parallel layer and its row-parallel partner stays on each device, which fx_shard's rewrites "
    "(fused QKV split and rewired, attention as einsum, heads kept whole) are there to ensure. "
    "Layers planned as modules outside any graph count once each."
)


def report(model: nn.Module, format: str = "text", measured: Mapping[str, int] | None = None, *, fold: bool = True) -> str:
    """The report on a model ``fx_shard.transform`` or ``fx_shard.shard`` returned.

    ``format``: ``"text"`` (plain tables), ``"markdown"`` (pipe tables),
    ``"github"`` (GitHub tables) or ``"json"`` (``report_data`` as JSON).
    ``measured``: ``fx_shard.collectives(model, *inputs)`` (or any mapping of
    collective op -> count), shown beside the prediction; its
    ``parameter_bytes``, if present, beside the computed per-device bytes.
    ``fold=False`` keeps one row per layer and per node.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown report format {format!r}; valid formats: {', '.join(FORMATS)}")
    data = report_data(model, measured, fold=fold)
    if format == "json":
        return json.dumps(data, indent=2)
    return _Renderer(format).render(data)


def report_data(model: nn.Module, measured: Mapping[str, int] | None = None, *, fold: bool = True) -> dict[str, Any]:
    """The report's content as plain data (what ``report(model, "json")`` serializes).

    Top-level keys: ``schema``, ``model``, ``mesh``, ``tp_axis``, ``passes``,
    ``graphs``, ``summary``, ``diff``, ``layers``, ``costs``, ``left_alone``.
    Folded rows carry ``count`` and the list of what they stand for
    (``modules``, ``members``), so nothing is lost by folding.
    """
    summary = _model_sharding(model)
    layers = _layers(model, summary)
    bytes_ = _parameter_bytes_rows(model, summary)
    graphs = _graphs(model, summary)
    predicted = _predicted(model, summary, layers)
    total_predicted = _total(predicted)
    sharded = [row for row in layers if row.sharded]
    data = {
        "schema": SCHEMA,
        "model": type(model).__name__,
        "mesh": dict(summary.mesh_shape),
        "tp_axis": _axis_json(summary.tp_axis),
        "passes": list(summary.passes),
        "graphs": graphs,
        "summary": {
            "layers": len(layers),
            "sharded": len(sharded),
            "replicated": len(layers) - len(sharded),
            "graphs": len(graphs),
            "opaque_modules": len(summary.opaque),
            "parameter_bytes": bytes_["total"],
            "parameter_bytes_per_device": bytes_["per_device"],
            "collectives_predicted": {op: n for op, n in total_predicted.items() if n},
        },
        "diff": _diff(summary, graphs, fold),
        "layers": _fold_layers(layers, fold),
        "costs": {
            "parameter_bytes": {**bytes_, "measured_per_device": getattr(measured, "parameter_bytes", None)},
            "collectives": {
                "method": PREDICTION,
                "blocks": _fold_blocks(predicted, fold),
                "predicted": total_predicted,
                "measured": None if measured is None else {op: int(measured.get(op, 0)) for op in _ops(measured)},
            },
        },
        "left_alone": {
            "opaque": _fold_rows(
                [{"module": path, "reason": reason} for path, reason in summary.opaque.items()],
                {"module": "path", "reason": "text"}, "modules", fold,
            ),
            "replicated": _fold_rows(
                [{"module": r.path, "style": r.record.style, "source": r.record.source, "notes": "\n".join(r.record.notes)}
                 for r in layers if not r.sharded],
                {"module": "path", "style": "exact", "source": "text", "notes": "text"}, "modules", fold,
            ),
            "unplanned": _fold_rows(_unplanned(model, summary), {"module": "path", "parameters": "exact"}, "modules", fold),
        },
    }
    for row in data["left_alone"]["unplanned"]:
        row["parameters"] = json.loads(row["parameters"])
    for row in data["left_alone"]["replicated"]:
        row["notes"] = row["notes"].split("\n") if row["notes"] else []
    return data


def parameter_bytes(gm: nn.Module) -> tuple[int, int, int]:
    """(total, per device, ideal per device) parameter bytes, each shared tensor counted once.

    Ideal is each sharded tensor's bytes over its mesh axes' size, plus replicated bytes.
    """
    rows = _parameter_bytes_rows(gm, _model_sharding(gm))
    return rows["total"], rows["per_device"], rows["per_device_ideal"]


# ---------------------------------------------------------------- gathering


class _Layer:
    """One recorded layer: path, record, the graph it sits in, and its parameters."""

    def __init__(self, path: str, record: ShardingRecord, graph: str | None) -> None:
        self.path, self.record, self.graph = path, record, graph
        self.parameters: list[dict[str, Any]] = []

    @property
    def sharded(self) -> bool:
        return any(any(_axes(p["spec"])) for p in self.parameters)


def _model_sharding(model: nn.Module) -> ModelSharding:
    meta = getattr(model, "meta", None)
    summary = meta.get(SHARDING_KEY) if isinstance(meta, dict) else None
    if not isinstance(summary, ModelSharding):
        raise FxShardError(
            f"{type(model).__name__} carries no fx_shard sharding record (meta[{SHARDING_KEY!r}]); "
            "report on what fx_shard.transform or fx_shard.shard returned"
        )
    return summary


def _graph_modules(model: nn.Module) -> Iterable[tuple[str, fx.GraphModule]]:
    for prefix, sub in model.named_modules():
        if isinstance(sub, fx.GraphModule):
            yield prefix, sub


def _graphs(model: nn.Module, summary: ModelSharding) -> list[str]:
    """The graphs (parts) fx_shard rewrote, by module path ('' for a model captured whole)."""
    seen = dict.fromkeys(d.part for d in summary.diff)
    seen.update(dict.fromkeys(prefix for prefix, _ in _graph_modules(model)))
    return list(seen)


def _layers(model: nn.Module, summary: ModelSharding) -> list[_Layer]:
    """Every recorded layer, in the model's module order, with its parameters' shapes and specs."""
    graph_of = {}
    for prefix, gm in _graph_modules(model):
        for target, _ in recorded_layers(gm):
            graph_of.setdefault(f"{prefix}.{target}" if prefix else target, prefix)
    mesh = summary.mesh_shape
    layers: dict[str, _Layer] = {}
    owner: dict[int, str] = {}
    for path, record, name, param in layer_parameters(model):
        layer = layers.setdefault(path, _Layer(path, record, graph_of.get(path)))
        spec = record.specs.get(name)
        qualified = f"{path}.{name}"
        layer.parameters.append({
            "name": name,
            "global_shape": list(param.shape),
            "spec": _spec_json(spec, len(param.shape)),
            "per_device_shape": list(local_shape(param.shape, spec, mesh)),
            "tied_to": owner.get(id(param)),
        })
        owner.setdefault(id(param), qualified)
    for path, record in summary.layers.items():  # recorded layers without parameters still show
        layers.setdefault(path, _Layer(path, record, None))
    order = {path: i for i, (path, _) in enumerate(model.named_modules(remove_duplicate=False))}
    return sorted(layers.values(), key=lambda layer: order.get(layer.path, len(order)))


def _parameter_bytes_rows(model: nn.Module, summary: ModelSharding) -> dict[str, Any]:
    """Parameter bytes by kind (sharded, replicated by the plan, in no planned layer), each tensor once."""
    mesh = summary.mesh_shape
    specs: dict[int, Spec | None] = {}
    for _, record, name, param in layer_parameters(model):
        specs[id(param)] = record.specs.get(name)
    kinds = {"sharded": [0, 0, 0, 0], "replicated by the plan": [0, 0, 0, 0], "in no planned layer": [0, 0, 0, 0]}
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        spec = specs.get(id(param))
        if any(_axes(spec or ())):
            kind = "sharded"
        else:
            kind = "replicated by the plan" if id(param) in specs else "in no planned layer"
        size = param.element_size()
        row = kinds[kind]
        row[0] += 1
        row[1] += param.numel() * size
        row[2] += math.prod(local_shape(param.shape, spec, mesh)) * size
        row[3] += param.numel() * size // math.prod(axis_size(mesh, a) for a in spec or ())
    rows = [
        {"parameters": kind, "tensors": t, "total": total, "per_device": device, "per_device_ideal": ideal}
        for kind, (t, total, device, ideal) in kinds.items()
    ]
    return {
        "rows": rows,
        "tensors": sum(r["tensors"] for r in rows),
        "total": sum(r["total"] for r in rows),
        "per_device": sum(r["per_device"] for r in rows),
        "per_device_ideal": sum(r["per_device_ideal"] for r in rows),
    }


def _unplanned(model: nn.Module, summary: ModelSharding) -> list[dict[str, str]]:
    """Modules owning parameters that no layer record covers (norms, convolutions, position tables)."""
    recorded = {id(param) for *_, param in layer_parameters(model)}
    owners: dict[str, list[dict[str, Any]]] = {}
    for qualified, param in model.named_parameters():
        if id(param) not in recorded:
            path, _, name = qualified.rpartition(".")
            owners.setdefault(path, []).append({"name": name, "shape": list(param.shape)})
    return [{"module": path, "parameters": json.dumps(params)} for path, params in owners.items()]


def _calls(model: nn.Module, summary: ModelSharding) -> Counter[str]:
    """How many times each recorded layer is called: its call_module nodes, or once outside graphs."""
    calls: Counter[str] = Counter()
    for prefix, gm in _graph_modules(model):
        for target, _ in recorded_layers(gm):
            calls[f"{prefix}.{target}" if prefix else target] += 1
    for path in summary.layers:
        calls.setdefault(path, 1)
    return calls


def _per_call(layer: _Layer) -> dict[str, int]:
    """Collectives one call of ``layer`` needs (see PREDICTION)."""
    record = layer.record
    if not layer.sharded:
        return {}
    ops: Counter[str] = Counter()
    if record.style in ("rowwise", "vocab"):
        ops["all-reduce"] += 1
    if record.output_spec is not None and not any(_axes(_spec_json(record.output_spec, len(record.output_spec)))):
        ops["all-gather"] += 1
    return dict(ops)


def _predicted(model: nn.Module, summary: ModelSharding, layers: list[_Layer]) -> list[dict[str, Any]]:
    """Per block (the module path up to its first numeric part): predicted collectives and their layers."""
    calls = _calls(model, summary)
    blocks: dict[str, dict[str, Any]] = {}
    for layer in layers:
        block, rest = _block_of(layer.path)
        row = blocks.setdefault(block, {"block": block, "ops": Counter(), "from": []})
        n = calls.get(layer.path, 0)
        for op, k in _per_call(layer).items():
            row["ops"][op] += k * n
            times = f" ×{n}" if n != 1 else ""
            row["from"].append(f"{rest} ({layer.record.style}: {op}{times})")
    ordered = sorted(blocks.values(), key=lambda r: r["block"] == "")  # layers outside blocks last
    return [
        {"block": r["block"], "predicted": {op: r["ops"][op] for op in COLLECTIVE_OPS}, "from": ", ".join(r["from"])}
        for r in ordered
    ]


def _total(blocks: list[dict[str, Any]]) -> dict[str, int]:
    return {op: sum(b["predicted"][op] for b in blocks) for op in COLLECTIVE_OPS}


def _block_of(path: str) -> tuple[str, str]:
    """``("model.layers.3", "mlp.down_proj")``; ``("", path)`` when the path has no numeric part."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i + 1 < len(parts):
            return ".".join(parts[: i + 1]), ".".join(parts[i + 1:])
    return "", path


def _ops(measured: Mapping[str, int]) -> list[str]:
    return list(COLLECTIVE_OPS) + [op for op in measured if op not in COLLECTIVE_OPS]


# ---------------------------------------------------------------- the diff


def _diff(summary: ModelSharding, graphs: list[str], fold: bool) -> dict[str, Any]:
    passes: dict[str, dict[str, Any]] = {}
    rows: dict[str, list[dict[str, str]]] = {}
    for name in summary.passes:
        passes[name] = {"pass": name, "graphs": 0, "graphs_changed": 0, "added": 0, "removed": 0, "rewritten": 0}
        rows[name] = []
    for d in summary.diff:
        entry = passes.setdefault(
            d.pass_name, {"pass": d.pass_name, "graphs": 0, "graphs_changed": 0, "added": 0, "removed": 0, "rewritten": 0}
        )
        entry["graphs"] += 1
        entry["graphs_changed"] += bool(d.added or d.removed or d.rewritten)
        for change in _CHANGES:
            entry[change] += len(getattr(d, change))
        pass_rows = rows.setdefault(d.pass_name, [])
        for change in _CHANGES:
            for item in getattr(d, change):
                before, after = item if change == "rewritten" else ((item, "") if change == "removed" else ("", item))
                node, before_text = _split_node(before)
                node_after, after_text = _split_node(after)
                pass_rows.append({
                    "pass": d.pass_name, "graph": d.part, "change": change, "node": node or node_after,
                    "before": before_text, "after": after_text,
                })
    kinds = {"pass": "exact", "graph": "path", "change": "exact", "node": "text", "before": "text", "after": "text"}
    folded = []
    for pass_rows in rows.values():
        folded.extend(_fold_rows(pass_rows, kinds, "members", fold, member=lambda r: [r["graph"], r["node"]]))
    return {"passes": list(passes.values()), "rows": folded}


def _split_node(described: str) -> tuple[str, str]:
    """``"name = target(args)"`` -> ``("name", "target(args)")``."""
    name, sep, rest = described.partition(" = ")
    return (name, rest) if sep else ("", described)


# ---------------------------------------------------------------- folding

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


def _fold_layers(layers: list[_Layer], fold: bool) -> list[dict[str, Any]]:
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


def _fold_blocks(blocks: list[dict[str, Any]], fold: bool) -> list[dict[str, Any]]:
    rows = [{**b, "predicted": json.dumps(b["predicted"])} for b in blocks]
    folded = _fold_rows(
        rows, {"block": "path", "from": "text", "predicted": "exact"}, "blocks", fold, member=lambda r: r["block"] or None,
    )
    return [
        {"block": r["block"] or None, "count": r["count"], "blocks": r["blocks"],
         "predicted": json.loads(r["predicted"]), "from": r["from"]}
        for r in folded
    ]


# ---------------------------------------------------------------- rendering


class _Renderer:
    """Plain text or markdown, from ``report_data``'s dict."""

    def __init__(self, format: str) -> None:
        self.format = format
        self.markdown = format != "text"
        self.tablefmt = _TABLEFMT[format]

    def render(self, data: dict[str, Any]) -> str:
        out = self._header(data)
        out += self._diff(data)
        out += self._layers(data)
        out += self._costs(data)
        out += self._left_alone(data)
        return "\n".join(out).rstrip() + "\n"

    # -- pieces

    def heading(self, text: str, level: int = 2) -> list[str]:
        if self.markdown:
            return ["#" * level + " " + text, ""]
        return [text, ("=" if level <= 2 else "-") * len(text), ""]

    def para(self, text: str) -> list[str]:
        return [text, ""]

    def code(self, text: str) -> str:
        if not text:
            return ""
        return f"`{text}`".replace("|", "\\|") if self.markdown else text

    def prose(self, text: str) -> str:
        if not self.markdown:
            return text
        return re.sub(r"([\\*_|<>\[\]`])", r"\\\1", text)

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
        if self.markdown:
            return ["# " + self.prose(title), "", *map(self.prose, lines), ""]
        return [title, "", *lines, ""]

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
        return out


def _count(n: int) -> str:
    return f"{n}×" if n > 1 else ""


def _axes(spec: Iterable[Any]) -> list[Any]:
    return [a for a in spec if a]


def _spec_json(spec: Spec | None, rank: int) -> list[Any]:
    """A spec as JSON: one entry per dimension, an axis name, a list of names, or None."""
    if spec is None:
        return [None] * rank
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def _axis_json(axis: Any) -> Any:
    return list(axis) if isinstance(axis, tuple) else axis


def _spec(spec: list[Any]) -> str:
    if not _axes(spec):
        return "replicated"
    return "(" + ", ".join("-" if a is None else a if isinstance(a, str) else "×".join(a) for a in spec) + ")"


def _shape(shape: torch.Size | Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n:,} B"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n:,} B ({n / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]})"
