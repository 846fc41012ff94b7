"""fx_shard as a ``torch.compile`` backend: the passes on the graph dynamo captures, then openxla.

``torch.compile(model, backend=fx_shard.backend(mesh, plan="auto"))`` shards a
model that ``torch.fx.symbolic_trace`` cannot capture whole (Hugging Face
transformers 5.x) with the graph rewrites ``fx_shard.shard`` applies:

1. dynamo inlines every ``nn.Module``: a linear is a ``torch._C._nn.linear``
   call whose weight is a graph input, its node tagged with
   ``nn_module_stack``. ``InlinedLayersToModules`` folds the nodes of each
   linear-like layer's call back into one ``call_module`` node on that
   layer, installed in the GraphModule under its path in the model;
2. ``fx_shard.transform``'s plan and passes run on that graph unchanged
   (``ShardPlan.resolve`` with the model's Hugging Face plan and
   ``infer_plan`` for ``"auto"``, then ``AnnotateSharding`` ...
   ``InsertShardingConstraints``); the einsum attention reaches
   aot_autograd as ``fx_shard::einsum`` custom ops, which it keeps whole;
3. each recorded parameter is sharded (``xs.mark_sharding``) and the graph
   goes to torch_xla's ``openxla`` backend.

Steps 1 and 2 are ``transform_captured``: graph surgery only, no XLA.

The model and its inputs must be on the XLA device before the first call.
The layers' own parameters are sharded in place (same Parameter objects,
new device layout). A fused layer split by the plan (``qkv``,
``merged_colwise``) gets sharded copies of its parts, held by the compiled
graph, while the model keeps its fused weight as it was (replicated, unused
by the compiled program): the parts are not the model's parameters, so this
path is for inference; train with ``fx_shard.shard``.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fx_shard.api import pass_names, run_passes
from fx_shard.capture import is_linear_like, linear_like_modules
from fx_shard.errors import CaptureError, FxShardError
from fx_shard.hf import hf_plan
from fx_shard.infer import infer_plan
from fx_shard.layers import SplitLinear
from fx_shard.passes.utils import result, set_submodule
from fx_shard.plan import ShardPlan, resolve_tp_axis
from fx_shard.sharding import SHARDING_KEY, Axis, ModelSharding, axis_size
from fx_shard.xla import _torch_xla, mark, mesh_for, mesh_shape_of, param_specs

__all__ = [
    "InlinedLayersToModules",
    "ShardingBackend",
    "backend",
    "traced_root",
    "transform_captured",
]

logger = logging.getLogger(__name__)


def backend(mesh, plan: ShardPlan | Mapping | str | None = "auto", *, tp_axis: Axis | None = None) -> ShardingBackend:
    """A ``torch.compile`` backend that shards each graph dynamo captures for ``mesh``, then runs openxla.

    >>> model = model.to(fx_shard.xla_device())
    >>> compiled = torch.compile(model, backend=fx_shard.backend(mesh, plan="auto"))
    >>> logits = compiled(ids.to(fx_shard.xla_device()))

    ``plan`` is what ``fx_shard.shard`` takes; module names are paths in the
    compiled model. The backend keeps each rewritten graph (``.graphs``,
    one per graph dynamo captured), with its ``ModelSharding`` in
    ``gm.meta["sharding"]`` and a record on each layer's node.
    """
    return ShardingBackend(mesh, plan, tp_axis=tp_axis)


class ShardingBackend:
    """The callable ``torch.compile`` gets: ``(GraphModule, example inputs) -> compiled function``."""

    def __init__(self, mesh, plan: ShardPlan | Mapping | str | None = "auto", *, tp_axis: Axis | None = None) -> None:
        self.mesh = mesh
        self.mesh_shape = mesh_shape_of(mesh)
        self.plan = ShardPlan.coerce(plan)
        self.tp_axis = resolve_tp_axis(self.mesh_shape, tp_axis)
        self.graphs: list[fx.GraphModule] = []
        # Split parts by fused layer, so that a recompilation (new shapes) reuses their device copies.
        self._splits: dict[int, SplitLinear] = {}

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence) -> Callable:
        from torch._dynamo.backends.registry import lookup_backend

        _check_on_xla(example_inputs)
        root = traced_root(gm)
        transform_captured(gm, example_inputs, self.plan, mesh_shape=self.mesh_shape, tp_axis=self.tp_axis, root=root)
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
        torch_xla = _torch_xla()
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
            torch_xla._XLAC._xla_sync_multi(fresh, [], True, True)
        for param, spec, owner in param_specs(gm).values():
            mark(param, self.mesh, spec)
            logger.debug("%s: %s", owner, spec)
        _constraints_as_xla_ops(gm, self.mesh)


def _constraints_as_xla_ops(gm: fx.GraphModule, mesh) -> None:
    """Each ``ShardingConstraint`` call as torch_xla's ``aot_mark_sharding`` op, which aot_autograd can trace.

    The module calls ``xs.mark_sharding``, which needs a real XLA tensor and
    fails on the fake tensors aot_autograd traces with.
    """
    from fx_shard.constraint import ShardingConstraint

    _torch_xla()  # registers torch.ops.xla
    graph = gm.graph
    for node in list(graph.find_nodes(op="call_module")):
        module = gm.get_submodule(node.target)
        if not isinstance(module, ShardingConstraint):
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None:
            raise FxShardError(f"{node.target}: the rank of the constrained output is unknown; cannot pin its sharding")
        spec = (None,) * (len(meta.shape) - len(module.spec)) + module.spec
        view, spec = mesh_for(mesh, spec)
        with graph.inserting_before(node):
            marked = graph.call_function(torch.ops.xla.aot_mark_sharding.default, (node.args[0], str(view), str(spec)))
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
    axis = resolve_tp_axis(mesh_shape, tp_axis)
    shard_plan = ShardPlan.coerce(plan)
    every_layer = {path: m for path, m in root.named_modules() if is_linear_like(m)}
    shard_plan.resolve(every_layer, mesh_shape, axis)  # raises PlanError for entries matching no layer
    fold = InlinedLayersToModules(root, example_inputs)
    fold(gm)
    _fill_tensor_meta(gm)
    layers = linear_like_modules(gm)
    entries = {p: ShardPlan({p: layer}) for p, layer in shard_plan.entries.items()}
    here = ShardPlan(
        {p: shard_plan.entries[p] for p, single in entries.items() if any(single.match(name) for name in layers)},
        class_rules=shard_plan.class_rules, auto=shard_plan.auto,
    )
    model_plan = hf_plan(root) if here.auto else {}
    inferred = infer_plan(gm, axis_size(mesh_shape, axis)) if here.auto else {}
    records = here.resolve(layers, mesh_shape, axis, inferred, model_plan)
    diff = run_passes(gm, records, mesh_shape)
    gm.meta[SHARDING_KEY] = ModelSharding(
        dict(mesh_shape), axis, pass_names(), opaque=dict(fold.left_inlined), diff=tuple(diff)
    )
    logger.info("fx_shard: %d layers planned in a captured graph, %d left inlined", len(records), len(fold.left_inlined))
    return gm


class InlinedLayersToModules(PassBase):
    """Fold each call of a linear-like layer that dynamo inlined back into one ``call_module`` node.

    The layer of a node is the outermost linear-like module
    (``capture.is_linear_like``) in its ``nn_module_stack``. The nodes one
    call of a layer produced (dynamo keys each stack entry ``str(id(module))``,
    with ``@n`` for the n-th repeated call) become ``call_module(path)(x)``
    (``[0]`` of it for layers returning ``(output, bias)``) when they read one
    value from outside besides the layer's own parameters and give one value
    out; the layer is installed in the GraphModule at its path in ``root``.
    The parameter inputs are left unused. A call of another shape stays
    inlined (its layer unplanned), listed in ``left_inlined`` with the reason.

    Reads: ``nn_module_stack``; ``example_inputs`` to tell the layer's own
    parameter inputs. Writes: graph nodes, submodules of the GraphModule.
    """

    def __init__(self, root: nn.Module, example_inputs: Sequence) -> None:
        super().__init__()
        self.root = root
        self.example_inputs = example_inputs
        self.left_inlined: dict[str, str] = {}

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        modules = {str(id(m)): (path, m) for path, m in self.root.named_modules(remove_duplicate=False)}
        values = dict(zip(graph.find_nodes(op="placeholder"), self.example_inputs))
        calls: dict[str, list[fx.Node]] = {}
        for node in graph.nodes:
            if node.op not in ("call_function", "call_method"):
                continue
            for key in node.meta.get("nn_module_stack") or {}:
                found = modules.get(key.split("@")[0])
                if found is not None and is_linear_like(found[1]):
                    calls.setdefault(key, []).append(node)
                    break
        modified = False
        for key, nodes in calls.items():
            path, module = modules[key.split("@")[0]]
            for component in _components(nodes):
                modified |= self._fold(graph_module, path, module, component, values)
        return result(graph_module, modified)

    def _fold(
        self, gm: fx.GraphModule, path: str, module: nn.Module, nodes: list[fx.Node], values: Mapping[fx.Node, object]
    ) -> bool:
        inside = set(nodes)
        own = {id(t) for t in (*module.parameters(), *module.buffers())}
        read = {
            n for node in nodes for n in node.all_input_nodes
            if n not in inside and not (n.op == "placeholder" and id(values.get(n)) in own)
        }
        given = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(read) != 1 or len(given) != 1:
            why = f"its call reads {len(read)} values besides its parameters and gives {len(given)}; expected 1 and 1"
            self.left_inlined[path] = why
            logger.info("%s left inlined: %s", path, why)
            return False
        (x,), (out,) = read, given
        installed = _submodule_or_none(gm, path)
        if installed is None:
            gm.add_submodule(path, module)
        elif installed is not module:
            raise CaptureError(
                f"cannot install layer {path} in the compiled graph: the graph already has {path!r} "
                f"({type(installed).__name__}); rename that module"
            )
        graph = gm.graph
        with graph.inserting_before(out):
            call = graph.call_module(path, (x,))
            call.meta.update(out.meta)
            value = call
            if getattr(module, "return_bias", False):
                call.meta.pop("example_value", None)
                value = graph.call_function(operator.getitem, (call, 0))
                value.meta.update(out.meta)
        out.replace_all_uses_with(value)
        for node in reversed(nodes):
            graph.erase_node(node)
        return True


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


def _components(nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """``nodes`` grouped by connection through each other, each group in graph order."""
    index = {n: i for i, n in enumerate(nodes)}
    parent = list(range(len(nodes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for node in nodes:
        for n in node.all_input_nodes:
            if n in index:
                parent[find(index[n])] = find(index[node])
    groups: dict[int, list[fx.Node]] = {}
    for node in nodes:
        groups.setdefault(find(index[node]), []).append(node)
    return list(groups.values())


def _submodule_or_none(gm: fx.GraphModule, path: str) -> object | None:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


def _fill_tensor_meta(gm: fx.GraphModule) -> None:
    """``tensor_meta`` (ranks, feature sizes) for the passes, from dynamo's ``example_value``."""
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if "tensor_meta" not in node.meta and isinstance(value, torch.Tensor):
            node.meta["tensor_meta"] = _extract_tensor_metadata(value)


def _check_on_xla(example_inputs: Sequence) -> None:
    elsewhere = {str(t.device) for t in example_inputs if isinstance(t, torch.Tensor) and t.device.type != "xla"}
    if elsewhere:
        raise FxShardError(
            f"fx_shard.backend compiles for the XLA device, but the graph's inputs are on {', '.join(sorted(elsewhere))}; "
            "move the model and its inputs to fx_shard.xla_device() before calling the compiled model"
        )
