"""Bad input: each error names the module, the value found and a way out."""

import sys
import warnings

import pytest
import torch

import fx_shard
from fx_shard import FxShardError, PlanError, models
from fx_shard.layers import QKVParallelLinear
from fx_shard.models.plans import PLANS
from tests.toy import FusedAttention, GQAttention, seeded


def test_heads_not_divisible_in_an_explicit_plan():
    model = seeded(GQAttention, dim=48, heads=6, kv_heads=6)  # 6 heads of 8
    plan = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}
    with pytest.raises(PlanError, match=r"heads \(6\) are not divisible by mesh axes \('tp',\) \(4\) in q_proj \(plan entry 'q_proj'\); use a mesh axis of 1, 2, 3, 6, or replicate this layer in the plan"):
        fx_shard.transform(model, plan, mesh_shape={"tp": 4}, example_inputs=(torch.randn(2, 5, 48),))


@pytest.mark.parametrize(("heads", "spec", "outcome"), [
    (6, ("tp:2", None), "sharded over ('tp:2',) (2) only, blocks of consecutive devices sharing a piece"),
    (3, None, "replicated"),
])
def test_auto_keeps_heads_whole_and_says_so(heads, spec, outcome):
    model = seeded(GQAttention, dim=48, heads=heads, kv_heads=heads)
    gm = fx_shard.transform(model, "auto", mesh_shape={"tp": 4}, example_inputs=(torch.randn(2, 5, 48),))
    record = next(n.meta["sharding"] for n in gm.graph.find_nodes(op="call_module") if n.target == "q_proj")
    assert record.specs.get("weight") == spec
    assert record.notes == (
        f"{heads} heads (head_dim {48 // heads}) do not divide mesh axes ('tp',) (4): {outcome}, so attention needs no collective",
    )


def test_features_not_divisible():
    with pytest.raises(PlanError, match=r"output features \(6\) of mlp.fc are not divisible by mesh axis 'tp' \(4\); use a mesh axis of 1, 2, 3, or replicate"):
        fx_shard.ShardPlan({"mlp.fc": "colwise"}).resolve({"mlp.fc": torch.nn.Linear(8, 6)}, {"tp": 4}, "tp")


def test_plan_entry_matching_nothing_and_unknown_style():
    with pytest.raises(PlanError, match=r"plan entries match no linear-like layer: '\*\.q_prj'"):
        fx_shard.transform(models.build("llama", device="meta"), {"*.q_prj": "colwise"}, mesh_shape={"tp": 2})
    with pytest.raises(PlanError, match=r"plan entry 'lm_head': unknown style 'vocab_parallel'; styles: colwise, rowwise"):
        fx_shard.transform(models.build("llama", device="meta"), {"lm_head": "vocab_parallel"}, mesh_shape={"tp": 2})


def test_mesh_axis_that_does_not_exist():
    with pytest.raises(PlanError, match=r"mesh axis 'model' does not exist; the mesh has axes \['tp'\]"):
        fx_shard.transform(models.build("gpt2", device="meta"), PLANS["gpt2"], mesh_shape={"tp": 2}, tp_axis="model")


def test_qkv_class_whose_sizes_do_not_add_up():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = QKVParallelLinear(32, 8, 4, 2)
            self.qkv.output_sizes = [32, 16, 8]

        def forward(self, x):
            return self.qkv(x)[0]

    with pytest.raises(PlanError, match=r"qkv \(QKVParallelLinear\): output_sizes \[32, 16, 8\] do not add up to its 64 output features in 3 parts"):
        fx_shard.transform(Block(), mesh_shape={"tp": 2})


def test_torch_xla_missing(monkeypatch):
    from fx_shard.xla import _torch_xla

    monkeypatch.setitem(sys.modules, "torch_xla", None)
    with pytest.raises(FxShardError, match=r"materializing on an XLA device needs torch_xla; install it with `pip install torch==2.9.0 torch_xla==2.9.0`"):
        _torch_xla()


@pytest.mark.parametrize(("mesh_shape", "message"), [
    ({}, r"mesh_shape=\{\} has no axes; give each mesh axis its number of devices, e.g. mesh_shape=\{'tp': 4\}"),
    ({"tp": 0}, r"mesh axis 'tp' has size 0; each axis needs a whole number of devices, at least 1"),
    ({"tp": 2.5}, r"mesh axis 'tp' has size 2.5; each axis needs a whole number of devices"),
    ({0: 4}, r"mesh_shape key 0 is not an axis name; name the axes with strings"),
    ((4,), r"mesh_shape=\(4,\) is not a mapping of mesh axis name to size"),
], ids=["empty", "zero", "fraction", "int_axis", "tuple"])
def test_mesh_shape_that_is_not_a_mesh(mesh_shape, message):
    with pytest.raises(PlanError, match=message):
        fx_shard.transform(torch.nn.Sequential(torch.nn.Linear(4, 4)), mesh_shape=mesh_shape)


