"""Shard plans: which style each linear-like layer gets, and why.

A ``ShardPlan`` is ordered data. Precedence, highest first:

1. an exact module name in the plan's entries;
2. the first glob (``fnmatch``, ``*`` crosses dots) or ``re:`` regex entry
   that matches, in insertion order;
3. the seed's rules by layer class name (each style's ``vllm_classes``),
   base classes included;
4. with ``auto``, the model's own plan (a Hugging Face ``_tp_plan``), then
   what ``fx_shard.infer`` finds in the graph's data flow;
5. otherwise the layer stays replicated, and the record says no rule covered it.

``decide`` is that precedence, the one place it is written; ``resolve``
turns the plan into one ``ShardingRecord`` per layer before any graph
rewriting, checking every entry matched something and every sharded
dimension divides by the mesh axis (each style checks its own layers).
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from fx_shard import styles
from fx_shard.axes import DATA_AXES, Axis, Spec, axis_names, axis_size
from fx_shard.capture import own_forward
from fx_shard.errors import PlanError
from fx_shard.sharding import ShardingRecord, SourceKind
from fx_shard.styles import LayerPlan, Replicate

__all__ = ["Decision", "ShardPlan", "check_mesh_shape", "decide", "first_match", "resolve_tp_axis"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What one plan source says about one layer: the layer plan, which kind of source, and why in words."""

    layer: LayerPlan
    kind: SourceKind
    reason: str


NO_RULE = Decision(LayerPlan(Replicate.name), SourceKind.DEFAULT, "no rule covers it")


class ShardPlan:
    """Module-name patterns to layer styles, over the seed's class-name rules.

    >>> plan = ShardPlan({"*.q_proj": "colwise"}).set_module_name("*.o_proj", "rowwise")
    """

    def __init__(
        self, entries: Mapping[str, str | Mapping | LayerPlan] | None = None, *, class_rules: bool = True, auto: bool = False
    ) -> None:
        if entries is not None and not isinstance(entries, Mapping):
            raise PlanError(
                f"plan entries {entries!r} are not a mapping; give a dict of module-name pattern to style, "
                "e.g. {'*.q_proj': 'colwise'}"
            )
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
        if not isinstance(pattern, str):
            raise PlanError(
                f"plan key {pattern!r} ({type(pattern).__name__}) is not a module name; keys are module paths "
                f"as strings, globs or 're:' regexes (the first layer of an nn.Sequential is {str(pattern)!r})"
            )
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
        """The plan ``to_dict`` gave: ``{"entries": {...}, "class_rules": bool, "auto": bool}``."""
        fields = {"entries": Mapping, "class_rules": bool, "auto": bool}
        if not isinstance(data, Mapping) or set(data) - set(fields):
            raise PlanError(
                f"ShardPlan.from_dict takes what ShardPlan.to_dict() gives, a dict with keys {', '.join(fields)}; "
                f"got {data!r} (for a dict of module-name pattern to style, use ShardPlan(entries))"
            )
        for key, kind in fields.items():
            if key in data and not isinstance(data[key], kind):
                raise PlanError(f"ShardPlan.from_dict: {key!r} is {data[key]!r}, not a {kind.__name__}")
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
        inferred: Mapping[str, Decision] | None = None,
        model_plan: Mapping[str, Decision] | None = None,
    ) -> dict[str, ShardingRecord]:
        """One record per linear-like module (name -> module, in graph order).

        What entries and class rules leave open is decided by ``model_plan``
        (the model's own, e.g. a Hugging Face ``_tp_plan``: pattern ->
        decision), then by ``inferred`` (``infer.infer_plan``); see ``decide``.
        """
        records: dict[str, ShardingRecord] = {}
        used: set[str] = set()
        ways = axis_size(mesh_shape, tp_axis)
        for name, module in modules.items():
            decision = decide(self, name, module, model_plan, inferred)
            if decision.kind is SourceKind.PLAN_ENTRY:
                used.add(self.match(name))
            records[name] = _record(name, module, decision, ways, tp_axis)
        unused = [p for p in self.entries if p not in used]
        if unused:
            raise PlanError(_unmatched_message(unused, list(modules)))
        _follow_tied(records, modules, ways, tp_axis)
        uncovered = [n for n, r in records.items() if r.source_kind is SourceKind.DEFAULT]
        if uncovered:
            logger.info("replicated, no rule covers them: %s", ", ".join(uncovered))
        return records


