"""fx_shard: tensor parallelism for PyTorch models on XLA devices, as a torch.fx pass.

Importing fx_shard does not start the XLA runtime; ``make_mesh``,
``xla_device`` and ``shard`` do.
"""

from fx_shard.api import shard, shard_model, transform
from fx_shard.backend import backend
from fx_shard.checkpoint import load_sharded
from fx_shard.collectives import Collectives, collectives
from fx_shard.errors import CaptureError, FxShardError, PlanError
from fx_shard.pipeline import Pipeline
from fx_shard.plan import ShardPlan
from fx_shard.report import report
from fx_shard.sharding import SHARDING_KEY, ModelSharding, ShardingRecord
from fx_shard.styles import STYLES, LayerPlan, Style
from fx_shard.xla import init_runtime, make_mesh, xla_device

__all__ = [
    "STYLES",
    "SHARDING_KEY",
    "CaptureError",
    "Collectives",
    "backend",
    "FxShardError",
    "LayerPlan",
    "ModelSharding",
    "Pipeline",
    "PlanError",
    "ShardPlan",
    "ShardingRecord",
    "Style",
    "collectives",
    "init_runtime",
    "load_sharded",
    "make_mesh",
    "report",
    "shard",
    "shard_model",
    "transform",
    "xla_device",
]
