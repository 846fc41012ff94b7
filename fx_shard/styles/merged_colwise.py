"""merged_colwise: several column-parallel linears fused along the output (gate_up)."""

from fx_shard.styles.base import Style


class MergedColwise(Style):
    """``[p_0 | p_1 | ...]`` along the output features, each part column-parallel; parts named 0, 1, ..."""

    name = "merged_colwise"
    parts = 2
    vllm_classes = ("MergedColumnParallelLinear",)
    hf_styles = {"packed_colwise": {}}
