"""fx_shard: tensor parallelism for PyTorch models on XLA devices, as a torch.fx pass.

Importing fx_shard imports neither torch nor torch_xla: each public name
below is loaded from its module when first used (``fx_shard.shard``,
``from fx_shard import report``), so ``fx-shard --help`` starts at once.
``make_mesh``, ``xla_device`` and ``shard`` start the XLA runtime.
"""

import importlib as _importlib
import sys as _sys
import types as _types
import typing as _typing

# Each public name -> the module that defines it (imported on first use).
_EXPORTS: dict[str, str] = {
    "shard": "fx_shard.api",
    "shard_model": "fx_shard.api",
    "transform": "fx_shard.api",
    "backend": "fx_shard.backend",
    "CheckResult": "fx_shard.check",
    "check": "fx_shard.check",
    "load_sharded": "fx_shard.checkpoint",
    "Collectives": "fx_shard.collectives",
    "collectives": "fx_shard.collectives",
    "CaptureError": "fx_shard.errors",
    "FxShardError": "fx_shard.errors",
    "PlanError": "fx_shard.errors",
    "generate": "fx_shard.generate",
    "Pipeline": "fx_shard.pipeline",
    "ShardPlan": "fx_shard.plan",
    "report": "fx_shard.report",
    "SHARDING_KEY": "fx_shard.sharding",
    "ModelSharding": "fx_shard.sharding",
    "ShardingRecord": "fx_shard.sharding",
    "STYLES": "fx_shard.styles",
    "LayerPlan": "fx_shard.styles",
    "Style": "fx_shard.styles",
    "init_runtime": "fx_shard.xla",
    "make_mesh": "fx_shard.xla",
    "shard_batch": "fx_shard.xla",
    "xla_device": "fx_shard.xla",
}

__all__ = [
    "STYLES",
    "SHARDING_KEY",
    "CaptureError",
    "CheckResult",
    "Collectives",
    "backend",
    "check",
    "FxShardError",
    "LayerPlan",
    "ModelSharding",
    "Pipeline",
    "PlanError",
    "ShardPlan",
    "ShardingRecord",
    "Style",
    "collectives",
    "generate",
    "init_runtime",
    "load_sharded",
    "make_mesh",
    "report",
    "shard",
    "shard_batch",
    "shard_model",
    "transform",
    "xla_device",
]


def __getattr__(name: str) -> object:
    """A public name, imported from its module on first use (PEP 562) and kept."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*(n for n in globals() if not n.startswith("_") or n.startswith("__")), *__all__})


class _Package(_types.ModuleType):
    """fx_shard's module type: a submodule never hides the public name it shares.

    ``report``, ``collectives``, ``check``, ``backend`` and ``generate`` are both functions
    here and submodules; importing a submodule sets the package's attribute of
    that name to the module, which would hide the function. Skipping that
    assignment keeps ``fx_shard.report`` the function, as an eager
    ``from fx_shard.report import report`` made it; the submodule stays in
    ``sys.modules``, where every import finds it.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in _EXPORTS and isinstance(value, _types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

if _typing.TYPE_CHECKING:  # what type checkers and IDEs see
    from fx_shard.api import shard, shard_model, transform
    from fx_shard.backend import backend
    from fx_shard.check import CheckResult, check
    from fx_shard.checkpoint import load_sharded
    from fx_shard.collectives import Collectives, collectives
    from fx_shard.errors import CaptureError, FxShardError, PlanError
    from fx_shard.generate import generate
    from fx_shard.pipeline import Pipeline
    from fx_shard.plan import ShardPlan
    from fx_shard.report import report
    from fx_shard.sharding import SHARDING_KEY, ModelSharding, ShardingRecord
    from fx_shard.styles import STYLES, LayerPlan, Style
    from fx_shard.xla import init_runtime, make_mesh, shard_batch, xla_device
