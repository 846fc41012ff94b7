"""The self-check: a sharded (or transformed) model against the original, on example inputs.

``check(sharded, original, example_inputs)`` runs both models (no gradients,
in ``eval()``, each where its parameters are), compares every tensor of
their outputs, and when they differ runs both again with a forward hook on
every module, to name the first one (in the original's call order) whose
output differs: a rewrite or a record that broke the function shows at the
first layer after it. The sharded model keeps the original's module paths
for the layers it calls, so the two are matched by path.

``fx_shard.shard`` runs it whenever it is given example inputs and the model
has real parameters (docs/usage.md, "Self-check"); the result is kept on the
sharded model (``meta[CHECK_KEY]``), where ``fx_shard.report`` finds it.

>>> result = fx_shard.check(gm, model, (tokens,))
>>> print(result)   # self-check: agrees with the original model on the example inputs (error 2.1e-07, tolerance 1e-05)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fx_shard import xla
from fx_shard.capture import modes_kept
from fx_shard.errors import FxShardError
from fx_shard.sharding import Layout, transformed

__all__ = ["CHECK_KEY", "DEFAULT_TOLERANCE", "CheckResult", "check", "tolerance_for"]

#: Where a model fx_shard made keeps its last self-check (``model.meta[CHECK_KEY]``).
CHECK_KEY = "fx_shard_check"

#: float32 (and float64) agreement asked of a sharded model: max |difference| over max |reference|.
#: Measured on the built-in models at 4 devices: 2e-7 to 7e-7.
DEFAULT_TOLERANCE = 1e-5

#: Lower precisions: the same models reach 1.6e-3 in float16 and 1.3e-2 in bfloat16 against the CPU
#: (as much as the unsharded model on XLA does); a broken sharding errs by 1e-1 and more.
_LOW_PRECISION = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class CheckResult:
    """What ``check`` found.

    ``error``: the largest max |difference| / max |reference| over the
    outputs' tensors (the absolute difference for an all-zero reference;
    ``inf`` when the outputs cannot be compared). ``first_divergence``: the
    path of the first module whose output differs beyond ``tolerance``, or
    None; ``detail`` says what was found (empty when the models agree).
    """

    error: float
    tolerance: float
    first_divergence: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Whether the sharded model computes the original's function, within ``tolerance`` (NaN is not)."""
        return self.error <= self.tolerance

    def __str__(self) -> str:
        verdict = "agrees with" if self.ok else "DISAGREES with"
        line = (f"self-check: {verdict} the original model on the example inputs "
                f"(error {self.error:.1e}, tolerance {self.tolerance:g})")
        return f"{line}\n{self.detail}" if self.detail else line


def check(
    sharded: nn.Module,
    original: nn.Module,
    example_inputs: tuple = (),
    example_kwargs: Mapping | None = None,
    *,
    tolerance: float | None = None,
) -> CheckResult:
    """Run ``sharded`` and ``original`` on the example inputs and compare their outputs.

    Both run without gradients and in ``eval()`` (each module's mode is put
    back after), each on the device of its parameters (the inputs are moved
    there). Outputs are compared tensor by tensor (tuples, dicts, Hugging
    Face ``ModelOutput``: every tensor leaf). ``tolerance`` defaults to
    ``tolerance_for(original)``: 1e-5 in float32. When the outputs differ by
    more, both models run again with forward hooks to find the first module
    that diverges. The result is kept on ``sharded.meta`` when fx_shard
    made it, for ``fx_shard.report``.
    """
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    for name, model in (("sharded", sharded), ("original", original)):
        if _device_of(model).type == "meta":
            raise FxShardError(
                f"the {name} model ({type(model).__name__}) is on the meta device and cannot run: check a model "
                "with real parameters (load its weights first), or skip the self-check (shard(..., check=False))"
            )
    with torch.no_grad(), _evaluating(sharded), _evaluating(original):
        expected = _on_host(_call(original, args, kwargs))
        limit = tolerance_for(original, expected) if tolerance is None else tolerance
        try:
            error, where = _difference(_on_host(_call(sharded, args, kwargs)), expected)
        except _Mismatch as e:
            result = CheckResult(math.inf, limit, None, f"the outputs cannot be compared: {e}")
        else:
            if error <= limit:
                result = CheckResult(error, limit)
            else:
                first, detail = _first_divergence(sharded, original, args, kwargs, limit)
                result = CheckResult(error, limit, first, f"{where}; {detail}" if where else detail)
    if transformed(sharded) is not None:
        sharded.meta[CHECK_KEY] = result
    return result


def tolerance_for(original: nn.Module, output: object = None) -> float:
    """The default tolerance: by the least precise floating dtype of ``original``'s parameters and ``output``."""
    tensors = [*original.parameters(), *(t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor))]
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    return max((_LOW_PRECISION.get(d, DEFAULT_TOLERANCE) for d in dtypes), default=DEFAULT_TOLERANCE)


