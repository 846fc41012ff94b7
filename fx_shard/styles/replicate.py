"""replicate: the layer stays whole on every device."""

from fx_shard.styles.base import Style


class Replicate(Style):
    """No parameter sharded, no collective; what every layer no rule covers gets."""

    name = "replicate"
    shards = None
    for_embeddings = True
    vllm_classes = ("ReplicatedLinear",)
    hf_styles = {"replicate": {}, "gather": {}, "local": {}, "sequence_parallel": {}, "replicated_with_grad_allreduce": {}}
