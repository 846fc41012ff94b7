"""lm_head: the output projection to vocabulary logits, split by vocabulary rows."""

from fx_shard.styles.base import Style


class LMHead(Style):
    """Like ``colwise``; the logits stay vocabulary-sharded until read (``gather_output`` replicates them)."""

    name = "lm_head"
    may_gather_output = True
    vllm_classes = ("ParallelLMHead",)