def test_plan_key_that_is_not_a_module_name():
    with pytest.raises(PlanError, match=r"plan key 0 \(int\) is not a module name; .* nn.Sequential is '0'"):
        fx_shard.transform(torch.nn.Sequential(torch.nn.Linear(4, 4)), {0: "colwise"}, mesh_shape={"tp": 2})


@pytest.mark.parametrize(("fields", "message"), [
    ({"output_sizes": 5}, r"output_sizes=5 is not a list of part sizes .* e.g. \[64, 16, 16\]"),
    ({"output_sizes": "64,16,16"}, r"output_sizes='64,16,16' is not a list of part sizes"),
    ({"output_sizes": [32, "16", 16]}, r"output_sizes=\[32, '16', 16\] is not a list of part sizes"),
    ({"num_heads": "8"}, r"num_heads='8' is not a number of heads; give a whole number, at least 1"),
    ({"num_heads": 0}, r"num_heads=0 is not a number of heads"),
    ({"num_kv_heads": 2}, r"num_kv_heads=2 needs num_heads \(the number of q heads\) too"),
    ({"gather_output": "no"}, r"gather_output='no' is not True or False"),
], ids=["sizes_int", "sizes_str", "sizes_mixed", "heads_str", "heads_zero", "kv_without_heads", "gather_str"])
def test_layer_plan_fields_of_the_wrong_type(fields, message):
    with pytest.raises(PlanError, match=r"plan entry 'attn.qkv': " + message):
        fx_shard.ShardPlan({"attn.qkv": {"style": "qkv", **fields}})


@pytest.mark.parametrize("data", [None, {"attn.qkv": "qkv"}, {"entries": ["qkv"]}, {"entries": {}, "auto": "yes"}])
def test_plan_from_dict_of_something_else(data):
    with pytest.raises(PlanError, match=r"ShardPlan.from_dict"):
        fx_shard.ShardPlan.from_dict(data)
    plan = fx_shard.ShardPlan({"*.q": "colwise"}, auto=True)
    assert fx_shard.ShardPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


def test_fused_style_on_a_plain_layer_needs_its_sizes():
    model, x = seeded(FusedAttention), torch.randn(2, 5, 32)
    with pytest.raises(PlanError, match=(
        r"qkv \(Linear, 96 output features\) is planned 'qkv', but nothing says how its output splits into parts: .* "
        r"e.g. \{'style': 'qkv', 'num_heads': H, 'num_kv_heads': KV\} or \{'style': 'qkv', 'output_sizes': \[32, 32, 32\]\} "
        r"for 3 equal parts \(plan entry 'qkv'\)"
    )):
        fx_shard.transform(model, {"qkv": "qkv", "proj": "rowwise"}, mesh_shape={"tp": 4}, example_inputs=(x,))
    gate_up = torch.nn.Sequential(torch.nn.Linear(8, 32))
    with pytest.raises(PlanError, match=r"e.g. \{'style': 'merged_colwise', 'output_sizes': \[16, 16\]\} for 2 equal parts"):
        fx_shard.transform(gate_up, {"0": "merged_colwise"}, mesh_shape={"tp": 4})
    # Said in the entry, or by the layer itself (vLLM's output_sizes), or found by plan="auto": no error.
    for plan in ({"qkv": {"style": "qkv", "num_heads": 4}}, {"qkv": {"style": "qkv", "output_sizes": [32, 32, 32]}}, "auto"):
        gm = fx_shard.transform(model, plan, mesh_shape={"tp": 4}, example_inputs=(x,))
        assert gm.meta["sharding"].layers["qkv.k"].specs == {"weight": ("tp", None), "bias": ("tp",)}
    fx_shard.transform(torch.nn.Sequential(QKVParallelLinear(32, 8, 4, 2)), {"0": "qkv"}, mesh_shape={"tp": 2})


def test_fused_options_on_a_style_that_does_not_take_them():
    layer = torch.nn.Sequential(torch.nn.Linear(8, 32))
    with pytest.raises(PlanError, match=r"0: output_sizes applies to fused styles \(qkv and merged_colwise\), not 'colwise'; remove it"):
        fx_shard.transform(layer, {"0": {"style": "colwise", "output_sizes": [16, 16]}}, mesh_shape={"tp": 4})
    with pytest.raises(PlanError, match=r"0: num_heads / num_kv_heads apply to style qkv, not 'merged_colwise'; remove them \(give output_sizes"):
        fx_shard.transform(layer, {"0": {"style": "merged_colwise", "num_heads": 4}}, mesh_shape={"tp": 4})


