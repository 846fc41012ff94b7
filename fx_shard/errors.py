"""fx_shard's exceptions: one small hierarchy, each message naming what to do."""

__all__ = ["CaptureError", "FxShardError", "PlanError"]


class FxShardError(RuntimeError):
    """Base class of every error fx_shard raises on purpose."""


class PlanError(FxShardError, ValueError):
    """A plan, mesh or layer that cannot be sharded as asked."""


class CaptureError(FxShardError):
    """A model that torch.fx could not capture."""
