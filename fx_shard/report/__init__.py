"""What fx_shard did to a model and what it costs, as tables a user reads top to bottom.

``report(model)`` reads only what ``transform`` / ``shard`` left on the model
(``model.meta["sharding"]``: the records, the pass diff, what stayed opaque;
the self-check's result, when one ran) and the parameters' shapes; it never
touches parameter data and never imports torch_xla, so it works on ``meta``
models and before any XLA device exists. Sections, in order:

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

The work is split by concern: ``gather`` reads the model, ``predict`` counts
collectives, ``fold`` folds rows, ``render`` writes one format each.

>>> gm = fx_shard.transform(model, plan, mesh_shape={"tp": 8}, example_inputs=inputs)
>>> print(fx_shard.report(gm))                       # plain text
>>> data = json.loads(fx_shard.report(gm, "json"))   # the same content for tools
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from fx_shard.report.fold import (
    fold_blocks,
    fold_diff,
    fold_layers,
    fold_opaque,
    fold_replicated,
    fold_unplanned,
)
from fx_shard.report.gather import (
    graph_paths,
    model_sharding,
    parameter_bytes_rows,
    pass_diff,
    planned_layers,
    self_check,
    unplanned_parameters,
)
from fx_shard.report.predict import (
    PREDICTION,
    measured_counts,
    predicted_blocks,
    predicted_total,
)
from fx_shard.report.render import FORMATS, RENDERERS
from fx_shard.report.render.text import TextRenderer

__all__ = ["FORMATS", "SCHEMA", "parameter_bytes", "report", "report_data"]

#: The ``"schema"`` value of the JSON report; bumped when a key changes meaning.
SCHEMA = "fx_shard.report/1"


def report(
    model: nn.Module, format: str = "text", measured: Mapping[str, int] | None = None, *, fold: bool = True,
    width: int | None = None,
) -> str:
    """The report on a model ``fx_shard.transform`` or ``fx_shard.shard`` returned.

    ``format``: ``"text"`` (plain tables), ``"markdown"`` (pipe tables),
    ``"github"`` (GitHub tables) or ``"json"`` (``report_data`` as JSON).
    ``measured``: ``fx_shard.collectives(model, *inputs)`` (or any mapping of
    collective op -> count), shown beside the prediction; its
    ``parameter_bytes``, if present, beside the computed per-device bytes.
    ``fold=False`` keeps one row per layer and per node. ``width`` (text
    only): no line longer than that, prose and wide table cells wrapped.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown report format {format!r}; valid formats: {', '.join(FORMATS)}")
    if width is None:
        return RENDERERS[format](report_data(model, measured, fold=fold))
    if format != "text":
        raise ValueError(f"width= applies to the text format only, not {format!r}")
    return TextRenderer(width).render(report_data(model, measured, fold=fold))


def report_data(model: nn.Module, measured: Mapping[str, int] | None = None, *, fold: bool = True) -> dict[str, Any]:
    """The report's content as plain data (what ``report(model, "json")`` serializes).

    Top-level keys: ``schema``, ``model``, ``mesh``, ``tp_axis``, ``passes``,
    ``graphs``, ``summary``, ``check`` (the self-check, or None when none
    ran), ``diff``, ``layers``, ``costs``, ``left_alone``.
    Folded rows carry ``count`` and the list of what they stand for
    (``modules``, ``members``), so nothing is lost by folding.
    """
    summary = model_sharding(model)
    layers = planned_layers(model, summary)
    bytes_ = parameter_bytes_rows(model, summary)
    graphs = graph_paths(model, summary)
    blocks = predicted_blocks(model, summary, layers)
    total_predicted = predicted_total(blocks)
    sharded = [layer for layer in layers if layer.sharded]
    passes, diff_rows = pass_diff(summary)
    tp_axis = summary.tp_axis
    return {
        "schema": SCHEMA,
        "model": type(model).__name__,
        "mesh": dict(summary.mesh_shape),
        "tp_axis": list(tp_axis) if isinstance(tp_axis, tuple) else tp_axis,
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
        "check": self_check(model),
        "diff": {"passes": passes, "rows": fold_diff(diff_rows, fold)},
        "layers": fold_layers(layers, fold),
        "costs": {
            "parameter_bytes": {**bytes_, "measured_per_device": getattr(measured, "parameter_bytes", None)},
            "collectives": {
                "method": PREDICTION,
                "blocks": fold_blocks(blocks, fold),
                "predicted": total_predicted,
                "measured": None if measured is None else measured_counts(measured),
            },
        },
        "left_alone": {
            "opaque": fold_opaque(summary.opaque, fold),
            "replicated": fold_replicated(layers, fold),
            "unplanned": fold_unplanned(unplanned_parameters(model), fold),
            "code_kept": list(summary.notes),
        },
    }


def parameter_bytes(gm: nn.Module) -> tuple[int, int, int]:
    """(total, per device, ideal per device) parameter bytes, each shared tensor counted once.

    Ideal is each sharded tensor's bytes over its mesh axes' size, plus replicated bytes.
    """
    rows = parameter_bytes_rows(gm, model_sharding(gm))
    return rows["total"], rows["per_device"], rows["per_device_ideal"]
