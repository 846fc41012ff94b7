"""vLLM-compatible parallel layers, single-process form.

These mirror the constructor arguments, parameter names and return
conventions of vLLM's ``ColumnParallelLinear`` family and
``VocabParallelEmbedding`` (``return_bias=True`` returns ``(output, bias)``;
``skip_bias_add`` leaves the bias out of the output and hands it back
instead), with ``tp_size == 1``: the whole weight lives in one tensor and
sharding happens under XLA SPMD. fx_shard recognises these classes (and
vLLM's own, and any subclass) by class name, see ``CLASS_STYLES``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLASS_STYLES",
    "ColumnParallelLinear",
    "LinearBase",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "ReplicatedLinear",
    "RowParallelLinear",
    "SplitLinear",
    "VocabParallelEmbedding",
    "join_parts",
    "split_parts",
    "class_style",
    "interleave_rows",
]

# The seed's rules by layer class name, as fx_shard styles. A class matches
# when it or any base class has one of these names (vLLM's own function
# compares the exact name and so misses subclasses).
CLASS_STYLES: dict[str, str] = {
    "QKVParallelLinear": "qkv",
    "MergedColumnParallelLinear": "merged_colwise",
    "ColumnParallelLinear": "colwise",
    "RowParallelLinear": "rowwise",
    "ReplicatedLinear": "replicate",
    "ParallelLMHead": "lm_head",
    "VocabParallelEmbedding": "vocab",
}


def is_transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear whose weight is stored ``(in, out)``."""
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__) and hasattr(module, "nf")


def output_dim(module: nn.Module) -> int:
    """The weight dimension that indexes output features: 0, or 1 for ``Conv1D``."""
    return 1 if is_transposed_linear(module) else 0


def out_features(module: nn.Module) -> int:
    return module.weight.shape[output_dim(module)]


def in_features(module: nn.Module) -> int:
    return module.weight.shape[1 - output_dim(module)]


def class_style(module: nn.Module) -> tuple[str, str] | None:
    """The ``(style, class name)`` of the nearest class in the MRO named in ``CLASS_STYLES``."""
    for cls in type(module).__mro__:
        style = CLASS_STYLES.get(cls.__name__)
        if style is not None:
            return style, cls.__name__
    return None


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


def join_parts(tensors: Sequence[torch.Tensor], groups: int = 1, dim: int = -1) -> torch.Tensor:
    """The fused tensor from its parts: ``[p_0 | p_1 | ...]`` along ``dim``, once per group when ``groups > 1``."""
    if groups == 1:
        return torch.cat(tensors, dim)
    dim %= tensors[0].dim()
    return torch.cat([t.unflatten(dim, (groups, -1)) for t in tensors], dim + 1).flatten(dim, dim + 1)


