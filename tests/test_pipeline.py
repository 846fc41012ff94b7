"""The pipeline: one declared pass order, the per-pass diff from node identity, phases, lazy code generation."""

import gc

import pytest
import torch
from torch import fx

import fx_shard
from fx_shard import models
from fx_shard.models.plans import PLANS
from fx_shard.pipeline import PASSES, Pipeline


def _describe_all(gm: fx.GraphModule) -> dict[str, str]:
    """Every node as text, the way the diff describes one (the reference the identity diff must equal)."""
    out = {}
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else torch.fx.node._get_qualified_name(node.target)
        args = ", ".join(map(str, node.args)) + "".join(f", {k}={v}" for k, v in node.kwargs.items())
        out[node.name] = f"{node.name} = {target}({args})"
    return out


class _Recording(Pipeline):
    """The pipeline, also describing every node before and after each pass: the diff by text formatting."""

    def _passes(self, records):
        made = super()._passes(records)
        self.reference = []
        for p in made:
            call = p.call

            def described(gm, call=call, name=type(p).__name__):
                before = _describe_all(gm)
                out = call(gm)
                after = _describe_all(gm)
                self.reference.append((
                    name,
                    tuple(after[n] for n in after if n not in before),
                    tuple(before[n] for n in before if n not in after),
                    tuple((before[n], after[n]) for n in after if n in before and before[n] != after[n]),
                ))
                return out

            p.call = described
        return made


@pytest.mark.parametrize("name, fused", [("llama-vllm", "split"), ("gpt2", "split"), ("vit", "interleave"), ("llama", "interleave")])
def test_diff_from_node_identity_equals_the_text_diff(name, fused):
    model, inputs = models.build(name), models.example_inputs(name)
    pipeline = _Recording({"tp": 4}, fused=fused)
    gm = pipeline.transform(model, PLANS[name], inputs)
    diff = gm.meta["sharding"].diff
    assert [(d.pass_name, d.added, d.removed, d.rewritten) for d in diff] == pipeline.reference
    assert sum(len(d.added) + len(d.removed) + len(d.rewritten) for d in diff) > 10


def test_pass_order_is_declared_once():
    assert Pipeline({"tp": 2}).pass_names() == (
        "AnnotateSharding", "KeepGroupedFused", "SplitFusedLinear", "RewireFusedConsumers", "FitHeadsToMesh",
        "AttentionToEinsum", "InsertShardingConstraints",
    )
    assert Pipeline({"tp": 2}, fused="interleave").pass_names() == tuple(cls.__name__ for cls, _ in PASSES)
    assert Pipeline({"tp": 2}, only=("SplitFusedLinear", "AnnotateSharding")).pass_names() == ("AnnotateSharding", "SplitFusedLinear")
    with pytest.raises(fx_shard.PlanError, match=r"unknown passes \['Split'\]; the passes are AnnotateSharding, "):
        Pipeline({"tp": 2}, only=("Split",))
    with pytest.raises(fx_shard.PlanError, match=r"fused='fuse' is not a strategy; choose one of split, interleave"):
        Pipeline({"tp": 2}, fused="fuse")


def test_phases_are_timed_and_the_collector_restored():
    model, inputs = models.build("llama"), models.example_inputs("llama")
    pipeline = Pipeline({"tp": 2})
    assert gc.isenabled()
    pipeline.transform(model, PLANS["llama"], inputs)
    assert gc.isenabled()
    assert {"copy", "capture", "shapes", "plan", "diff", "summarize", "code", "pass SplitFusedLinear"} <= set(pipeline.timings)
    assert all(seconds >= 0 for seconds in pipeline.timings.values())
    gc.disable()
    try:
        pipeline.transform(model, PLANS["llama"], inputs)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_code_is_generated_once_after_the_passes(monkeypatch):
    """Passes mark the code stale; it is generated once, after the last pass, and runs as the model does."""
    generated = []
    real = fx.GraphModule.recompile
    monkeypatch.setattr(fx.GraphModule, "recompile", lambda self: generated.append(1) or real(self))
    model, inputs = models.build("gpt2"), models.example_inputs("gpt2")
    gm = fx_shard.transform(model, PLANS["gpt2"], mesh_shape={"tp": 2}, example_inputs=inputs)
    assert len(generated) == 1
    torch.testing.assert_close(gm(*inputs), model(*inputs))
    assert "einsum_attention" in gm.code and len(generated) == 1


