"""Capture a model as a torch.fx graph whose linear-like layers stay leaves.

A leaf is a ``call_module`` node the passes can plan and rewrite: ``nn.Linear``,
``nn.Embedding``, and every layer the class-name rules know (vLLM's parallel
layers, ours, and their subclasses).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from fx_shard.errors import CaptureError
from fx_shard.layers import class_style, is_transposed_linear

logger = logging.getLogger(__name__)

__all__ = [
    "Captured",
    "LinearLeafTracer",
    "capture",
    "capture_parts",
    "is_linear_like",
    "linear_like_modules",
    "propagate_shapes",
    "record_part_inputs",
]


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


@dataclass
class Captured:
    """A model as far as torch.fx could capture it.

    ``root`` is the GraphModule when the model traced whole; otherwise the
    model itself (a copy the caller owns) with every largest sub-tree that
    traces swapped in as a GraphModule (``parts``, by module path, ``""`` for
    the whole model). ``opaque`` names each module whose own forward did not
    trace, and why; their linear-like layers are planned as modules.
    """

    root: nn.Module
    parts: dict[str, fx.GraphModule]
    opaque: dict[str, str]


def capture_parts(model: nn.Module) -> Captured:
    """``capture`` the model whole if it traces, else part by part (``model`` is changed in place then)."""
    try:
        gm = capture(model)
    except CaptureError:
        pass
    else:
        return Captured(gm, {"": gm}, {})
    parts: dict[str, fx.GraphModule] = {}
    opaque: dict[str, str] = {}

    def visit(path: str, module: nn.Module) -> None:
        if is_linear_like(module):
            return
        try:
            parts[path] = capture(module)
            return
        except CaptureError as e:
            if type(module).forward is not nn.Module.forward:  # containers without a forward are never called
                opaque[path] = f"{type(e.__cause__).__name__}: {e.__cause__}"
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    for path, gm in parts.items():
        owner, _, field = path.rpartition(".")
        setattr(model.get_submodule(owner), field, gm)
    return Captured(model, parts, opaque)


def record_part_inputs(captured: Captured, args: tuple, kwargs: dict) -> dict[str, tuple]:
    """Each traced part's positional inputs in one run of the model on ``args`` / ``kwargs``.

    Runs for real (no gradients) on a model with real parameters; on a meta
    model it runs on fake tensors, which fails for models that branch on
    values (then no shapes are recorded and shape-dependent rewrites are skipped).
    """
    recorded: dict[str, tuple] = {}
    hooks = []
    for path, gm in captured.parts.items():
        names = [n.target for n in gm.graph.find_nodes(op="placeholder")]

        def hook(module, hook_args, hook_kwargs, path=path, names=names):
            values = list(hook_args) + [hook_kwargs[n] for n in names[len(hook_args):] if n in hook_kwargs]
            recorded.setdefault(path, tuple(values))

        hooks.append(gm.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        device = next((t.device for t in captured.root.parameters()), torch.device("cpu"))
        with torch.no_grad():
            if device.type == "meta":
                mode = FakeTensorMode(allow_non_fake_inputs=True)
                args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: mode.from_tensor(t.to(device)), (args, kwargs))
                with mode:
                    captured.root(*args, **kwargs)
            else:
                captured.root(*args, **kwargs)
    except Exception as e:  # the shapes are an aid, not a requirement
        logger.info("could not run %s on the example inputs for shapes: %s", type(captured.root).__name__, e)
    finally:
        for h in hooks:
            h.remove()
    return recorded


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Fill ``node.meta["tensor_meta"]`` by running ``gm`` on fake copies of ``example_inputs``.

    Nothing is computed or allocated: a meta model runs on meta inputs as it
    is, any other on fake tensors (ShapeProp then copies the module to fake
    tensors, which costs more). The passes use shapes only for what does not
    depend on the example's batch or sequence length: ranks and feature sizes.
    """
    device = next((t.device for t in gm.parameters()), torch.device("cpu"))
    try:
        if device.type == "meta":
            ShapeProp(gm).propagate(*pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), example_inputs))
            return
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = pytree.tree_map_only(torch.Tensor, lambda t: mode.from_tensor(t.to(device)), example_inputs)
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