def test_tied_weight_sharded_by_one_layer_and_replicated_by_the_other():
    plan = {**PLANS["gpt2"], "transformer.wte": "replicate"}
    with pytest.raises(PlanError, match=(
        r"transformer.wte.weight and lm_head.weight are one tensor \(tied weights\), but transformer.wte \(replicate, "
        r"plan entry 'transformer.wte'\) replicates it and lm_head \(lm_head, plan entry 'lm_head'\) shards it "
        r"\('tp', None\); give both layers styles that shard it alike: 'vocab' on the embedding with 'lm_head' on the "
        r"head, or 'replicate' on both"
    )):
        fx_shard.transform(models.build("gpt2", device="meta"), plan, mesh_shape={"tp": 2})
    plan["transformer.wte"], plan["lm_head"] = "replicate", "replicate"
    fx_shard.transform(models.build("gpt2", device="meta"), plan, mesh_shape={"tp": 2})


def test_a_tied_layer_no_rule_covers_follows_the_layer_it_shares_its_weight_with():
    plan = {k: v for k, v in PLANS["gpt2"].items() if k != "transformer.wte"}
    gm = fx_shard.transform(models.build("gpt2", device="meta"), plan, mesh_shape={"tp": 2})
    record = gm.meta["sharding"].layers["transformer.wte"]
    assert (record.style, dict(record.specs), record.source) == ("vocab", {"weight": ("tp", None)}, "tied to lm_head, its weight")


def test_no_rule_covering_any_layer_warns():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with pytest.warns(UserWarning, match=(
        r"no rule covered any of the 2 linear-like layers of Sequential \(0, 2\), so nothing is sharded; "
        r"pass plan='auto' to infer a plan from the graph, or a plan naming the layers"
    )) as caught:
        fx_shard.transform(model, mesh_shape={"tp": 2})
    assert caught[0].filename == __file__, "the warning points at the caller's line"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fx_shard.transform(model, {"0": "colwise"}, mesh_shape={"tp": 2})  # one layer planned: no warning


def test_load_sharded_into_a_module_fx_shard_did_not_transform():
    with pytest.raises(FxShardError, match=(
        r"Linear was not rewritten by fx_shard \(no ModelSharding in .meta\['sharding'\]\); load into the result of "
        r"fx_shard.transform\(model, plan, mesh_shape=...\) or fx_shard.shard, or use load_state_dict"
    )):
        fx_shard.load_sharded(torch.nn.Linear(4, 4), {}, mesh=None)


def test_shard_model_on_a_model_still_on_the_cpu():
    from types import SimpleNamespace

    mesh = SimpleNamespace(axis_names=("tp",), mesh_shape=(2,))  # what shard_model reads before any XLA call
    model = models.build("llama-vllm")
    with pytest.raises(FxShardError, match=(
        r"VllmLlama.model.embed_tokens.weight is on cpu; shard_model shards in place a model already on the "
        r"XLA device, as vLLM's does: move it first with model.to\(fx_shard.xla_device\(\)\), or use fx_shard.shard"
    )):
        fx_shard.shard_model(model, mesh)
    assert not any(type(m).__name__ == "SplitLinear" for m in model.modules()), "nothing was changed"


class _LoraLinear(torch.nn.Linear):
    """A linear whose forward adds a low-rank update: replacing it by split parts would drop the update."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__(features, out)
        self.down, self.up = torch.nn.Parameter(torch.randn(2, features)), torch.nn.Parameter(torch.randn(out, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.down.T @ self.up.T


def test_a_fused_style_on_a_layer_whose_forward_is_its_own_is_refused():
    model = torch.nn.Sequential(_LoraLinear(16, 48))
    with pytest.raises(PlanError, match=r"0 \(_LoraLinear\): style 'qkv' rewrites the layer as one linear per part, and "
                                        r"_LoraLinear.forward is its own, which the rewrite would drop; use 'colwise'"):
        fx_shard.transform(model, {"0": {"style": "qkv", "output_sizes": [16, 16, 16]}}, mesh_shape={"tp": 2})


def test_plan_auto_never_splits_a_fused_layer_whose_forward_is_its_own():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = _LoraLinear(16, 48), torch.nn.Linear(16, 16)

        def forward(self, x):
            q, k, v = self.qkv(x).split(16, dim=-1)
            return self.proj(q * k + v)

    model, x = Attention(), torch.randn(2, 4, 16)
    gm = fx_shard.transform(model, "auto", mesh_shape={"tp": 2}, example_inputs=(x,))
    torch.testing.assert_close(gm(x), model(x))
    assert gm.meta["sharding"].layers["qkv"].style == "colwise" and type(gm.qkv) is _LoraLinear
