"""fx_shard's graph passes, one concern per file (installed as ``fx_shard.passes``)."""

from fx_shard.passes.annotate_sharding import AnnotateSharding
from fx_shard.passes.attention_to_einsum import AttentionToEinsum
from fx_shard.passes.fit_heads_to_mesh import FitHeadsToMesh
from fx_shard.passes.fuse_sibling_linears import FuseSiblingLinears
from fx_shard.passes.inlined_layers_to_modules import InlinedLayersToModules
from fx_shard.passes.insert_sharding_constraints import InsertShardingConstraints
from fx_shard.passes.interleave_fused_linear import InterleaveFusedLinear
from fx_shard.passes.keep_grouped_fused import KeepGroupedFused
from fx_shard.passes.rewire_fused_consumers import RewireFusedConsumers
from fx_shard.passes.split_fused_linear import SplitFusedLinear

__all__ = [
    "AnnotateSharding",
    "AttentionToEinsum",
    "FitHeadsToMesh",
    "FuseSiblingLinears",
    "InlinedLayersToModules",
    "InsertShardingConstraints",
    "InterleaveFusedLinear",
    "KeepGroupedFused",
    "RewireFusedConsumers",
    "SplitFusedLinear",
]
