"""Capture a model as a torch.fx graph whose linear-like layers stay leaves.

A leaf is a ``call_module`` node the passes can plan and rewrite: ``nn.Linear``,
``nn.Embedding``, and every layer the class-name rules know (vLLM's parallel
layers, ours, and their subclasses).
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from fx_shard.errors import CaptureError
from fx_shard.layers import class_style, is_transposed_linear

__all__ = ["LinearLeafTracer", "capture", "is_linear_like", "linear_like_modules", "propagate_shapes"]


def is_linear_like(module: nn.Module) -> bool:
    """Whether fx_shard plans this module as one layer."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or class_style(module) is not None or is_transposed_linear(module)


class LinearLeafTracer(fx.Tracer):
    """``symbolic_trace``'s tracer, with every linear-like layer kept as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_linear_like(m) or super().is_leaf_module(m, module_qualified_name)


def capture(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule sharing its submodules.

    Its ``state_dict`` has the model's own keys, in the model's order.
    """
    tracer = LinearLeafTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}. "
            "Shard a sub-module that traces, or remove data-dependent control flow from forward."
        ) from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _match_original_layout(model, gm)
    return gm


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Fill ``node.meta["tensor_meta"]`` by running ``gm`` on fake copies of ``example_inputs``.

    Nothing is computed or allocated (fake tensors), so meta models work. The
    passes use shapes only for what does not depend on the example's batch or
    sequence length: ranks and feature sizes.
    """
    device = next((t.device for t in gm.parameters()), torch.device("cpu"))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = pytree.tree_map_only(torch.Tensor, lambda t: mode.from_tensor(t.to(device)), example_inputs)
    try:
        ShapeProp(gm, fake_mode=mode).propagate(*fake)
    except Exception as e:
        raise CaptureError(f"example_inputs do not run through {type(gm).__name__}: {e}") from e


def linear_like_modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """The linear-like layers called in ``gm``, by module path, in graph order."""
    return {
        node.target: gm.get_submodule(node.target)
        for node in gm.graph.nodes
        if node.op == "call_module" and is_linear_like(gm.get_submodule(node.target))
    }


def _match_original_layout(model: nn.Module, gm: fx.GraphModule) -> None:
    """Give ``gm`` the model's ``state_dict`` layout: key order and buffer persistence.

    GraphModule installs submodules in the order the graph reaches them and
    registers every buffer it reads as persistent.
    """
    for path, copied in gm.named_modules():
        original = model.get_submodule(path)
        if copied is original:
            continue  # a leaf shared with the model: already its own layout
        for table in ("_modules", "_parameters", "_buffers"):
            mine, theirs = getattr(copied, table), getattr(original, table)
            order = {name: i for i, name in enumerate(theirs)}
            setattr(copied, table, dict(sorted(mine.items(), key=lambda item: order.get(item[0], len(order)))))
        copied._non_persistent_buffers_set |= original._non_persistent_buffers_set & set(copied._buffers)
