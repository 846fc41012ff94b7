"""qkv: a fused q/k/v projection, each part column-parallel on its own."""

from fx_shard.styles.base import Style


class QKV(Style):
    """``[q | k | v]`` along the output features; sharded part by part so every device holds its heads of each.

    Sizes come from the plan (``output_sizes`` or head counts), the layer's
    own ``output_sizes``, or, for the model's own plan or inference, three equal parts.
    """

    name = "qkv"
    parts = 3
    exact_parts = True
    head_counts = True
    vllm_classes = ("QKVParallelLinear",)

    def part_names(self, count: int) -> tuple[str, ...]:
        return ("q", "k", "v")
