"""transform: the whole graph rewrite without XLA, on real and meta tensors."""

import operator

import pytest
import torch

import fx_shard
from fx_shard import models
from fx_shard.errors import CaptureError
from fx_shard.models.plans import PLANS
from fx_shard.sharding import SHARDING_KEY, recorded_layers
from fx_shard.split_linear import SplitLinear


@pytest.mark.parametrize("name", models.MODELS)
def test_transform_keeps_function_and_state_dict(name):
    model = models.build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = models.example_inputs(name)
    gm = fx_shard.transform(model, PLANS[name], mesh_shape={"tp": 4}, example_inputs=inputs)
    torch.testing.assert_close(gm(*inputs), model(*inputs))
    # Nothing left that costs collectives under SPMD: no concatenated q/k/v or gate/up, no sdpa, no matmul.
    assert not [c for c in gm.graph.find_nodes(op="call_function", target=torch.cat) if _joins_parts(c)]
    targets = {n.target for n in gm.graph.nodes}
    assert not targets & {torch.nn.functional.scaled_dot_product_attention, operator.matmul, torch.matmul, "matmul"}
    after = gm.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    # The caller's model is untouched: same modules, same values.
    assert not any(isinstance(m, SplitLinear) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    passes = ("AnnotateSharding", "KeepGroupedFused", "SplitFusedLinear", "RewireFusedConsumers", "FitHeadsToMesh", "AttentionToEinsum",
              "InsertShardingConstraints")
    summary = gm.meta[SHARDING_KEY]
    assert (summary.mesh_shape, summary.tp_axis, summary.passes, summary.outside, summary.opaque) == ({"tp": 4}, "tp", passes, frozenset(), {})
    # One home for the decisions: every layer's record, as its node carries it, in graph order.
    assert summary.layers == dict(recorded_layers(gm))
    assert [d.pass_name for d in summary.diff] == list(passes)
    diff = {d.pass_name: d for d in summary.diff}
    # One rewritten call per attention (sdpa) or per matmul (ViT's two per block); 2 blocks each.
    assert len(diff["AttentionToEinsum"].rewritten) == (4 if name == "vit" else 2)
    assert all("fx_shard.ops." in after for _, after in diff["AttentionToEinsum"].rewritten)
    fused = name in ("gpt2", "vit", "llama-vllm")
    assert bool(diff["SplitFusedLinear"].added) == fused and bool(diff["RewireFusedConsumers"].removed) == fused


def _joins_parts(cat) -> bool:
    inputs = [a.args[0] if a.target is operator.getitem else a for a in cat.args[0]]
    return any(SHARDING_KEY in a.meta and a.meta[SHARDING_KEY].part_of for a in inputs)


@pytest.mark.parametrize("name", models.MODELS)
def test_transform_on_meta_materializes_nothing(name):
    model = models.build(name, device="meta")
    gm = fx_shard.transform(model, PLANS[name], mesh_shape={"tp": 8})
    tensors = list(gm.parameters()) + list(gm.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    sharded = [n for n in gm.graph.find_nodes(op="call_module") if SHARDING_KEY in n.meta and n.meta[SHARDING_KEY].specs]
    assert sharded


def test_every_built_in_linear_is_planned():
    for name in models.MODELS:
        gm = fx_shard.transform(models.build(name, device="meta"), PLANS[name], mesh_shape={"tp": 8})
        records = [n.meta[SHARDING_KEY] for n in gm.graph.find_nodes(op="call_module") if SHARDING_KEY in n.meta]
        uncovered = [r for r in records if r.source == "no rule covers it"]
        assert not uncovered, name


def test_vllm_llama_is_split_by_class_rules():
    gm = fx_shard.transform(models.build("llama-vllm", device="meta"), mesh_shape={"x": 4, "y": 1})
    targets = [n.target for n in gm.graph.find_nodes(op="call_module")]
    assert "model.layers.0.self_attn.qkv_proj.q" in targets
    assert "model.layers.0.mlp.gate_up_proj.1" in targets
    record = next(n.meta[SHARDING_KEY] for n in gm.graph.find_nodes(op="call_module") if n.target.endswith("o_proj"))
    assert record.specs == {"weight": (None, "x")} and record.source == "class rule RowParallelLinear"


class Branchy(torch.nn.Module):
    """Branches on a value, so only its parts trace."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

    def forward(self, x):
        h = self.down(torch.relu(self.up(x)))
        return self.mlp(h) if h.sum() > 0 else -h


def test_untraceable_model_is_captured_part_by_part():
    torch.manual_seed(0)
    model, x = Branchy().eval(), torch.randn(4, 8)
    root = fx_shard.transform(model, {"up": "colwise", "down": "rowwise"}, mesh_shape={"tp": 2}, example_inputs=(x,))
    summary = root.meta[SHARDING_KEY]
    assert list(summary.opaque) == [""]
    assert summary.opaque[""].startswith("TraceError: symbolically traced variables cannot be used as inputs to control flow")
    assert isinstance(root.mlp, torch.fx.GraphModule) and type(root) is Branchy
    assert {p: summary.layers[p].style for p in summary.outside} == {"up": "colwise", "down": "rowwise"}
    records = {n.target: n.meta[SHARDING_KEY].style for n in root.mlp.graph.find_nodes(op="call_module") if SHARDING_KEY in n.meta}
    assert records == {"0": "replicate", "2": "replicate"}
    assert {p: r.style for p, r in summary.layers.items()} == {"mlp.0": "replicate", "mlp.2": "replicate", **{"up": "colwise", "down": "rowwise"}}
    torch.testing.assert_close(root(x), model(x))
    assert list(root.state_dict()) == list(model.state_dict())


def test_capture_error_names_the_model():
    from fx_shard.capture import capture

    with pytest.raises(CaptureError, match=r"torch.fx could not trace Branchy: TraceError"):
        capture(Branchy())


@pytest.mark.parametrize("name", ["llama-vllm", "gpt2"])
def test_transform_of_a_transformed_model_keeps_it(name):
    model, inputs = models.build(name), models.example_inputs(name)
    gm = fx_shard.transform(model, PLANS[name], mesh_shape={"tp": 4}, example_inputs=inputs)
    for plan in (None, PLANS[name]):
        again = fx_shard.transform(gm, plan, mesh_shape={"tp": 4})
        assert again is not gm and isinstance(again, torch.fx.GraphModule)
        # Not rewritten again: the same records, and fused layers still save fused (the checkpoint's keys).
        assert again.meta[SHARDING_KEY].layers == gm.meta[SHARDING_KEY].layers
        assert list(again.state_dict()) == list(gm.state_dict()) == list(model.state_dict())
        assert again.code == gm.code
        torch.testing.assert_close(again(*inputs), model(*inputs))
    assert gm.meta[SHARDING_KEY].plan == fx_shard.ShardPlan(PLANS[name]).to_dict()


def test_transform_of_a_transformed_model_refuses_another_mesh_or_plan():
    gm = fx_shard.transform(models.build("llama-vllm", device="meta"), mesh_shape={"tp": 4})
    for kwargs, asked in [
        ({"mesh_shape": {"tp": 2}}, r"mesh_shape=\{'tp': 2\}"),
        ({"mesh_shape": {"tp": 4}, "fused": "interleave"}, r"fused='interleave' \(it has 'split'\)"),
        ({"mesh_shape": {"tp": 4}, "plan": "auto"}, r"another plan than its own \(\{'entries': \{\}, 'class_rules': True, 'auto': False\}\)"),
    ]:
        with pytest.raises(fx_shard.PlanError, match=(
            r"VllmLlama was already transformed by fx_shard for mesh \{'tp': 4\} \(root.meta\['sharding'\]\), "
            rf"but this call asks for {asked}; transform the original model for that, or call with plan=None"
        )):
            fx_shard.transform(gm, **kwargs)
    with pytest.raises(fx_shard.FxShardError, match=r"already rewritten by fx_shard.transform / shard .* backend='openxla'"):
        fx_shard.Pipeline({"tp": 4}).transform_captured(None, gm, None, capture=None)


def test_the_package_loads_its_names_on_first_use():
    # Each public name comes from the module fx_shard.__init__'s table names, and dir() lists them all.
    import importlib

    for name, module in fx_shard._EXPORTS.items():
        assert getattr(fx_shard, name) is getattr(importlib.import_module(module), name), name
    assert sorted(fx_shard._EXPORTS) == sorted(fx_shard.__all__)
    assert set(fx_shard.__all__) <= set(dir(fx_shard))
    # report, collectives and backend are functions and submodules: importing the submodule hides no function.
    importlib.import_module("fx_shard.collectives")
    importlib.import_module("fx_shard.report.fold")
    assert callable(fx_shard.report) and fx_shard.report.__module__ == "fx_shard.report"
    assert callable(fx_shard.collectives) and fx_shard.collectives.__name__ == "collectives"
    from fx_shard import backend, report

    assert (report, backend) == (fx_shard.report, fx_shard.backend) and callable(backend)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        fx_shard.no_such_name  # noqa: B018
