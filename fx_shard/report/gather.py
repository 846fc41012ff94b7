"""What the report reads from a transformed model: its record, graphs, layers, parameters and pass diff.

Only what ``transform`` / ``shard`` left on the model (``model.meta["sharding"]``,
the records on the graphs' nodes) and the parameters' shapes and dtypes: never
their data, so a ``meta`` model reports as well as a materialized one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import fx, nn

from fx_shard.axes import Spec, axis_size, local_shape
from fx_shard.check import CHECK_KEY
from fx_shard.errors import FxShardError
from fx_shard.sharding import (
    SHARDING_KEY,
    ModelSharding,
    ShardingRecord,
    layer_parameters,
    recorded_layers,
)

_CHANGES = ("removed", "added", "rewritten")


class Layer:
    """One recorded layer: path, record, the graph it sits in, and its parameters."""

    def __init__(self, path: str, record: ShardingRecord, graph: str | None) -> None:
        self.path, self.record, self.graph = path, record, graph
        self.parameters: list[dict[str, Any]] = []

    @property
    def sharded(self) -> bool:
        """Whether any of its parameters is split over a mesh axis."""
        return any(any(p["spec"]) for p in self.parameters)


def model_sharding(model: nn.Module) -> ModelSharding:
    """The ``ModelSharding`` fx_shard left on ``model``; FxShardError if there is none."""
    meta = getattr(model, "meta", None)
    summary = meta.get(SHARDING_KEY) if isinstance(meta, dict) else None
    if not isinstance(summary, ModelSharding):
        raise FxShardError(
            f"{type(model).__name__} carries no fx_shard sharding record (meta[{SHARDING_KEY!r}]); "
            "report on what fx_shard.transform or fx_shard.shard returned"
        )
    return summary


def self_check(model: nn.Module) -> dict[str, Any] | None:
    """The last ``fx_shard.check`` of the model (``shard`` runs it given example inputs) as data; None if none ran."""
    result = model.meta.get(CHECK_KEY)
    if result is None:
        return None
    return {"ok": result.ok, "error": result.error, "tolerance": result.tolerance,
            "first_divergence": result.first_divergence, "detail": result.detail}


def graph_modules(model: nn.Module) -> Iterable[tuple[str, fx.GraphModule]]:
    """Every ``GraphModule`` in ``model`` (itself included), with its module path."""
    for prefix, sub in model.named_modules():
        if isinstance(sub, fx.GraphModule):
            yield prefix, sub


def graph_paths(model: nn.Module, summary: ModelSharding) -> list[str]:
    """The graphs (parts) fx_shard rewrote, by module path ('' for a model captured whole)."""
    seen = dict.fromkeys(d.part for d in summary.diff)
    seen.update(dict.fromkeys(prefix for prefix, _ in graph_modules(model)))
    return list(seen)


def planned_layers(model: nn.Module, summary: ModelSharding) -> list[Layer]:
    """Every recorded layer, in the model's module order, with its parameters' shapes and specs."""
    graph_of = {}
    for prefix, gm in graph_modules(model):
        for target, _ in recorded_layers(gm):
            graph_of.setdefault(f"{prefix}.{target}" if prefix else target, prefix)
    mesh = summary.mesh_shape
    layers: dict[str, Layer] = {}
    owner: dict[int, str] = {}
    for path, record, name, param in layer_parameters(model):
        layer = layers.setdefault(path, Layer(path, record, graph_of.get(path)))
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
        layers.setdefault(path, Layer(path, record, None))
    order = {path: i for i, (path, _) in enumerate(model.named_modules(remove_duplicate=False))}
    return sorted(layers.values(), key=lambda layer: order.get(layer.path, len(order)))


def parameter_bytes_rows(model: nn.Module, summary: ModelSharding) -> dict[str, Any]:
    """Parameter bytes by kind (sharded, replicated by the plan, in no planned layer), each tensor once."""
    mesh = summary.mesh_shape
    specs: dict[int, Spec | None] = {}
    for _, record, name, param in layer_parameters(model):
        specs[id(param)] = record.specs.get(name)
    planned = set(specs)
    specs.update((id(model.get_parameter(name)), spec) for name, spec in summary.unplanned.items())
    kinds = {"sharded": [0, 0, 0, 0], "replicated by the plan": [0, 0, 0, 0], "in no planned layer": [0, 0, 0, 0]}
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        spec = specs.get(id(param))
        if id(param) not in planned:
            kind = "in no planned layer"
        else:
            kind = "sharded" if any(spec or ()) else "replicated by the plan"
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


def unplanned_parameters(model: nn.Module) -> list[dict[str, Any]]:
    """Modules owning parameters that no layer record covers (norms, convolutions, position tables).

    On an fsdp mesh a parameter sharded over it has its ``spec`` too.
    """
    recorded = {id(param) for *_, param in layer_parameters(model)}
    specs = model_sharding(model).unplanned
    owners: dict[str, list[dict[str, Any]]] = {}
    for qualified, param in model.named_parameters():
        if id(param) not in recorded:
            path, _, name = qualified.rpartition(".")
            entry = {"name": name, "shape": list(param.shape)}
            if qualified in specs:
                entry["spec"] = _spec_json(specs[qualified], param.dim())
            owners.setdefault(path, []).append(entry)
    return [{"module": path, "parameters": params} for path, params in owners.items()]


def pass_diff(summary: ModelSharding) -> tuple[list[dict[str, Any]], list[list[dict[str, str]]]]:
    """Per pass, in order: its counts of graphs and nodes changed, and one row per node it changed.

    Returns the counts (one dict per pass) and the rows (one list per pass, same order).
    """
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
    return list(passes.values()), list(rows.values())


def _split_node(described: str) -> tuple[str, str]:
    """``"name = target(args)"`` -> ``("name", "target(args)")``."""
    name, sep, rest = described.partition(" = ")
    return (name, rest) if sep else ("", described)


def _spec_json(spec: Spec | None, rank: int) -> list[Any]:
    """A spec as JSON: one entry per dimension, an axis name, a list of names, or None."""
    if spec is None:
        return [None] * rank
    return [list(a) if isinstance(a, tuple) else a for a in spec]
