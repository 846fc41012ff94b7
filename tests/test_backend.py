"""fx_shard.backend's graph half on the CPU: dynamo's graph folded back into layers, planned and rewritten.

No XLA here: a recording backend runs ``transform_captured`` on what dynamo
captures and returns the rewritten graph to run on the CPU. (Sharding and
openxla are in tests/spmd/test_compile.py.)
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_shard
from fx_shard import models
from fx_shard.backend import ShardingBackend, transform_captured
from fx_shard.errors import FxShardError
from fx_shard.models.plans import PLANS
from fx_shard.ops import batched_matmul, einsum_attention
from fx_shard.passes import InlinedLayersToModules
from fx_shard.sharding import SHARDING_KEY, layer_parameters
from tests.hf_models import build_hf, hf_inputs

MESH = {"tp": 4}


def compile_with(model, fn, *args, **kwargs):
    """Run ``model`` through dynamo (one graph) with ``fn(gm, example_inputs)`` as the backend; the output."""
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=fn, fullgraph=True)(*args, **kwargs)


def captured(model, plan, *args, mesh_shape=MESH, **kwargs):
    """The rewritten graph(s) and the output of running them."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(transform_captured(gm, example_inputs, plan, mesh_shape=mesh_shape))
        return gm.forward

    return graphs, compile_with(model, backend, *args, **kwargs)


def records(gm):
    return {n.target: (r.style, dict(r.specs)) for n in gm.graph.find_nodes(op="call_module") if (r := n.meta.get(SHARDING_KEY))}


def linear_calls(gm) -> int:
    return sum(n.op == "call_function" and n.target in (torch._C._nn.linear, F.linear, F.embedding) for n in gm.graph.nodes)


@pytest.mark.parametrize("plan", ["explicit", "auto"])
@pytest.mark.parametrize("name", models.MODELS)
def test_captured_graph_is_planned_and_rewritten_as_transform_does(name, plan):
    model, inputs = models.build(name), models.example_inputs(name)
    plan = PLANS[name] if plan == "explicit" else "auto"
    (gm,), out = captured(model, plan, *inputs)
    torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-5)
    expected = fx_shard.transform(model, plan, mesh_shape=MESH, example_inputs=inputs)
    assert records(gm) == records(expected)
    assert linear_calls(gm) == 0
    # The same rewrites: as many concatenations (rotary's own; none joining split parts) and attention products.
    assert count(gm, torch.cat) == count(expected, torch.cat)
    assert count(gm, einsum_attention, batched_matmul) == count(expected, einsum_attention, batched_matmul) > 0
    gm.graph.lint()


def count(gm, *targets) -> int:
    return sum(n.op == "call_function" and n.target in targets for n in gm.graph.nodes)


def test_hugging_face_llama_gets_the_plan_of_the_symbolic_path():
    model, kwargs = build_hf("llama"), hf_inputs()
    (gm,), out = captured(model, "auto", **kwargs)
    torch.testing.assert_close(out.logits, model(**kwargs).logits, rtol=1e-5, atol=1e-5)
    root = fx_shard.transform(model, "auto", mesh_shape=MESH, example_kwargs=kwargs)
    expected = {path: (r.style, dict(r.specs)) for path, r, pname, _ in layer_parameters(root) if pname == "weight"}
    assert records(gm) == expected and len(expected) == 16
    assert gm.meta[SHARDING_KEY].opaque == {}
    assert linear_calls(gm) == 0
    assert not any("scaled_dot_product_attention" in str(n.target) for n in gm.graph.nodes)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16, bias=False)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.down(F.gelu(self.up(x))))


def fold_twice(model, *args):
    runs = []

    def backend(gm, example_inputs):
        from fx_shard.backend import traced_root

        fold = InlinedLayersToModules(traced_root(gm), example_inputs)
        first = fold(gm)
        code = gm.code
        second = InlinedLayersToModules(traced_root(gm), example_inputs)(gm)
        runs.append((first.modified, second.modified, code == gm.code, fold.left_inlined, gm))
        return gm.forward

    out = compile_with(model, backend, *args)
    return runs[0], out


def test_fold_turns_each_layer_call_into_one_call_module_and_is_idempotent():
    model, x = Block(), torch.randn(2, 5, 16)
    (first, second, same, left, gm), out = fold_twice(model, x)
    assert (first, second, same, left) == (True, False, True, {})
    torch.testing.assert_close(out, model(x))
    assert [n.target for n in gm.graph.find_nodes(op="call_module")] == ["up", "down"]
    assert gm.get_submodule("up") is model.up and linear_calls(gm) == 0
    gm.graph.lint()


class NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return torch.relu(x * self.scale)


def test_fold_leaves_a_graph_without_layers_alone():
    (first, second, same, left, gm), _ = fold_twice(NoLayers(), torch.randn(2, 16))
    assert (first, second, same, left) == (False, False, True, {})
    assert not list(gm.graph.find_nodes(op="call_module"))


