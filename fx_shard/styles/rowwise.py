"""rowwise: input features split across devices (Megatron's row-parallel half)."""

from fx_shard.styles.base import Style


class Rowwise(Style):
    """Weight columns (input features) sharded, bias replicated; each device holds a partial sum of the output.

    One all-reduce per call makes the output whole.
    """

    name = "rowwise"
    shards = "input"
    collectives_per_call = {"all-reduce": 1}
    vllm_classes = ("RowParallelLinear",)
    hf_styles = {"rowwise": {}, "local_rowwise": {}, "rowwise_rep": {}, "rowwise_split_input": {}, "packed_rowwise": {}}
