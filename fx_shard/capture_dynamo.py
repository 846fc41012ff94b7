"""Capture from dynamo: the graph ``torch.compile`` hands a backend, made plannable like a torch.fx capture.

dynamo inlines every ``nn.Module``: a linear is a ``torch._C._nn.linear``
call whose weight is a graph input, its node tagged with ``nn_module_stack``.
``DynamoCapture`` folds each linear-like layer's call back into a
``call_module`` node (``InlinedLayersToModules``) and gives the passes the
ranks and feature sizes dynamo recorded; ``traced_root`` finds the model
being compiled from dynamo's frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fx_shard.errors import CaptureError, FxShardError
from fx_shard.passes import InlinedLayersToModules

__all__ = ["DynamoCapture", "traced_root"]


class DynamoCapture:
    """The capture strategy for a graph dynamo captured of ``root`` with ``example_inputs``.

    Calling it on the graph folds the layers in place and returns the layers
    left inlined (their call had another shape), with the reason.
    """

    def __init__(self, root: nn.Module, example_inputs: Sequence) -> None:
        self.root = root
        self.example_inputs = example_inputs

    def __call__(self, gm: fx.GraphModule) -> Mapping[str, str]:
        fold = InlinedLayersToModules(self.root, self.example_inputs)
        fold(gm)
        _fill_tensor_meta(gm)
        return dict(fold.left_inlined)


def traced_root(gm: fx.GraphModule) -> nn.Module:
    """The model dynamo is compiling: the module the graph's parameter inputs hang off.

    Read from the placeholders' sources (``L['self']._modules['layers']...``)
    and looked up in the frame dynamo is translating, so only call it from a
    backend, while dynamo compiles.
    """
    from torch._dynamo import source as sources
    from torch._dynamo.symbolic_convert import InstructionTranslator

    roots = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        base = None
        while isinstance(source, sources.ChainedSource):
            if isinstance(source, sources.NNModuleSource):
                base = source.base
            source = source.base
        if base is not None:
            roots[base.name()] = base
    if not roots:
        raise CaptureError("the compiled graph reads no module parameters; compile an nn.Module or a function calling one")
    if len(roots) > 1:
        raise CaptureError(
            f"the compiled graph reads parameters of {len(roots)} modules ({', '.join(sorted(roots))}); "
            "compile one model at a time"
        )
    tx = InstructionTranslator.current_tx()
    if tx is None:
        raise FxShardError("the model is found from the frame dynamo compiles: use this backend through torch.compile")
    frame = tx.output.root_tx
    return _resolve(next(iter(roots.values())), frame.f_locals, frame.f_globals)


def _resolve(source, f_locals: Mapping, f_globals: Mapping):
    from torch._dynamo import source as sources

    if isinstance(source, sources.LocalSource):
        return f_locals[source.local_name]
    if isinstance(source, sources.GlobalSource):
        return f_globals[source.global_name]
    if isinstance(source, sources.AttrSource):
        return getattr(_resolve(source.base, f_locals, f_globals), source.member)
    if isinstance(source, (sources.GetItemSource, sources.DictGetItemSource)) and not getattr(source, "index_is_slice", False):
        return _resolve(source.base, f_locals, f_globals)[source.index]
    if isinstance(source, sources.NNModuleSource):
        return _resolve(source.base, f_locals, f_globals)
    raise CaptureError(f"cannot find the compiled model from {source.name()}; compile the model itself")


def _fill_tensor_meta(gm: fx.GraphModule) -> None:
    """``tensor_meta`` (ranks, feature sizes) for the passes, from dynamo's ``example_value``."""
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if "tensor_meta" not in node.meta and isinstance(value, torch.Tensor):
            node.meta["tensor_meta"] = _extract_tensor_metadata(value)
