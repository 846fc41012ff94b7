"""InlinedLayersToModules: each linear-like layer dynamo inlined, folded back into one ``call_module`` node."""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fx_shard.capture import is_linear_like, own_forward
from fx_shard.errors import CaptureError
from fx_shard.passes.utils import result

__all__ = ["InlinedLayersToModules"]

logger = logging.getLogger(__name__)


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
        own = own_forward(module)
        if own:
            why = (f"{own}.forward is its own (not nn.Linear's or nn.Embedding's): the value its call reads "
                   "need not be its first argument, so the call is kept as dynamo traced it")
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