class ScaledLinear(nn.Linear):
    def forward(self, x, scale):
        return F.linear(x, self.weight, self.bias) * scale


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = ScaledLinear(16, 16)
        self.shared = nn.Linear(16, 16)

    def forward(self, x, s):
        return self.shared(self.shared(self.proj(x, s)))


def test_a_layer_call_of_another_shape_stays_inlined_and_repeated_calls_fold_each():
    model, x, s = TwoInputs(), torch.randn(2, 16), torch.randn(2, 16)
    (_, _, _, left, gm), out = fold_twice(model, x, s)
    torch.testing.assert_close(out, model(x, s))
    assert set(left) == {"proj"} and "reads 2 values" in left["proj"]
    assert [n.target for n in gm.graph.find_nodes(op="call_module")] == ["shared", "shared"]
    assert linear_calls(gm) == 1  # proj's own


def test_einsum_op_is_torch_einsum_with_its_gradients():
    from fx_shard.ops import einsum

    a = torch.randn(2, 3, 5, 4, requires_grad=True)
    b = torch.randn(2, 3, 4, 6, requires_grad=True)
    out = einsum("bhij,bhjk->bhik", a, b)
    torch.testing.assert_close(out, a @ b)
    out.sum().backward()
    grads = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    (a @ b).sum().backward()
    torch.testing.assert_close(grads, (a.grad, b.grad))


class FakeMesh:
    axis_names = ("tp",)
    mesh_shape = (4,)


def test_backend_asks_for_the_model_on_the_xla_device():
    model = Block()
    with pytest.raises(Exception, match="move the model and its inputs to fx_shard.xla_device"):
        compile_with(model, ShardingBackend(FakeMesh(), "auto"), torch.randn(2, 5, 16))


def test_plan_entry_matching_no_layer_of_the_model_is_an_error():
    model = Block()
    with pytest.raises(Exception, match="plan entries match no linear-like layer: 'upp'"):
        captured(model, {"upp": "colwise"}, torch.randn(2, 5, 16))


def test_transform_captured_needs_a_graph_from_dynamo():
    gm = torch.fx.symbolic_trace(NoLayers())
    with pytest.raises(FxShardError, match="reads no module parameters"):
        transform_captured(gm, (torch.randn(2, 16),), "auto", mesh_shape=MESH)


class Broken(Block):
    def forward(self, x):
        h = F.gelu(self.up(x))
        torch._dynamo.graph_break()
        return self.norm(x + self.down(h))


def test_each_graph_of_a_graph_break_gets_the_plan_entries_for_its_layers():
    model, x = Broken(), torch.randn(2, 5, 16)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(transform_captured(gm, example_inputs, {"up": "colwise", "down": "rowwise"}, mesh_shape=MESH))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(out, model(x))
    assert [records(gm) for gm in graphs] == [{"up": ("colwise", {"weight": ("tp", None), "bias": ("tp",)})},
                                              {"down": ("rowwise", {"weight": (None, "tp")})}]


def test_backend_refuses_a_model_and_inputs_on_the_cpu():
    # Dynamo traces before it calls a backend: with the model on the CPU and inputs on XLA its own tracing fails
    # first (docs/usage.md says so); with both on the CPU the backend is reached and says what to do.
    from types import SimpleNamespace

    torch._dynamo.reset()
    backend = ShardingBackend(SimpleNamespace(axis_names=("tp",), mesh_shape=(4,)))
    compiled = torch.compile(models.build("gpt2"), backend=backend)
    with pytest.raises(Exception, match=(
        r"FxShardError: fx_shard.backend compiles for the XLA device, but the graph's inputs \(the model's parameters "
        r"and the call's tensors\) are on cpu; move the model and its inputs to fx_shard.xla_device\(\)"
    )):
        compiled(*models.example_inputs("gpt2"))
    assert backend.graphs == []


class OffsetPositions(nn.Embedding):
    """OPT's and Bart's learned positions: an nn.Embedding whose forward takes other arguments first."""

    def forward(self, past: int, position_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(position_ids + past + 2)


class WithPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.positions = OffsetPositions(20, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, x, position_ids):
        return self.proj(x + self.positions(1, position_ids))


def test_a_layer_whose_forward_is_its_own_stays_inlined():
    model, x, positions = WithPositions(), torch.randn(2, 5, 16), torch.arange(5).expand(2, 5)
    (_, _, _, left, gm), out = fold_twice(model, x, positions)
    torch.testing.assert_close(out, model(x, positions))
    assert set(left) == {"positions"} and "OffsetPositions.forward is its own" in left["positions"]
    assert [n.target for n in gm.graph.find_nodes(op="call_module")] == ["proj"]