def split_parts(fused: torch.Tensor, sizes: Sequence[int], groups: int = 1, dim: int = -1) -> list[torch.Tensor]:
    """The inverse of ``join_parts``: each part's rows of ``fused`` (gathered from every group)."""
    if groups == 1:
        return list(torch.split(fused, list(sizes), dim))
    dim %= fused.dim()
    per_group = torch.split(fused.unflatten(dim, (groups, -1)), [s // groups for s in sizes], dim + 1)
    return [p.flatten(dim, dim + 1) for p in per_group]


class SplitLinear(nn.Module):
    """A fused linear (``[q | k | v]``, ``[gate | up]``) held as one linear per part.

    ``forward`` is the fused layer's own: it joins the parts' outputs, as
    vLLM's ``XlaQKVParallelLinear`` does. fx_shard's graph passes call the
    parts directly instead. ``state_dict`` saves the fused ``weight`` / ``bias``
    under the fused layer's keys and ``load_state_dict`` splits them again, so
    checkpoints keep their original layout. ``groups > 1``: the fused rows
    repeat ``[part_0 | part_1 | ...]`` per group (q/k/v per KV group).
    """

    def __init__(self, parts: dict[str, nn.Module], output_sizes: Sequence[int], groups: int = 1) -> None:
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)
        self.part_names = tuple(parts)
        self.output_sizes = list(output_sizes)
        self.groups = groups
        first = parts[self.part_names[0]]
        self.dim = output_dim(first)
        self.return_bias = getattr(first, "return_bias", False)
        self.skip_bias_add = getattr(first, "skip_bias_add", False)
        self._register_state_dict_hook(_save_fused)
        self._register_load_state_dict_pre_hook(_load_fused, with_module=True)
        self.register_load_state_dict_post_hook(_name_fused_keys)
        self._load_prefix = ""

    @classmethod
    def from_fused(cls, fused: nn.Module, names: Sequence[str], output_sizes: Sequence[int], groups: int = 1) -> SplitLinear:
        """Split ``fused``'s weight (output features) and bias by ``output_sizes`` (views of it when ``groups == 1``)."""
        parts: dict[str, nn.Module] = {}
        dim = output_dim(fused)
        weights = split_parts(fused.weight.detach(), output_sizes, groups, dim)
        biases = split_parts(fused.bias.detach(), output_sizes, groups, 0) if fused.bias is not None else None
        for i, (name, size) in enumerate(zip(names, output_sizes)):
            part = _empty_like_linear(fused, size)
            part.weight = nn.Parameter(weights[i], requires_grad=fused.weight.requires_grad)
            if biases is not None:
                part.bias = nn.Parameter(biases[i], requires_grad=fused.bias.requires_grad)
            parts[name] = part
        return cls(parts, output_sizes, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        results = [getattr(self, name)(x) for name in self.part_names]
        if not self.return_bias:
            return join_parts(results, self.groups)
        output = join_parts([r[0] for r in results], self.groups)
        biases = [r[1] for r in results]
        return output, (join_parts(biases, self.groups) if biases[0] is not None else None)


def _empty_like_linear(fused: nn.Module, out_features: int) -> nn.Module:
    """A linear of ``fused``'s kind and flags with ``out_features`` outputs, on meta until filled."""
    has_bias = fused.bias is not None
    if is_transposed_linear(fused):
        with torch.device("meta"):
            return type(fused)(out_features, in_features(fused))
    if isinstance(fused, LinearBase) or hasattr(fused, "return_bias"):
        return ColumnParallelLinear(
            in_features(fused), out_features, bias=has_bias, skip_bias_add=getattr(fused, "skip_bias_add", False),
            return_bias=fused.return_bias, device="meta",
        )
    return nn.Linear(in_features(fused), out_features, bias=has_bias, device="meta")


def _save_fused(module: SplitLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for field in ("weight", "bias"):
        keys = [f"{prefix}{name}.{field}" for name in module.part_names]
        if keys[0] in state_dict:
            dim = module.dim if field == "weight" else 0
            state_dict[prefix + field] = join_parts([state_dict.pop(k) for k in keys], module.groups, dim)


def _load_fused(module: SplitLinear, state_dict: dict, prefix: str, *args) -> None:
    module._load_prefix = prefix
    for field in ("weight", "bias"):
        fused = state_dict.pop(prefix + field, None)
        if fused is not None:
            dim = module.dim if field == "weight" else 0
            for name, piece in zip(module.part_names, split_parts(fused, module.output_sizes, module.groups, dim)):
                state_dict[f"{prefix}{name}.{field}"] = piece


def _name_fused_keys(module: SplitLinear, incompatible) -> None:
    """Report a missing fused tensor by its checkpoint key (``c_attn.weight``), not its parts' keys."""
    missing = incompatible.missing_keys
    for field in ("weight", "bias"):
        parts = [f"{module._load_prefix}{name}.{field}" for name in module.part_names]
        if any(p in missing for p in parts):
            missing[:] = [k for k in missing if k not in parts] + [module._load_prefix + field]


def interleave_rows(module: nn.Module, sizes: Sequence[int], ways: int) -> None:
    """Reorder a fused layer's output features to ``[P0_0 P1_0 ... | P0_1 P1_1 ... | ...]`` in place.

    Sharded ``ways`` ways on the output features, device ``d`` then holds its
    share of every part (q, k and v of its heads) in one matmul. ``state_dict``
    saves and loads the original order.
    """
    dim = output_dim(module)
    module.weight = nn.Parameter(_interleave(module.weight.detach(), sizes, ways, dim), module.weight.requires_grad)
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(_interleave(module.bias.detach(), sizes, ways, 0), module.bias.requires_grad)
    module.interleaved = (tuple(sizes), ways)
    module._register_state_dict_hook(_save_interleaved)
    module._register_load_state_dict_pre_hook(_load_interleaved, with_module=True)


def _interleave(fused: torch.Tensor, sizes: Sequence[int], ways: int, dim: int) -> torch.Tensor:
    """``[P0 | P1 | ...]`` along ``dim`` reordered to ``[P0_0 P1_0 ... | P0_1 P1_1 ... | ...]``."""
    return join_parts(split_parts(fused, sizes, 1, dim), ways, dim)


def _save_interleaved(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    sizes, ways = module.interleaved
    for field, dim in (("weight", output_dim(module)), ("bias", 0)):
        if state_dict.get(prefix + field) is not None:
            state_dict[prefix + field] = torch.cat(split_parts(state_dict[prefix + field], sizes, ways, dim), dim)


def _load_interleaved(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    sizes, ways = module.interleaved
    for field, dim in (("weight", output_dim(module)), ("bias", 0)):
        if state_dict.get(prefix + field) is not None:
            state_dict[prefix + field] = _interleave(state_dict[prefix + field], sizes, ways, dim)
