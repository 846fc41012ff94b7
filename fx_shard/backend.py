"""fx_shard as a ``torch.compile`` backend: the passes on the graph dynamo captures, then openxla.

``torch.compile(model, backend=fx_shard.backend(mesh, plan="auto"))`` shards a
model that ``torch.fx.symbolic_trace`` cannot capture whole (Hugging Face
transformers 5.x) with the graph rewrites ``fx_shard.shard`` applies:

1. ``DynamoCapture`` (``fx_shard.capture_dynamo``) folds the nodes of each
   linear-like layer's call that dynamo inlined back into one
   ``call_module`` node on that layer, installed in the GraphModule under
   its path in the model;
2. the ``Pipeline`` that ``fx_shard.transform`` runs plans and rewrites
   that graph (``Pipeline.transform_captured``); the einsum attention
   reaches aot_autograd as ``fx_shard::einsum`` custom ops, which it keeps whole;
3. each recorded parameter is sharded (``xs.mark_sharding``) and the graph
   goes to torch_xla's ``openxla`` backend.

Steps 1 and 2 are ``transform_captured``: graph surgery only, no XLA.

The model and its inputs must be on the XLA device before the first call.
Dynamo traces the model before it calls any backend, and ``torch.compile``
gives a backend no hook before that (it wraps the backend in its own
``_TorchCompileWrapper``): a model left on the CPU with inputs on XLA (or the
reverse) fails in dynamo's tracing, ``Unhandled FakeTensor Device Propagation
... found two different devices cpu, xla:0``. With model and inputs both on
the CPU the backend is reached and refuses them (``FxShardError``, inside
dynamo's ``BackendCompilerFailed``).
The layers' own parameters are sharded in place (same Parameter objects,
new device layout). A fused layer split by the plan (``qkv``,
``merged_colwise``) gets sharded copies of its parts, held by the compiled
graph, while the model keeps its fused weight as it was (replicated, unused
by the compiled program): the parts are not the model's parameters, so this
path is for inference; train with ``fx_shard.shard``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import fx, nn

from fx_shard import xla
from fx_shard.axes import Axis
from fx_shard.capture_dynamo import DynamoCapture, traced_root
from fx_shard.constraint import ShardingConstraint
from fx_shard.errors import FxShardError
from fx_shard.passes.utils import set_submodule
from fx_shard.pipeline import Pipeline
from fx_shard.plan import ShardPlan
from fx_shard.split_linear import SplitLinear

__all__ = ["ShardingBackend", "backend", "transform_captured"]

logger = logging.getLogger(__name__)


def backend(mesh, plan: ShardPlan | Mapping | str | None = "auto", *, tp_axis: Axis | None = None) -> ShardingBackend:
    """A ``torch.compile`` backend that shards each graph dynamo captures for ``mesh``, then runs openxla.

    >>> model = model.to(fx_shard.xla_device())
    >>> compiled = torch.compile(model, backend=fx_shard.backend(mesh, plan="auto"))
    >>> logits = compiled(ids.to(fx_shard.xla_device()))

    ``plan`` is what ``fx_shard.shard`` takes; module names are paths in the
    compiled model. The backend keeps each rewritten graph (``.graphs``,
    one per graph dynamo captured), with its ``ModelSharding`` in
    ``gm.meta["sharding"]`` and a record on each layer's node. Fused layers
    are split (``fused="split"``): keeping them fused would reorder the rows
    of the model's own weights, which the compiled graph shares with the
    model, and the model's own forward would then compute something else.
    """
    return ShardingBackend(mesh, plan, tp_axis=tp_axis)


class ShardingBackend:
    """The callable ``torch.compile`` gets: ``(GraphModule, example inputs) -> compiled function``."""

    def __init__(self, mesh, plan: ShardPlan | Mapping | str | None = "auto", *, tp_axis: Axis | None = None) -> None:
        self.mesh = mesh
        self.plan = ShardPlan.coerce(plan)
        self.pipeline = Pipeline(xla.mesh_shape_of(mesh), tp_axis)
        self.graphs: list[fx.GraphModule] = []
        # Split parts by fused layer, so that a recompilation (new shapes) reuses their device copies.
        self._splits: dict[int, SplitLinear] = {}

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence) -> Callable:
        from torch._dynamo.backends.registry import lookup_backend

        _check_on_xla(example_inputs)
        root = traced_root(gm)
        self.pipeline.transform_captured(gm, root, self.plan, DynamoCapture(root, example_inputs))
        self._materialize(gm, root)
        self.graphs.append(gm)
        logger.debug("fx_shard backend graph:\n%s", gm.code)
        # The installed layers' parameters are the GraphModule's own now, which aot_autograd lifts as
        # inputs; its check of dynamo's bookkeeping (every lifted parameter has a source) would reject them.
        compiled = fx.GraphModule(gm, gm.graph, type(gm).__name__)
        compiled.meta = {k: v for k, v in gm.meta.items() if k != "dynamo_compile_id"}
        return lookup_backend("openxla")(compiled, example_inputs)

    def _materialize(self, gm: fx.GraphModule, root: nn.Module) -> None:
        """Give split parts device data of their own, shard every recorded parameter in place, pin outputs."""
        fresh = []
        for path, module in list(gm.named_modules()):
            if not isinstance(module, SplitLinear):
                continue
            fused = id(root.get_submodule(path))
            if fused in self._splits:
                set_submodule(gm, path, self._splits[fused])
                continue
            for part in module.children():
                for name, param in list(part.named_parameters(recurse=False)):
                    copied = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                    setattr(part, name, copied)
                    fresh.append(copied)
            self._splits[fused] = module
        if fresh:  # views of the fused weight until computed; mark_sharding wants device data
            xla.sync(fresh)
        for param, spec, owner in xla.param_specs(gm).values():
            xla.mark(param, self.mesh, spec)
            logger.debug("%s: %s", owner, spec)
        _constraints_as_xla_ops(gm, self.mesh)


def _constraints_as_xla_ops(gm: fx.GraphModule, mesh) -> None:
    """Each ``ShardingConstraint`` call as torch_xla's ``aot_mark_sharding`` op, which aot_autograd can trace.

    The module calls ``xs.mark_sharding``, which needs a real XLA tensor and
    fails on the fake tensors aot_autograd traces with.
    """
    op = xla.aot_mark_sharding()
    graph = gm.graph
    for node in list(graph.find_nodes(op="call_module")):
        module = gm.get_submodule(node.target)
        if not isinstance(module, ShardingConstraint):
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None:
            raise FxShardError(f"{node.target}: the rank of the constrained output is unknown; cannot pin its sharding")
        spec = (None,) * (len(meta.shape) - len(module.spec)) + module.spec
        view, spec = xla.mesh_for(mesh, spec)
        with graph.inserting_before(node):
            marked = graph.call_function(op, (node.args[0], str(view), str(spec)))
        marked.meta.update(node.meta)
        node.replace_all_uses_with(marked)
        graph.erase_node(node)
        gm.delete_submodule(node.target)
    gm.recompile()


def transform_captured(
    gm: fx.GraphModule,
    example_inputs: Sequence,
    plan: ShardPlan | Mapping | str | None = "auto",
    *,
    mesh_shape: Mapping[str, int],
    tp_axis: Axis | None = None,
    root: nn.Module | None = None,
) -> fx.GraphModule:
    """``fx_shard.transform`` for a graph dynamo captured, in place; no XLA needed.

    Call it from a ``torch.compile`` backend with the graph and example
    inputs dynamo hands over; ``root`` (the model being compiled) is found
    from the frame dynamo translates when not given. Every plan entry must
    name a linear-like layer of ``root``; a graph (one of several, with graph
    breaks) may hold only some of them.
    """
    root = traced_root(gm) if root is None else root
    return Pipeline(mesh_shape, tp_axis).transform_captured(gm, root, plan, DynamoCapture(root, example_inputs))


def _check_on_xla(example_inputs: Sequence) -> None:
    elsewhere = {str(t.device) for t in example_inputs if isinstance(t, torch.Tensor) and t.device.type != "xla"}
    if elsewhere:
        raise FxShardError(
            f"fx_shard.backend compiles for the XLA device, but the graph's inputs (the model's parameters and the "
            f"call's tensors) are on {', '.join(sorted(elsewhere))}; move the model and its inputs to "
            "fx_shard.xla_device() before calling the compiled model (model.to(fx_shard.xla_device()))"
        )
