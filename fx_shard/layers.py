"""vLLM-compatible parallel layers, single-process form.

These mirror the constructor arguments, parameter names and return
conventions of vLLM's ``ColumnParallelLinear`` family and
``VocabParallelEmbedding`` (``return_bias=True`` returns ``(output, bias)``;
``skip_bias_add`` leaves the bias out of the output and hands it back
instead), with ``tp_size == 1``: the whole weight lives in one tensor and
sharding happens under XLA SPMD. fx_shard recognises these classes (and
vLLM's own, and any subclass) by class name: each style in
``fx_shard.styles`` names the vLLM classes it stands for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ColumnParallelLinear",
    "LinearBase",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "ReplicatedLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
]


class LinearBase(nn.Module):
    """``y = x W^T + b`` with vLLM's ``skip_bias_add`` / ``return_bias`` conventions."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        return_bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        dtype = params_dtype or torch.get_default_dtype()
        self.input_size = input_size
        self.output_size = output_size
        self.skip_bias_add = skip_bias_add
        self.return_bias = return_bias
        self.tp_size = 1
        self.weight = nn.Parameter(
            torch.empty(output_size, input_size, dtype=dtype, device=device), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.input_size**-0.5)
        if self.bias is not None:
            nn.init.normal_(self.bias, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        bias = None if self.skip_bias_add else self.bias
        output = F.linear(x, self.weight, bias)
        if not self.return_bias:
            return output
        return output, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.input_size}, output_features={self.output_size}, "
            f"bias={self.bias is not None}, skip_bias_add={self.skip_bias_add}, return_bias={self.return_bias}"
        )


class ReplicatedLinear(LinearBase):
    """A linear layer that every device holds whole."""


class ColumnParallelLinear(LinearBase):
    """Output features split across devices (weight rows)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        output_sizes: Sequence[int] | None = None,
        return_bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(input_size, output_size, bias, skip_bias_add, params_dtype, return_bias, device)
        self.gather_output = gather_output
        self.output_sizes = list(output_sizes) if output_sizes is not None else [output_size]


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel linears fused along the output (e.g. gate_up)."""

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = True,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        return_bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            input_size, sum(output_sizes), bias, gather_output, skip_bias_add, params_dtype,
            output_sizes, return_bias, device,
        )


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projections, laid out ``[q | k | v]`` along the output."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = True,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        return_bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        kv_heads = total_num_heads if total_num_kv_heads is None else total_num_kv_heads
        self.hidden_size = hidden_size
        self.head_size = head_size
        self.total_num_heads = self.num_heads = total_num_heads
        self.total_num_kv_heads = self.num_kv_heads = kv_heads
        sizes = [total_num_heads * head_size, kv_heads * head_size, kv_heads * head_size]
        super().__init__(
            hidden_size, sum(sizes), bias, False, skip_bias_add, params_dtype, sizes, return_bias, device
        )


class RowParallelLinear(LinearBase):
    """Input features split across devices (weight columns); the output is summed."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        reduce_results: bool = True,
        return_bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(input_size, output_size, bias, skip_bias_add, params_dtype, return_bias, device)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (the vocabulary) are split across devices.

    As in vLLM, the table is padded to a multiple of ``padding_size`` rows.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        params_dtype: torch.dtype | None = None,
        padding_size: int = 64,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        dtype = params_dtype or torch.get_default_dtype()
        self.org_vocab_size = num_embeddings
        self.num_embeddings = num_embeddings
        self.num_embeddings_padded = -(-num_embeddings // padding_size) * padding_size
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_padded, embedding_dim, dtype=dtype, device=device),
            requires_grad=False,
        )
        nn.init.normal_(self.weight, std=1.0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits, rows split like the embedding.

    vLLM's own class raises in ``forward`` (its sampler reads the weight);
    this one computes the logits, ``x W^T (+ b)``, sliced to the real vocabulary.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        padding_size: int = 64,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, params_dtype, padding_size, device)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(self.num_embeddings_padded, dtype=self.weight.dtype, device=device),
                requires_grad=False,
            )
        else:
            self.register_parameter("bias", None)
        nn.init.normal_(self.weight, std=embedding_dim**-0.5)

    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> ParallelLMHead:
        """Share the embedding's weight (one Parameter for both)."""
        self.weight = embed_tokens.weight
        return self

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states, self.weight, self.bias)
        return logits[..., : self.org_vocab_size]