def decide(
    plan: ShardPlan,
    name: str,
    module: nn.Module,
    model_plan: Mapping[str, Decision] | None = None,
    inferred: Mapping[str, Decision] | None = None,
) -> Decision:
    """The decision for layer ``name``, by the precedence in this module's docstring."""
    entry = plan.match(name)
    if entry is not None:
        return Decision(plan.entries[entry], SourceKind.PLAN_ENTRY, f"plan entry {entry!r}")
    rule = styles.for_class(module) if plan.class_rules else None
    if rule is not None:
        return Decision(LayerPlan(rule[0].name), SourceKind.CLASS_RULE, f"class rule {rule[1]}")
    if model_plan and (pattern := first_match(model_plan, name)) is not None:
        chosen = model_plan[pattern]
        found = inferred.get(name) if inferred else None
        if chosen.layer.gather_output and found is not None and _shards_without_gathering(found):
            return Decision(found.layer, found.kind, f"{found.reason}; {chosen.reason} would gather the output "
                                                     "(an all-gather per call)")
        return chosen
    if inferred and name in inferred:
        return inferred[name]
    return NO_RULE


def _shards_without_gathering(decision: Decision) -> bool:
    return styles.get(decision.layer.style).shards is not None and not decision.layer.gather_output


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
    ``make_mesh(kv=)``); else the only axis larger than 1 that is not a data
    axis (``dp``, ``fsdp``); else one named ``tp``, ``model`` or ``x``.
    """
    mesh_shape = check_mesh_shape(mesh_shape)
    names = list(mesh_shape)
    if tp_axis is not None:
        missing = [a for a in axis_names(tp_axis) if a not in mesh_shape]
        if missing:
            raise PlanError(f"mesh axis {missing[0]!r} does not exist; the mesh has axes {names}")
        return tp_axis
    conventional = [a for a in ("tp", "model", "x") if a in mesh_shape]
    if "kv" in mesh_shape and conventional:
        return ("kv", conventional[0])
    large = [a for a in names if mesh_shape[a] > 1 and a not in DATA_AXES]
    if len(large) == 1:
        return large[0]
    if conventional:
        return conventional[0]
    if not large:
        return names[0]
    raise PlanError(
        f"cannot tell the tensor-parallel axis of mesh {dict(mesh_shape)}; pass tp_axis= with one of {names}"
    )


def check_mesh_shape(mesh_shape: Mapping[str, int]) -> dict[str, int]:
    """``mesh_shape`` as ``{axis name: size}``, or a ``PlanError`` saying what is wrong with it."""
    example = "e.g. mesh_shape={'tp': 4}, or fx_shard.xla.mesh_shape_of(mesh) for a mesh"
    if not isinstance(mesh_shape, Mapping):
        raise PlanError(f"mesh_shape={mesh_shape!r} is not a mapping of mesh axis name to size; pass one, {example}")
    if not mesh_shape:
        raise PlanError(f"mesh_shape={{}} has no axes; give each mesh axis its number of devices, {example}")
    for name, size in mesh_shape.items():
        if not isinstance(name, str):
            raise PlanError(f"mesh_shape key {name!r} is not an axis name; name the axes with strings, {example}")
        if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
            raise PlanError(
                f"mesh axis {name!r} has size {size!r}; each axis needs a whole number of devices, at least 1 "
                f"(an axis of 1 replicates), {example}"
            )
    return {name: int(size) for name, size in mesh_shape.items()}


def _record(name: str, module: nn.Module, decision: Decision, ways: int, axis: Axis) -> ShardingRecord:
    layer = decision.layer
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise PlanError(f"{name} ({type(module).__name__}) has no 2-D weight; it cannot take style {layer.style!r}")
    style = styles.get(layer.style)
    if decision.kind is SourceKind.PLAN_ENTRY and layer.output_sizes is None and layer.num_heads is None:
        unsized = style.unsized(name, module)
        if unsized is not None:
            raise PlanError(f"{unsized} ({decision.reason})")
    own = own_forward(module) if style.fused else None
    if own is not None:
        raise PlanError(
            f"{name} ({type(module).__name__}): style {layer.style!r} rewrites the layer as one linear per part, and "
            f"{own}.forward is its own, which the rewrite would drop; use 'colwise' (the layer sharded as it is) or 'replicate'"
        )
    sizes = style.check(name, module, layer, ways, axis)
    return ShardingRecord(
        layer.style, style.param_specs(module, axis), decision.reason, sizes,
        output_spec=() if layer.gather_output else None, source_kind=decision.kind,
    )


def _follow_tied(records: dict[str, ShardingRecord], modules: Mapping[str, nn.Module], ways: int, axis: Axis) -> None:
    """A layer no rule covers takes the sharding of a decided layer it shares its weight with (tied weights).

    T5's ``shared`` embedding is the tensor of ``encoder.embed_tokens``, which is planned vocabulary-parallel:
    replicating one and sharding the other cannot both hold. The style taken is the first that applies to the
    layer and gives the weight the same spec (``vocab`` for an embedding tied to an ``lm_head``).
    """
    decided: dict[int, tuple[str, Spec | None]] = {}
    for name, record in records.items():
        weight = getattr(modules[name], "weight", None)
        if record.source_kind is not SourceKind.DEFAULT and weight is not None:
            decided.setdefault(id(weight), (name, record.specs.get("weight")))
    for name, record in records.items():
        module = modules[name]
        other = decided.get(id(getattr(module, "weight", None)))
        if record.source_kind is not SourceKind.DEFAULT or other is None or other[1] is None:
            continue
        for style in styles.registered():
            if not style.fused and style.shards and style.param_specs(module, axis).get("weight") == other[1]:
                try:
                    records[name] = _record(name, module, Decision(LayerPlan(style.name), SourceKind.INFERRED,
                                                                   f"tied to {other[0]}, its weight"), ways, axis)
                except PlanError:
                    continue
                break


_GLOB = re.compile(r"[*?[]")


def _unmatched_message(unused: list[str], names: list[str]) -> str:
    """The entries that matched nothing, each with close layer names (close globs for a glob), and the layers."""
    lines = [f"plan entries match no linear-like layer: {', '.join(repr(p) for p in unused)}"]
    for pattern in unused:
        is_glob = _GLOB.search(pattern) and not pattern.startswith("re:")
        close = difflib.get_close_matches(pattern, _glob_candidates(names) if is_glob else names, n=3)
        if close:
            lines.append(f"  {pattern!r}: did you mean {', '.join(close)}?")
    lines.append(f"  the layers are: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    return "\n".join(lines)


def _glob_candidates(names: list[str]) -> list[str]:
    """Globs that match layers, to suggest for a glob that matches none: ``*.`` and each ending of a name
    after its last block index (``*.q_proj``, ``*.self_attn.q_proj``), and the name with its block indices
    as ``*`` (``model.layers.*.self_attn.q_proj``). Compared with whole names, a glob is close to none."""
    found: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        last_index = max((i for i, part in enumerate(parts) if part.isdigit()), default=0)
        found.update(dict.fromkeys("*." + ".".join(parts[i:]) for i in range(last_index + 1, len(parts))))
        found[".".join("*" if part.isdigit() else part for part in parts)] = None
    return list(found)
