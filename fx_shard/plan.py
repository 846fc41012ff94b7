"""Shard plans: which style each linear-like layer gets, and why.

A ``ShardPlan`` is ordered data. Precedence, highest first:

1. an exact module name in the plan's entries;
2. the first glob (``fnmatch``, ``*`` crosses dots) or ``re:`` regex entry
   that matches, in insertion order;
3. the seed's rules by layer class name (``layers.CLASS_STYLES``), base
   classes included;
4. with ``auto``, the model's own plan (a Hugging Face ``_tp_plan``), then
   what ``fx_shard.infer`` finds in the graph's data flow;
5. otherwise the layer stays replicated, and the record says no rule covered it.

``resolve`` turns the plan into one ``ShardingRecord`` per layer before any
graph rewriting, checking every entry matched something and every sharded
dimension divides by the mesh axis.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from torch import nn

from fx_shard.errors import PlanError

if TYPE_CHECKING:
    from fx_shard.infer import Inferred
from fx_shard.layers import class_style, in_features, out_features, output_dim
from fx_shard.sharding import Axis, ShardingRecord, Spec, axis_names, axis_size

__all__ = ["STYLES", "LayerPlan", "ShardPlan", "first_match", "resolve_tp_axis"]

logger = logging.getLogger(__name__)

STYLES: tuple[str, ...] = ("colwise", "rowwise", "qkv", "merged_colwise", "vocab", "lm_head", "replicate")
_FUSED = ("qkv", "merged_colwise")
_EMBEDDING_STYLES = ("vocab", "replicate")


@dataclass(frozen=True)
class LayerPlan:
    """One plan entry's value: a style, and for fused layers how the output splits.

    For ``qkv`` on a layer that does not carry ``output_sizes`` itself, give
    ``output_sizes`` or ``num_heads`` (and ``num_kv_heads`` for grouped
    attention); with neither, the output splits in three equal parts.
    ``gather_output`` replicates a column-parallel output (e.g. logits) on
    every device; by default it stays sharded (gathered only on ``.cpu()``).
    """

    style: str
    output_sizes: tuple[int, ...] | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    gather_output: bool = False

    @classmethod
    def parse(cls, value: str | Mapping | LayerPlan, entry: str) -> LayerPlan:
        """A ``LayerPlan`` from a style name, a dict of its fields, or itself."""
        if isinstance(value, LayerPlan):
            layer = value
        elif isinstance(value, str):
            layer = cls(value)
        elif isinstance(value, Mapping):
            unknown = set(value) - {"style", "output_sizes", "num_heads", "num_kv_heads", "gather_output"}
            if unknown or "style" not in value:
                raise PlanError(
                    f"plan entry {entry!r}: {dict(value)!r} is not a layer plan; "
                    "give a style name or a dict with 'style' and optionally "
                    "'output_sizes', 'num_heads', 'num_kv_heads', 'gather_output'"
                )
            sizes = value.get("output_sizes")
            layer = cls(value["style"], tuple(sizes) if sizes is not None else None,
                        value.get("num_heads"), value.get("num_kv_heads"), bool(value.get("gather_output", False)))
        else:
            raise PlanError(f"plan entry {entry!r}: {value!r} is not a style; styles: {', '.join(STYLES)}")
        if layer.style not in STYLES:
            raise PlanError(f"plan entry {entry!r}: unknown style {layer.style!r}; styles: {', '.join(STYLES)}")
        return layer

    def to_data(self) -> str | dict:
        """The plain-data form: the style name alone when nothing else is set."""
        data = {k: v for k, v in asdict(self).items() if v is not None and v is not False}
        return self.style if len(data) == 1 else data


class ShardPlan:
    """Module-name patterns to layer styles, over the seed's class-name rules.

    >>> plan = ShardPlan({"*.q_proj": "colwise"}).set_module_name("*.o_proj", "rowwise")
    """

    def __init__(
        self, entries: Mapping[str, str | Mapping | LayerPlan] | None = None, *, class_rules: bool = True, auto: bool = False
    ) -> None:
        self.entries: dict[str, LayerPlan] = {}
        self.class_rules = class_rules
        self.auto = auto
        for pattern, value in (entries or {}).items():
            self.set_module_name(pattern, value)

    @classmethod
    def coerce(cls, plan: ShardPlan | Mapping | None) -> ShardPlan:
        """A ``ShardPlan`` from what ``shard`` / ``transform`` accept as ``plan``."""
        if plan is None:
            return cls()
        if plan == "auto":
            return cls(auto=True)
        if isinstance(plan, ShardPlan):
            return plan
        if isinstance(plan, Mapping):
            return cls(plan)
        raise PlanError(
            f"plan={plan!r} is not a plan; pass 'auto', a ShardPlan, a dict of module-name pattern to style, "
            "or None for the class-name rules alone"
        )

    def set_module_name(self, pattern: str, layer: str | Mapping | LayerPlan) -> ShardPlan:
        """Add (or replace) the entry for ``pattern``; returns self for chaining."""
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise PlanError(f"plan entry {pattern!r} is not a valid regular expression: {e}") from e
        self.entries[pattern] = LayerPlan.parse(layer, pattern)
        return self

    def to_dict(self) -> dict:
        entries = {p: layer.to_data() for p, layer in self.entries.items()}
        return {"entries": entries, "class_rules": self.class_rules, "auto": self.auto}

    @classmethod
    def from_dict(cls, data: Mapping) -> ShardPlan:
        return cls(data.get("entries", {}), class_rules=data.get("class_rules", True), auto=data.get("auto", False))

    def __repr__(self) -> str:
        lines = ["ShardPlan(  # precedence: exact name > first matching pattern > class rules > auto > replicate"]
        lines += [f"  {p!r}: {layer.to_data()!r}," for p, layer in self.entries.items()]
        lines.append(f"  class_rules={self.class_rules},")
        lines.append(f"  auto={self.auto},")
        return "\n".join(lines) + "\n)"

    def match(self, name: str) -> str | None:
        """The entry that decides ``name``, by the precedence above, or None."""
        return first_match(self.entries, name)

    def resolve(
        self,
        modules: Mapping[str, nn.Module],
        mesh_shape: Mapping[str, int],
        tp_axis: Axis,
        inferred: Mapping[str, Inferred] | None = None,
        model_plan: Mapping[str, tuple[LayerPlan, str]] | None = None,
    ) -> dict[str, ShardingRecord]:
        """One record per linear-like module (name -> module, in graph order).

        What entries and class rules leave open is decided by ``model_plan``
        (the model's own, e.g. a Hugging Face ``_tp_plan``: pattern -> (plan,
        its style name)), then by ``inferred`` (``infer.infer_plan``).
        """
        records: dict[str, ShardingRecord] = {}
        used: set[str] = set()
        for name, module in modules.items():
            entry = self.match(name)
            rule = class_style(module) if self.class_rules else None
            if entry is not None:
                used.add(entry)
                layer, source = self.entries[entry], f"plan entry {entry!r}"
            elif rule is not None:
                layer, source = LayerPlan(rule[0]), f"class rule {rule[1]}"
            elif model_plan and (pattern := first_match(model_plan, name)) is not None:
                layer, source = model_plan[pattern][0], f"model plan {pattern!r} ({model_plan[pattern][1]})"
            elif inferred and name in inferred:
                layer, source = inferred[name].layer, inferred[name].reason
            else:
                layer, source = LayerPlan("replicate"), "no rule covers it"
            records[name] = _record(name, module, layer, source, axis_size(mesh_shape, tp_axis), tp_axis)
        unused = [p for p in self.entries if p not in used]
        if unused:
            raise PlanError(_unmatched_message(unused, list(modules)))
        uncovered = [n for n, r in records.items() if r.source == "no rule covers it"]
        if uncovered:
            logger.info("replicated, no rule covers them: %s", ", ".join(uncovered))
        return records


def first_match(patterns: Mapping[str, object], name: str) -> str | None:
    """The exact key ``name``, else the first glob (``*`` crosses dots) or ``re:`` pattern matching it."""
    if name in patterns:
        return name
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return pattern
        elif fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


def resolve_tp_axis(mesh_shape: Mapping[str, int], tp_axis: Axis | None = None) -> Axis:
    """The tensor-parallel mesh axis (or axes, major first).

    Without ``tp_axis``: ``("kv", "tp")`` on a mesh with a ``kv`` axis (see
    ``make_mesh(kv=)``); else the only axis larger than 1; else one named
    ``tp``, ``model`` or ``x``.
    """
    names = list(mesh_shape)
    if tp_axis is not None:
        missing = [a for a in axis_names(tp_axis) if a not in mesh_shape]
        if missing:
            raise PlanError(f"mesh axis {missing[0]!r} does not exist; the mesh has axes {names}")
        return tp_axis
    conventional = [a for a in ("tp", "model", "x") if a in mesh_shape]
    if "kv" in mesh_shape and conventional:
        return ("kv", conventional[0])
    large = [a for a in names if mesh_shape[a] > 1]
    if len(large) == 1:
        return large[0]
    if conventional:
        return conventional[0]
    if not large:
        return names[0]
    raise PlanError(
        f"cannot tell the tensor-parallel axis of mesh {dict(mesh_shape)}; pass tp_axis= with one of {names}"
    )


def _record(name: str, module: nn.Module, layer: LayerPlan, source: str, n: int, axis: Axis) -> ShardingRecord:
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise PlanError(f"{name} ({type(module).__name__}) has no 2-D weight; it cannot take style {layer.style!r}")
    has_bias = getattr(module, "bias", None) is not None
    is_embedding = isinstance(module, nn.Embedding) or (class_style(module) or ("",))[0] == "vocab"
    if is_embedding and layer.style not in _EMBEDDING_STYLES:
        raise PlanError(
            f"style {layer.style!r} does not apply to embedding {name} ({type(module).__name__}); "
            f"use one of {', '.join(_EMBEDDING_STYLES)}"
        )
    if not is_embedding and layer.style == "vocab":
        raise PlanError(f"style 'vocab' applies to embeddings, not to {name} ({type(module).__name__}); use 'lm_head' or 'colwise'")
    if layer.gather_output and layer.style not in ("colwise", "lm_head"):
        raise PlanError(f"{name}: gather_output applies to styles colwise and lm_head, not {layer.style!r}")
    outputs, inputs = out_features(module), in_features(module)
    # Weight specs for a (out, in) layout, flipped for Conv1D's (in, out).
    column, row = ((axis, None), (None, axis))[:: 1 if output_dim(module) == 0 else -1]
    sizes: tuple[int, ...] = ()
    specs: dict[str, Spec] = {}
    if layer.style == "rowwise":
        _check_divides(name, "input features", inputs, n, axis)
        specs["weight"] = row
    elif layer.style != "replicate":
        sizes = _output_sizes(name, module, layer, outputs) if layer.style in _FUSED else ()
        for size in sizes or (outputs,):
            _check_divides(name, "output features" if not sizes else f"part size (of {list(sizes)})", size, n, axis)
        specs["weight"] = column
        if has_bias:
            specs["bias"] = (axis,)
    return ShardingRecord(layer.style, specs, source, sizes, output_spec=() if layer.gather_output else None)


def _output_sizes(name: str, module: nn.Module, layer: LayerPlan, out_features: int) -> tuple[int, ...]:
    """How a fused layer's output splits: the plan's sizes, the layer's own, head counts, or equal parts."""
    parts = 3 if layer.style == "qkv" else 2
    sizes = layer.output_sizes or tuple(getattr(module, "output_sizes", ()) or ())
    if len(sizes) == 1:
        sizes = ()
    if not sizes and layer.num_heads is not None:
        kv = layer.num_kv_heads or layer.num_heads
        head_dim, rest = divmod(out_features, layer.num_heads + 2 * kv)
        if rest:
            raise PlanError(
                f"{name}: {out_features} output features do not hold {layer.num_heads} q heads and "
                f"{kv} k/v heads each of one head_dim; check num_heads / num_kv_heads"
            )
        sizes = (layer.num_heads * head_dim, kv * head_dim, kv * head_dim)
    if not sizes:
        if out_features % parts:
            raise PlanError(
                f"{name}: {out_features} output features do not split into {parts} equal parts; "
                "give output_sizes (or num_heads/num_kv_heads) in the plan entry"
            )
        sizes = (out_features // parts,) * parts
    if sum(sizes) != out_features or (layer.style == "qkv" and len(sizes) != 3):
        raise PlanError(
            f"{name} ({type(module).__name__}): output_sizes {list(sizes)} do not add up to its "
            f"{out_features} output features{' in 3 parts' if layer.style == 'qkv' else ''}; "
            "fix output_sizes or the head counts"
        )
    return tuple(sizes)


def _check_divides(name: str, what: str, size: int, n: int, axis: Axis) -> None:
    if size % n:
        divisors = [d for d in range(1, size + 1) if size % d == 0 and d <= n]
        raise PlanError(
            f"{what} ({size}) of {name} are not divisible by mesh axis {axis!r} ({n}); "
            f"use a mesh axis of {', '.join(map(str, divisors))}, or replicate this layer in the plan"
        )


def _unmatched_message(unused: list[str], names: list[str]) -> str:
    lines = [f"plan entries match no linear-like layer: {', '.join(repr(p) for p in unused)}"]
    for pattern in unused:
        close = difflib.get_close_matches(pattern, names, n=3)
        if close:
            lines.append(f"  {pattern!r}: did you mean {', '.join(close)}?")
    lines.append(f"  the layers are: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    return "\n".join(lines)
