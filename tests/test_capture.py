"""Capture: the tracer's parameter look-up and the meta-device shape propagation match torch.fx's own."""

import pytest
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from fx_shard import models
from fx_shard.capture import LinearLeafTracer, capture, propagate_shapes


def _layout(meta):
    """``tensor_meta`` as comparable data: shape, dtype, strides, requires_grad (nested for tuples)."""
    if hasattr(meta, "_fields") and "shape" in meta._fields:
        return (tuple(meta.shape), meta.dtype, tuple(meta.stride), meta.requires_grad)
    if isinstance(meta, (list, tuple)):
        return [_layout(m) for m in meta]
    return meta


@pytest.mark.parametrize("name", ["llama", "llama-vllm", "gpt2", "vit"])
def test_meta_shapes_equal_shape_prop(name):
    """Remembered op layouts and attention's shape rule give what running every meta kernel gives."""
    overrides = {"num_hidden_layers": 3} if name.startswith("llama") else {}
    model = models.build(name, device="meta", **overrides)
    inputs = tuple(t.to("meta") for t in models.example_inputs(name))
    reference, fast = capture(model), capture(model)
    ShapeProp(reference).propagate(*inputs)
    propagate_shapes(fast, inputs)
    pairs = list(zip(reference.graph.nodes, fast.graph.nodes, strict=True))
    described = [(_layout(a.meta.get("tensor_meta")), _layout(b.meta.get("tensor_meta"))) for a, b in pairs]
    assert [a for a, _ in described] == [b for _, b in described]
    assert sum(a is not None for a, _ in described) > 50


def test_tracer_finds_parameters_read_in_forward_by_identity():
    """A norm's weight read in forward is one get_attr under its first name, as fx.Tracer names it."""
    model = models.build("llama", num_hidden_layers=2)
    ours = LinearLeafTracer().trace(model)
    theirs = fx.Tracer().trace(model)
    get_attrs = lambda g: [n.target for n in g.nodes if n.op == "get_attr"]  # noqa: E731
    assert get_attrs(ours) == get_attrs(theirs)
    assert "model.layers.1.input_layernorm.weight" in get_attrs(ours)


def test_meta_shapes_keep_tied_and_tuple_outputs():
    """Ops returning several tensors (split) come back as several tensors of the remembered layouts."""

    class Splits(torch.nn.Module):
        def forward(self, x):
            a, b = x.split([3, 5], dim=-1)
            c, d = x.split([3, 5], dim=-1)
            return a * c, b + d

    gm = capture(Splits())
    propagate_shapes(gm, (torch.randn(2, 8, device="meta"),))
    shapes = {n.name: _layout(n.meta["tensor_meta"]) for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert shapes["split"] == shapes["split_1"] == [((2, 3), torch.float32, (8, 1), False), ((2, 5), torch.float32, (8, 1), False)]
    assert shapes["mul"][0] == (2, 3) and shapes["add"][0] == (2, 5)
