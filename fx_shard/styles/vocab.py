"""vocab: an embedding table split by vocabulary rows."""

from torch import nn

from fx_shard.styles.base import Style


class Vocab(Style):
    """Each device looks up only its own rows; one all-reduce per lookup sums the pieces."""

    name = "vocab"
    for_embeddings = True
    for_linears = False
    collectives_per_call = {"all-reduce": 1}
    vllm_classes = ("VocabParallelEmbedding",)
    hf_styles = {"embedding_rowwise": {}}

    def not_for_linears(self, where: str, module: nn.Module) -> str:
        return f"style 'vocab' applies to embeddings, not to {where} ({type(module).__name__}); use 'lm_head' or 'colwise'"