def test_a_meta_model_gets_its_code_when_first_needed(monkeypatch):
    """Planned on the meta device (for a report, or to load a checkpoint into), the code waits for a use."""
    generated = []
    real = fx.GraphModule.recompile
    monkeypatch.setattr(fx.GraphModule, "recompile", lambda self: generated.append(1) or real(self))
    model = models.build("gpt2", device="meta")
    gm = fx_shard.transform(model, PLANS["gpt2"], mesh_shape={"tp": 2})
    assert generated == []
    assert "einsum_attention" in gm.code and len(generated) == 1


def test_a_pass_run_alone_leaves_runnable_code():
    """Outside the pipeline a captured graph regenerates its code when next called."""
    from fx_shard.capture import capture
    from fx_shard.passes import AttentionToEinsum

    model, inputs = models.build("vit"), models.example_inputs("vit")
    gm = capture(model)
    assert AttentionToEinsum()(gm).modified
    assert "batched_matmul" in gm.code
    torch.testing.assert_close(gm(*inputs), model(*inputs))


def test_shapes_are_computed_only_when_a_plan_or_pass_needs_one(monkeypatch):
    """Separate q/k/v with an explicit plan need no shape; a fused qkv split on dim 2 needs ranks."""
    import fx_shard.pipeline as pipeline_module
    from fx_shard.patterns import PENDING_SHAPES

    ran = []
    real = pipeline_module.propagate_shapes
    monkeypatch.setattr(pipeline_module, "propagate_shapes", lambda gm, inputs: ran.append(gm) or real(gm, inputs))
    llama, inputs = models.build("llama"), models.example_inputs("llama")
    gm = fx_shard.transform(llama, PLANS["llama"], mesh_shape={"tp": 2}, example_inputs=inputs)
    assert ran == [] and PENDING_SHAPES not in gm.meta
    torch.testing.assert_close(gm(*inputs), llama(*inputs))
    gpt2, inputs = models.build("gpt2"), models.example_inputs("gpt2")
    gm = fx_shard.transform(gpt2, PLANS["gpt2"], mesh_shape={"tp": 2}, example_inputs=inputs)
    assert ran == [gm] and PENDING_SHAPES not in gm.meta
    # The split of c_attn's output on dim 2 is the last dim only because the output is 3-D: rewired past the join.
    assert not gm.graph.find_nodes(op="call_function", target=torch.cat)


def test_each_pass_and_each_decision_is_logged_once(caplog):
    # What `fx-shard -v` shows: one line per pass applied (its diff counts), one per layer's final decision.
    model = models.build("gpt2")
    with caplog.at_level("INFO", logger="fx_shard.pipeline"):
        fx_shard.transform(model, PLANS["gpt2"], mesh_shape={"tp": 8}, example_inputs=models.example_inputs("gpt2"))
    lines = [r.getMessage() for r in caplog.records if r.name == "fx_shard.pipeline"]
    passes = [line for line in lines if line.startswith("pass ")]
    assert len(passes) == len(Pipeline({"tp": 8}).pass_names())
    assert "pass SplitFusedLinear: +8 -2 ~2 nodes" in passes  # per block: c_attn -> q, k, v and a cat
    assert "pass RewireFusedConsumers: +0 -10 ~18 nodes" in passes
    layers = [line for line in lines if line.startswith("layer ")]
    assert len(layers) == 15 and len(lines) == len(passes) + len(layers)
    assert "layer transformer.h.0.attn.c_attn.q: colwise, weight (tp, -), bias (tp); qkv part 'q' (plan entry '*.attn.c_attn')" in layers
    assert "layer transformer.wpe: replicate, replicated; plan entry 'transformer.wpe'" in layers