# -- running ----------------------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters (or buffers) are; the CPU for a model with neither."""
    return next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in ``eval()``, each module's own mode put back after."""
    with modes_kept(model):
        model.eval()
        yield


def _call(model: nn.Module, args: tuple, kwargs: dict) -> object:
    """``model``'s output on the inputs, moved to its device."""
    device = _device_of(model)
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), (args, kwargs))
    return model(*args, **kwargs)


def _on_host(tree: object) -> object:
    """``tree`` with every tensor on the CPU; XLA tensors computed first in one program."""
    lazy = [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.device.type == "xla"]
    if lazy:
        xla.sync(lazy)
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().cpu(), tree)


# -- comparing --------------------------------------------------------------------------------------


class _Mismatch(Exception):
    """Two outputs of different structure, or tensors of different shapes: no difference to measure."""


def _difference(actual: object, expected: object) -> tuple[float, str]:
    """The largest relative error over the two outputs' tensors, and which tensor ("" for a lone tensor)."""
    found, spec = pytree.tree_flatten_with_path(actual)
    wanted, wanted_spec = pytree.tree_flatten_with_path(expected)
    if spec != wanted_spec:
        raise _Mismatch(f"the sharded model returns {spec}, the original {wanted_spec}")
    worst, where = 0.0, ""
    for (path, a), (_, b) in zip(found, wanted):
        if not isinstance(b, torch.Tensor):
            continue
        name = f"output{pytree.keystr(path)}"
        if not isinstance(a, torch.Tensor) or a.shape != b.shape:
            shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise _Mismatch(f"{name} is {shape} in the sharded model, {tuple(b.shape)} in the original")
        error = _relative_error(a, b)
        if not error <= worst:  # NaN counts as the worst
            worst, where = error, name
    return worst, (f"the largest difference is in {where}" if len(wanted) > 1 else "")


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (finite values); the absolute difference when ``expected`` is all zero.

    Equal values (infinities included) and NaN in both at one place differ by nothing.
    """
    if expected.numel() == 0:
        return 0.0
    a, b = actual.double(), expected.double()
    same = (a == b) | (a.isnan() & b.isnan())
    difference = torch.where(same, 0.0, (a - b).abs()).max().item()
    scale = b.abs().masked_fill(~b.isfinite(), 0.0).max().item()
    return difference / scale if scale > 0 else difference


# -- finding the first module that diverges -----------------------------------------------------------


def _first_divergence(
    sharded: nn.Module, original: nn.Module, args: tuple, kwargs: dict, tolerance: float,
) -> tuple[str | None, str]:
    """The first module whose output differs beyond ``tolerance``, in the original's call order, and in words."""
    expected = _module_outputs(original, args, kwargs, None)
    actual = _module_outputs(sharded, args, kwargs, {path for path, _ in expected} - _reordered(sharded))
    last, compared = None, 0
    for key, output in expected.items():
        if key not in actual:
            continue
        try:
            error, _ = _difference(actual[key], output)
        except _Mismatch:  # a module the rewrite changed the interface of: not comparable
            continue
        compared += 1
        if error <= tolerance:
            last = (key, error)
            continue
        before = (f"the last agreeing module before it: {_name(last[0])} (error {last[1]:.1e})" if last
                  else "no module before it was compared")
        return key[0], f"first diverging module: {_name(key)} (error {error:.1e}); {before}"
    if last is None:
        return None, "no module of the original is called in the sharded model to compare: no divergence to locate"
    return None, (f"all {compared} module outputs compared agree (the last: {_name(last[0])}); the difference "
                  "arises in code outside any module, between or after them")


def _module_outputs(model: nn.Module, args: tuple, kwargs: dict, paths: set[str] | None) -> dict[tuple[str, int], object]:
    """Each module's output (at ``paths``; every module but the root if None), by (path, call), in call order."""
    outputs: dict[tuple[str, int], object] = {}
    calls: dict[str, int] = {}

    def record(path: str, output: object) -> None:
        calls[path] = calls.get(path, -1) + 1
        outputs[(path, calls[path])] = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), output)

    handles = [
        module.register_forward_hook(lambda _m, _args, output, path=path: record(path, output))
        for path, module in model.named_modules()
        if path and (paths is None or path in paths)
    ]
    try:
        _call(model, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return _on_host(outputs)


def _reordered(sharded: nn.Module) -> set[str]:
    """Layers whose own output the sharding reorders by design (fused layers kept one matmul, rows interleaved)."""
    summary = transformed(sharded)
    if summary is None:
        return set()
    return {path for path, record in summary.layers.items() if record.layout is Layout.INTERLEAVED}


def _name(key: tuple[str, int]) -> str:
    path, call = key
    return path if call == 0 else f"{path} (call {call + 1})"
