"""What a sharding style is, and the registry every style joins by being defined.

A style (in the spirit of DTensor's ``ParallelStyle``) owns everything about
one way to shard a linear-like layer: which layers it applies to, the
partition spec of each parameter, how a fused output splits into parts,
the collectives one call costs, and the names other tools give it (vLLM
layer classes, Hugging Face ``_tp_plan`` styles). Nothing outside
``fx_shard.styles`` spells a style's name: plans, passes, the report and
``shard_model`` ask the style.

A new style is one subclass with a ``name``; defining it registers it::

    class Replicated2(Replicate):
        name = "replicate_for_now"
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

from torch import nn

from fx_shard.axes import Axis, Spec
from fx_shard.errors import PlanError
from fx_shard.geometry import in_features, out_features, output_dim

__all__ = ["LayerPlan", "Style", "for_class", "from_hf", "get", "names", "registered"]

_REGISTRY: dict[str, Style] = {}
_BY_CLASS: dict[str, Style] = {}  # vLLM layer class name -> style


class Style:
    """One way to shard a linear-like layer. Subclasses set the class attributes and override what differs.

    ``shards``: which features the weight is split on (``"output"`` or ``"input"``),
    or None for a replicated layer. ``parts``: for a fused layer, the number of
    parts its output splits into by default (0 for an unfused layer).
    """

    name: ClassVar[str]
    shards: ClassVar[str | None] = "output"
    parts: ClassVar[int] = 0
    #: A fused style whose output has exactly ``parts`` parts (q, k, v), not at least two.
    exact_parts: ClassVar[bool] = False
    for_embeddings: ClassVar[bool] = False
    for_linears: ClassVar[bool] = True
    may_gather_output: ClassVar[bool] = False
    #: A fused style whose sizes a plan may give as head counts (``num_heads``, ``num_kv_heads``): q, k, v.
    head_counts: ClassVar[bool] = False
    #: Collectives one call of a layer sharded this way needs (the report's prediction).
    collectives_per_call: ClassVar[Mapping[str, int]] = {}
    #: vLLM layer class names this style stands for (a subclass of one counts too).
    vllm_classes: ClassVar[tuple[str, ...]] = ()
    #: Hugging Face ``_tp_plan`` style names this style stands for, with the layer-plan options each implies.
    hf_styles: ClassVar[Mapping[str, Mapping[str, object]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _REGISTRY[cls.name] = style = cls()
            _BY_CLASS.update(dict.fromkeys(cls.__dict__.get("vllm_classes", ()), style))

    @property
    def fused(self) -> bool:
        """Whether the layer's output is several parts (q, k, v; gate, up) joined along the features."""
        return self.parts > 0

    def part_names(self, count: int) -> tuple[str, ...]:
        """Submodule names of the parts of a fused layer split in ``count`` parts."""
        return tuple(str(i) for i in range(count))

    def param_specs(self, module: nn.Module, axis: Axis) -> dict[str, Spec]:
        """The partition spec of each parameter of ``module`` sharded over ``axis`` (absent: replicated)."""
        if self.shards is None:
            return {}
        # Weight specs for a (out, in) layout, flipped for Conv1D's (in, out).
        column, row = ((axis, None), (None, axis))[:: 1 if output_dim(module) == 0 else -1]
        if self.shards == "input":
            return {"weight": row}
        specs: dict[str, Spec] = {"weight": column}
        if getattr(module, "bias", None) is not None:
            specs["bias"] = (axis,)
        return specs

    def check(self, where: str, module: nn.Module, layer: LayerPlan, ways: int, axis: Axis) -> tuple[int, ...]:
        """Check ``layer`` fits ``module`` on ``ways`` devices; the fused part sizes (``()`` unfused).

        Raises ``PlanError`` naming ``where`` and what to change.
        """
        is_embedding = _is_embedding(module)
        if is_embedding and not self.for_embeddings:
            allowed = ", ".join(s.name for s in registered() if s.for_embeddings)
            raise PlanError(
                f"style {self.name!r} does not apply to embedding {where} ({type(module).__name__}); use one of {allowed}"
            )
        if not is_embedding and not self.for_linears:
            raise PlanError(self.not_for_linears(where, module))
        if layer.gather_output and not self.may_gather_output:
            allowed = " and ".join(s.name for s in registered() if s.may_gather_output)
            raise PlanError(f"{where}: gather_output applies to styles {allowed}, not {self.name!r}")
        if layer.output_sizes is not None and not self.fused:
            fused = " and ".join(s.name for s in registered() if s.fused)
            raise PlanError(f"{where}: output_sizes applies to fused styles ({fused}), not {self.name!r}; remove it")
        if layer.num_heads is not None and not self.head_counts:
            heads = " and ".join(s.name for s in registered() if s.head_counts)
            raise PlanError(
                f"{where}: num_heads / num_kv_heads apply to style {heads}, not {self.name!r}; remove them"
                + (" (give output_sizes for this fused style)" if self.fused else "")
            )
        if self.shards == "input":
            _check_divides(where, "input features", in_features(module), ways, axis)
        elif self.shards == "output":
            sizes = self.output_sizes(where, module, layer) if self.fused else ()
            for size in sizes or (out_features(module),):
                _check_divides(where, "output features" if not sizes else f"part size (of {list(sizes)})", size, ways, axis)
            return sizes
        return ()

    def not_for_linears(self, where: str, module: nn.Module) -> str:
        """The error for a style that takes embeddings only, given a linear."""
        return f"style {self.name!r} applies to embeddings, not to {where} ({type(module).__name__})"

    def output_sizes(self, where: str, module: nn.Module, layer: LayerPlan) -> tuple[int, ...]:
        """How a fused layer's output splits: the plan's sizes, the layer's own, head counts, or equal parts."""
        features = out_features(module)
        sizes = layer.output_sizes or tuple(getattr(module, "output_sizes", ()) or ())
        if len(sizes) == 1:
            sizes = ()
        if not sizes and layer.num_heads is not None:
            kv = layer.num_kv_heads or layer.num_heads
            head_dim, rest = divmod(features, layer.num_heads + 2 * kv)
            if rest:
                raise PlanError(
                    f"{where}: {features} output features do not hold {layer.num_heads} q heads and "
                    f"{kv} k/v heads each of one head_dim; check num_heads / num_kv_heads"
                )
            sizes = (layer.num_heads * head_dim, kv * head_dim, kv * head_dim)
        if not sizes:
            if features % self.parts:
                raise PlanError(
                    f"{where}: {features} output features do not split into {self.parts} equal parts; "
                    "give output_sizes (or num_heads/num_kv_heads) in the plan entry"
                )
            sizes = (features // self.parts,) * self.parts
        if sum(sizes) != features or (self.exact_parts and len(sizes) != self.parts):
            raise PlanError(
                f"{where} ({type(module).__name__}): output_sizes {list(sizes)} do not add up to its "
                f"{features} output features{f' in {self.parts} parts' if self.exact_parts else ''}; "
                "fix output_sizes or the head counts"
            )
        return tuple(sizes)

    def unsized(self, where: str, module: nn.Module) -> str | None:
        """The error for a plan entry of this fused style on ``module`` when nothing says how its output splits.

        None when the layer carries its own ``output_sizes`` (vLLM's layers).
        Equal parts would be a guess: right for multi-head attention, wrong for
        grouped-query attention or a head-interleaved layout; the plan says which.
        """
        if not self.fused or len(tuple(getattr(module, "output_sizes", ()) or ())) > 1:
            return None
        features = out_features(module)
        equal = [features // self.parts] * self.parts if features % self.parts == 0 else None
        ways = "output_sizes or num_heads (and num_kv_heads)" if self.head_counts else "output_sizes"
        examples = []
        if self.head_counts:
            examples.append(f"{{'style': {self.name!r}, 'num_heads': H, 'num_kv_heads': KV}}")
        if equal:
            examples.append(f"{{'style': {self.name!r}, 'output_sizes': {equal}}} for {self.parts} equal parts")
        return (
            f"{where} ({type(module).__name__}, {features} output features) is planned {self.name!r}, but nothing says "
            f"how its output splits into parts: the layer has no output_sizes and the plan entry gives no {ways}; "
            f"give them in the entry, e.g. {' or '.join(examples) or f'output_sizes adding up to {features}'}"
        )

    def __repr__(self) -> str:
        return f"<style {self.name!r}>"


@dataclass(frozen=True)
class LayerPlan:
    """One plan entry's value: a style, and for fused layers how the output splits.

    For a fused style (``qkv``, ``merged_colwise``) on a layer that does not
    carry ``output_sizes`` itself, a plan entry gives ``output_sizes`` or, for
    ``qkv``, ``num_heads`` (and ``num_kv_heads`` for grouped attention);
    without them the entry is refused (equal parts would be a guess). Sizes
    from the model's own plan or from inference need no such entry.
    ``gather_output`` replicates a column-parallel output (e.g. logits) on
    every device; by default it stays sharded (gathered only on ``.cpu()``).
    """

    style: str
    output_sizes: tuple[int, ...] | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    gather_output: bool = False

    def __post_init__(self) -> None:
        """Check each field's type, so a wrong value is refused here and not misread later."""
        if not isinstance(self.style, str):
            raise PlanError(f"style {self.style!r} is not a style name; styles: {', '.join(names())}")
        sizes = self.output_sizes
        if sizes is not None:
            if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not all(_is_count(s) for s in sizes):
                raise PlanError(
                    f"output_sizes={sizes!r} is not a list of part sizes (whole numbers of output features); "
                    "give one size per part, e.g. [64, 16, 16] for q, k, v"
                )
            object.__setattr__(self, "output_sizes", tuple(int(s) for s in sizes))
        for field in ("num_heads", "num_kv_heads"):
            value = getattr(self, field)
            if value is not None and not _is_count(value):
                raise PlanError(f"{field}={value!r} is not a number of heads; give a whole number, at least 1 (e.g. 8)")
            if value is not None:
                object.__setattr__(self, field, int(value))
        if self.num_kv_heads is not None and self.num_heads is None:
            raise PlanError(f"num_kv_heads={self.num_kv_heads} needs num_heads (the number of q heads) too")
        if not isinstance(self.gather_output, bool):
            raise PlanError(
                f"gather_output={self.gather_output!r} is not True or False; give a bool (True replicates the output)"
            )

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
            try:
                layer = cls(**value)
            except PlanError as e:
                raise PlanError(f"plan entry {entry!r}: {e}") from None
        else:
            raise PlanError(f"plan entry {entry!r}: {value!r} is not a style; styles: {', '.join(names())}")
        if layer.style not in _REGISTRY:
            raise PlanError(f"plan entry {entry!r}: unknown style {layer.style!r}; styles: {', '.join(names())}")
        return layer

    def to_data(self) -> str | dict:
        """The plain-data form: the style name alone when nothing else is set."""
        data = {k: v for k, v in asdict(self).items() if v is not None and v is not False}
        return self.style if len(data) == 1 else data


def get(name: str) -> Style:
    """The registered style called ``name``."""
    style = _REGISTRY.get(name)
    if style is None:
        raise PlanError(f"unknown style {name!r}; styles: {', '.join(names())}")
    return style


def from_hf(hf_style: str) -> LayerPlan | None:
    """The layer plan a Hugging Face ``_tp_plan`` style stands for, or None when no style claims it."""
    for style in _REGISTRY.values():
        if hf_style in style.hf_styles:
            return LayerPlan(style.name, **style.hf_styles[hf_style])
    return None


def registered() -> tuple[Style, ...]:
    """Every registered style, in the order they were defined."""
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    """The names of every registered style, in the order they were defined."""
    return tuple(_REGISTRY)


def for_class(module: nn.Module) -> tuple[Style, str] | None:
    """The seed's class-name rule for ``module``: ``(style, class name)`` of the nearest class in its MRO
    that a style names in ``vllm_classes``, or None. Subclasses count (vLLM's own function compares the
    exact name and so misses them)."""
    for cls in type(module).__mro__:
        style = _BY_CLASS.get(cls.__name__)
        if style is not None:
            return style, cls.__name__
    return None


def _is_count(value: object) -> bool:
    """A whole number of at least 1 (not a bool, not a string)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _is_embedding(module: nn.Module) -> bool:
    rule = for_class(module)
    return isinstance(module, nn.Embedding) or (rule is not None and rule[0].for_embeddings and not rule[0].for_linears)


def _check_divides(where: str, what: str, size: int, n: int, axis: Axis) -> None:
    if size % n:
        divisors = [d for d in range(1, size + 1) if size % d == 0 and d <= n]
        raise PlanError(
            f"{what} ({size}) of {where} are not divisible by mesh axis {axis!r} ({n}); "
            f"use a mesh axis of {', '.join(map(str, divisors))}, or replicate this layer in the plan"
        )

