"""colwise: output features split across devices (Megatron's column-parallel half)."""

from fx_shard.styles.base import Style


class Colwise(Style):
    """Weight rows (output features) and bias sharded; the output stays sharded on its features.

    Free by itself: the sum happens in the row-parallel layer it feeds.
    """

    name = "colwise"
    may_gather_output = True
    vllm_classes = ("ColumnParallelLinear",)
    hf_styles = {
        "colwise": {},
        "local_colwise": {},
        "colwise_rep": {"gather_output": True},
        "colwise_gather_output": {"gather_output": True},
    }
