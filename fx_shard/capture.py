"""Capture a model as a torch.fx graph whose linear-like layers stay leaves.

A leaf is a ``call_module`` node the passes can plan and rewrite: ``nn.Linear``,
``nn.Embedding``, and every layer the class-name rules know (vLLM's parallel
layers, ours, and their subclasses).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils import _pytree as pytree

from fx_shard import styles
from fx_shard.capture_nn import IN_PROJ, packed_projections_to_modules, restore_packed_keys, traceable_form
from fx_shard.errors import CaptureError
from fx_shard.geometry import is_transposed_linear
from fx_shard.patterns import SDPA

logger = logging.getLogger(__name__)

KEPT_WHOLE_KEY = "fx_shard_kept_whole"  # GraphModule.meta: torch.nn layers the graph calls whole although they have a traceable form


__all__ = [
    "Captured",
    "LinearLeafTracer",
    "capture",
    "capture_parts",
    "generate_code",
    "is_linear_like",
    "linear_like_modules",
    "modes_kept",
    "own_forward",
    "propagate_shapes",
    "record_part_inputs",
]


def is_linear_like(module: nn.Module) -> bool:
    """Whether fx_shard plans this module as one layer."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or styles.for_class(module) is not None or is_transposed_linear(module)


def own_forward(module: nn.Module) -> str | None:
    """The class that overrides the forward of linear-like ``module``'s base, or None when its forward is known.

    Known: nn.Linear's, nn.Embedding's, Conv1D's and the styles' vLLM classes, which compute ``x @ W.T (+ b)``
    or a lookup from their first argument. A rewrite that replaces a layer (a fused layer split into parts) or
    calls it with one value is exact only for those: OPT's learned positions subclass nn.Embedding with
    ``forward(attention_mask, ..., position_ids)``.
    """
    if styles.for_class(module) is not None or is_transposed_linear(module):
        return None
    for cls in type(module).__mro__:
        if cls in (nn.Linear, nn.Embedding):
            return None
        if "forward" in vars(cls):
            return cls.__name__
    return None


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Whatever the block does to ``model``'s train/eval modes, each module's own mode is put back after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class LinearLeafTracer(fx.Tracer):
    """``symbolic_trace``'s tracer, with every linear-like layer kept as a leaf.

    A parameter read in ``forward`` (a norm's weight) is found by identity in
    a table made once, where ``fx.Tracer`` searches all of the model's
    parameters at each read (quadratic in the model's size).
    """

    def __init__(self) -> None:
        super().__init__()
        self._inlined: set[nn.Module] = set()
        self.kept_whole: dict[str, str] = {}  # torch.nn layers left leaves although they have a traceable form, and why

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if m in self._inlined:
            return False
        return is_linear_like(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args: tuple, kwargs: dict):
        """A torch.nn layer with a traceable form (``capture_nn``) is inlined as that form; else as torch.fx does."""
        path = self.path_of_module(m)
        form, why = traceable_form(m, args, kwargs)
        if why is not None:
            self.kept_whole[path] = why
        if form is None:
            return super().call_module(m, forward, args, kwargs)
        self._inlined.add(m)
        try:
            return super().call_module(m, functools.partial(form, lambda: self.create_proxy("get_attr", f"{path}.training", (), {})), args, kwargs)
        finally:
            self._inlined.discard(m)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        if isinstance(attr_val, nn.Parameter) and not self.param_shapes_constant:
            if getattr(self, "_parameter_names", None) is None or self._parameter_names[0] is not self.root:
                names: dict[int, str] = {}
                for name, param in self.root.named_parameters():
                    names.setdefault(id(param), name)
                self._parameter_names = (self.root, names)
            name = self._parameter_names[1].get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def capture(model: nn.Module, concrete_args: Mapping[str, object] | None = None) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule sharing its submodules.

    Its ``state_dict`` has the model's own keys, in the model's order; it
    computes the model's function in ``train()`` and in ``eval()`` (a forward
    whose code depends on ``self.training`` is refused). ``concrete_args``
    specializes non-tensor arguments (``None``, flags); the graph asserts them
    at each call. It is torch.fx's lazy kind: ``recompile`` marks the code
    stale and the code is regenerated once, when next needed.
    """
    graph, kept_whole = _trace(model, concrete_args)
    if _reads_training(model):
        with modes_kept(model):
            model.train(not model.training)
            other, _ = _trace(model, concrete_args)
        if not _same_computation(graph, other, model):
            raise CaptureError(
                f"{type(model).__name__}'s forward computes something else in train() and in eval() "
                "(its code reads self.training); it keeps its own code"
            )
    _linear_calls_to_modules(graph, model)
    gm = _graph_module(model, graph)
    gm.meta[KEPT_WHOLE_KEY] = {path: f"a torch.nn layer kept as written: {why}" for path, why in kept_whole.items()}
    return gm


def _graph_module(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """The GraphModule of ``graph`` over ``model``'s submodules, with the model's state_dict layout."""
    packed = packed_projections_to_modules(graph, model)
    for path, layer in packed.items():  # installed while the GraphModule copies its submodules
        model.get_submodule(path).add_module(IN_PROJ, layer)
    try:
        # Lazy: its Python code is generated when first needed (a call, ``.code``), not here; the
        # pipeline rewrites the graph first, and generating code for 80 layers costs a quarter second.
        gm = _LazyGraphModule(model, graph, type(model).__name__)
        _match_original_layout(model, gm)
    finally:
        for path in packed:
            del model.get_submodule(path)._modules[IN_PROJ]
    for path in packed:
        restore_packed_keys(gm.get_submodule(path))
    return gm


def _trace(model: nn.Module, concrete_args: Mapping[str, object] | None) -> tuple[fx.Graph, dict[str, str]]:
    """The graph, and the torch.nn layers left leaves although they have a traceable form (path: why)."""
    tracer = LinearLeafTracer()
    try:
        graph = tracer.trace(model, concrete_args=dict(concrete_args) if concrete_args else None)
    except Exception as e:
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}. "
            "Shard a sub-module that traces, or remove data-dependent control flow from forward."
        ) from e
    # torch.fx names a specialized argument's placeholder ``name_1``; a parent passing it by keyword needs ``name``.
    for node in graph.find_nodes(op="placeholder"):
        name = node.target.rpartition("_")[0]
        if concrete_args and name in concrete_args and not isinstance(concrete_args[name], tuple):
            node.target = name
    return graph, tracer.kept_whole


def _linear_calls_to_modules(graph: fx.Graph, model: nn.Module) -> None:
    """``F.linear(x, self.layer.weight, b)`` on a bias-free ``nn.Linear`` becomes ``self.layer(x) + b``.

    timm's BEiT and EVA call their qkv layer's weight with a bias joined from separate q and v biases; as a
    ``call_module`` node the layer is planned like any other. Exact up to float rounding of the bias add.
    """
    for node in list(graph.find_nodes(op="call_function", target=F.linear)):
        given = {**dict(zip(("input", "weight", "bias"), node.args)), **node.kwargs}
        x, weight, bias = given.get("input"), given.get("weight"), given.get("bias")
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight")):
            continue
        path = weight.target[: -len(".weight")]
        layer = model.get_submodule(path)
        if type(layer) is not nn.Linear or layer.bias is not None:
            continue
        with graph.inserting_before(node):
            value = graph.call_module(path, (x,))
            if bias is not None:
                value = graph.call_function(torch.add, (value, bias))
        node.replace_all_uses_with(value)
        graph.erase_node(node)
        if not weight.users:
            graph.erase_node(weight)


def _same_computation(graph: fx.Graph, other: fx.Graph, model: nn.Module) -> bool:
    """Whether two traces of ``model`` compute the same: the same code, tensor constants equal in value.

    The tracer stores each tensor constant on ``model`` under the next free ``_tensor_constant<i>``, so a
    second trace names the same constant differently (timm BEiT's relative position index).
    """
    def constants(g: fx.Graph) -> list[str]:
        return [n.target for n in g.nodes if n.op == "get_attr" and n.target.startswith("_tensor_constant")]

    def code(g: fx.Graph, names: list[str]) -> str:
        src = g.python_code("self").src
        for i, name in enumerate(names):  # longest first cannot be needed: each name ends at a word boundary
            src = re.sub(rf"\b{name}\b", f"_fx_shard_constant{i}", src)
        return src

    ours, theirs = constants(graph), constants(other)
    return (
        len(ours) == len(theirs)
        and code(graph, ours) == code(other, theirs)
        and all(torch.equal(getattr(model, a), getattr(model, b)) for a, b in zip(ours, theirs))
    )


def _reads_training(model: nn.Module) -> bool:
    """Whether a forward the tracer inlines mentions ``training`` (so its code may differ by mode)."""
    tracer = LinearLeafTracer()
    classes = {type(model)} | {
        type(m) for path, m in model.named_modules() if path and not tracer.is_leaf_module(m, path)
    }
    return any(_forward_mentions_training(cls) for cls in classes)


@functools.cache
def _forward_mentions_training(cls: type) -> bool:
    try:
        return "training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):  # no source: assume it may
        return True


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


def capture_parts(model: nn.Module, args: tuple | None = None, kwargs: Mapping | None = None) -> Captured:
    """``capture`` the model whole if it traces, else part by part (``model`` is changed in place then).

    A part is a module holding linear-like layers, traced as its parent calls
    it: with example inputs (``args`` / ``kwargs``), the model runs once first
    and each module's non-tensor arguments (``None``, flags) are specialized
    in its graph (a module called with different ones keeps its own code).
    Modules of ``torch.nn`` stay as they are (their parents read their
    attributes), and so do modules with no linear-like layer inside.
    """
    try:
        gm = capture(model)
    except CaptureError:
        pass
    else:
        return Captured(gm, {"": gm}, dict(gm.meta[KEPT_WHOLE_KEY]))
    calls = _call_arguments(model, tuple(args or ()), dict(kwargs or {})) if args is not None or kwargs else None
    parts: dict[str, fx.GraphModule] = {}
    opaque: dict[str, str] = {}

    def visit(path: str, module: nn.Module) -> None:
        if is_linear_like(module) or not any(is_linear_like(m) for m in module.modules()):
            return
        seen = (calls or {}).get(path)
        why = _why_not_a_part(module, seen)
        if why is None:
            try:
                parts[path] = capture(module, seen[0] if seen else None)
                return
            except CaptureError as e:
                why = f"{type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ is not None else str(e)
        if type(module).forward is not nn.Module.forward:  # containers without a forward are never called
            opaque[path] = why
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    for path, gm in parts.items():
        opaque.update({f"{path}.{inner}": why for inner, why in gm.meta[KEPT_WHOLE_KEY].items()})
    for path, gm in parts.items():
        owner, _, field = path.rpartition(".")
        setattr(model.get_submodule(owner), field, gm)
    return Captured(model, parts, opaque)


def _why_not_a_part(module: nn.Module, calls: list[dict] | None) -> str | None:
    """Why ``module`` is not traced as a part, or None when it can be (``calls``: its calls on the example inputs)."""
    if type(module).__module__.startswith("torch.nn.") and not isinstance(module, nn.Sequential):
        return "a torch.nn module: kept whole, as its parent reads its attributes"
    if not calls:  # no example inputs, or not called on them: traced with every argument a graph input
        return None
    if any(isinstance(v, _Untraceable) for v in calls[0].values()):
        bad = next(k for k, v in calls[0].items() if isinstance(v, _Untraceable))
        return f"its argument {bad!r} is a {calls[0][bad].kind}, which a torch.fx graph cannot take"
    if any(c != calls[0] for c in calls[1:]):
        return "called with different non-tensor arguments on the example inputs"
    return None


@dataclass(frozen=True)
class _Untraceable:
    """A call argument neither a tensor (a graph input) nor a constant a graph can specialize on."""

    kind: str


_CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _call_arguments(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, list[dict[str, object]]] | None:
    """Per module path, the non-tensor arguments of each of its calls in one run on the example inputs.

    Tensors (and tuples of them) are left out: they stay graph inputs. None
    when the example inputs do not run through the model here (a model on
    the meta device that branches on values): nothing is specialized then.
    """
    calls: dict[str, list[dict[str, object]]] = {}
    hooks = []
    for path, module in model.named_modules():
        if is_linear_like(module):
            continue
        try:
            signature = inspect.signature(module.forward)
        except (TypeError, ValueError):
            continue

        def hook(module, hook_args, hook_kwargs, path=path, signature=signature):
            try:
                bound = signature.bind(*hook_args, **hook_kwargs)
            except TypeError:
                return
            bound.apply_defaults()
            arguments = {}
            for name, value in bound.arguments.items():
                kind = signature.parameters[name].kind
                if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                    if value:
                        arguments[name] = _Untraceable(f"variable argument list ({kind.description})")
                elif not _holds_tensors(value):
                    arguments[name] = _constant_or_none(value)
            calls.setdefault(path, []).append(arguments)

        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        _run(model, args, kwargs)
    except Exception as e:
        logger.info("could not run %s on the example inputs to see its modules' arguments: %s", type(model).__name__, e)
        return None
    finally:
        for h in hooks:
            h.remove()
    return calls


def _holds_tensors(value) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value)) and not isinstance(value, dict)


def _constant_or_none(value):
    if isinstance(value, _CONSTANTS) or (isinstance(value, tuple) and all(isinstance(v, _CONSTANTS) for v in value)):
        return value
    return _Untraceable(type(value).__name__)


def _run(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """``model(*args, **kwargs)`` without gradients; on fake tensors for a model on the meta device."""
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        if device.type == "meta":
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: mode.from_tensor(t.to(device)), (args, kwargs))
            with mode:
                model(*args, **kwargs)
        else:
            model(*args, **kwargs)


def generate_code(root: nn.Module) -> None:
    """Generate the Python code of every lazy GraphModule in ``root`` now.

    A graph about to run on a device, or to be compiled, needs it: dynamo
    tracing a graph whose code is still to be generated recompiles over and over.
    """
    for module in root.modules():
        _LazyGraphModule.force_recompile(module)


def record_part_inputs(captured: Captured, args: tuple, kwargs: dict) -> dict[str, tuple]:
    """Each traced part's positional inputs in one run of the model on ``args`` / ``kwargs``.

    Runs for real (no gradients) on a model with real parameters; on a meta
    model it runs on fake tensors, which fails for models that branch on
    values (then no shapes are recorded and shape-dependent rewrites are skipped).
    """
    recorded: dict[str, tuple] = {}
    hooks = []
    for path, gm in captured.parts.items():
        placeholders = gm.graph.find_nodes(op="placeholder")

        def hook(module, hook_args, hook_kwargs, path=path, placeholders=placeholders):
            values = list(hook_args)
            for node in placeholders[len(hook_args):]:  # by name, else the default (a missing one would shift the rest)
                if node.target not in hook_kwargs and not node.args:
                    break
                values.append(hook_kwargs[node.target] if node.target in hook_kwargs else node.args[0])
            recorded.setdefault(path, tuple(values))

        hooks.append(gm.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        _run(captured.root, args, kwargs)
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
    tensors = [t for t in pytree.tree_leaves(example_inputs) if isinstance(t, torch.Tensor)]
    device = next((t.device for t in [*gm.parameters(), *tensors]), torch.device("cpu"))
    try:
        if device.type == "meta":
            _MetaShapes(gm).run(*pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), example_inputs))
            return
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = pytree.tree_map_only(torch.Tensor, lambda t: mode.from_tensor(t.to(device)), example_inputs)
        ShapeProp(gm, fake_mode=mode).propagate(*fake)
    except Exception as e:
        raise CaptureError(f"example_inputs do not run through {type(gm).__name__}: {e}") from e


class _MetaShapes(fx.Interpreter):
    """``ShapeProp`` for a model on the meta device, at a fraction of its cost.

    On meta tensors an op's output shapes are a function of its inputs'
    shapes, dtypes and strides and its other arguments, so a torch op is run
    once per distinct such key and later calls (the same op in every one of
    80 identical blocks) get empty tensors of the remembered layout.
    Attention's output shape is computed from its operands (``(..., L, Ev)``)
    rather than by running the meta kernel, which decomposes it. Each node's
    ``tensor_meta`` gets shape, dtype and strides (no memory-format analysis:
    the passes read shapes only).
    """

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        # layout key -> (the result's layouts, its tensor_meta or None, its type)
        self._seen: dict[tuple, tuple] = {}

    def run_node(self, n: fx.Node):
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        key = _call_key(n, args, kwargs)
        entry = self._seen.get(key) if key is not None else None
        if entry is None:
            result = getattr(self, n.op)(n.target, args, kwargs)
            entry = (map_aggregate(result, _layout_of), _describe(result), type(result))
            if key is not None:
                self._seen[key] = entry
        else:
            result = map_aggregate(entry[0], _from_layout)
        if entry[1] is not None:
            n.meta["tensor_meta"] = entry[1]
        n.meta["type"] = entry[2]
        return result

    def call_function(self, target, args, kwargs):
        if target in SDPA:
            query, key, value = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(("query", "key", "value")))
            grad = query.requires_grad or key.requires_grad or value.requires_grad
            return query.new_empty((*query.shape[:-1], value.shape[-1])).requires_grad_(grad)
        return super().call_function(target, args, kwargs)


def _call_key(n: fx.Node, args: tuple, kwargs: dict) -> tuple | None:
    """The layout key of a torch op's call, or None for calls not to remember (modules, user functions, attention)."""
    if n.op != "call_method" and not (n.op == "call_function" and _is_torch_op(n.target) and n.target not in SDPA):
        return None
    try:
        return _layout_key((n.op, n.target, args, kwargs))
    except (_NotAKey, TypeError):
        return None


def _describe(result) -> object | None:
    """``tensor_meta`` of a result: shape, dtype, strides per tensor (no memory-format analysis), or None."""
    found = False

    def describe(value):
        nonlocal found
        if not isinstance(value, torch.Tensor):
            return value
        found = True
        return TensorMetadata(value.shape, value.dtype, value.requires_grad, value.stride(), None, False, {})

    meta = map_aggregate(result, describe)
    return meta if found else None


# Python operators and the torch namespace's functions: their result is all they do.
_PURE_MODULES = ("_operator", "torch", "torch.functional", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions")


def _is_torch_op(target) -> bool:
    return getattr(target, "__module__", None) in _PURE_MODULES


class _NotAKey(Exception):
    """An argument that cannot stand in a layout key (a tensor off the meta device)."""


@dataclass(frozen=True)
class _Layout:
    """A meta tensor's layout, to make an empty tensor of."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


def _layout_of(value):
    if isinstance(value, torch.Tensor):
        return _Layout(tuple(value.shape), value.stride(), value.dtype, value.requires_grad)
    return value


def _from_layout(value):
    if isinstance(value, _Layout):
        empty = torch.empty_strided(value.shape, value.stride, dtype=value.dtype, device="meta")
        return empty.requires_grad_(value.requires_grad)
    return value


def _layout_key(value) -> tuple:
    """A hashable key for a call's arguments, tensors by layout; ``TypeError`` when one is not hashable."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta":
            raise _NotAKey
        return ("tensor", _layout_of(value))
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_layout_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _layout_key(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _layout_key(value.start), _layout_key(value.stop), _layout_key(value.step))
    hash(value)
    return ("value", type(value), value)


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
        # Tensors the tracer found as plain attributes (``_tensor_constant0``) were never in the checkpoint.
        copied._non_persistent_buffers_set |= set(copied._buffers) - set(original._buffers)
