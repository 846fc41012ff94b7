"""The collective optimum, counted in XLA's partitioned HLO: 2 all-reduces per block, nothing else."""

import pytest
import torch
from conftest import local_shapes, relative_error

import fx_shard
from fx_shard import models
from fx_shard.collectives import collectives
from fx_shard.models.plans import PLANS
from fx_shard.report import parameter_bytes
from fx_shard.sharding import SHARDING_KEY

ZERO = {"all-gather": 0, "reduce-scatter": 0, "all-to-all": 0, "collective-permute": 0}


def expected_all_reduces(name: str, layers: int) -> int:
    # Megatron: one after attention's output projection, one after the MLP's down projection;
    # the language models add one for the vocabulary-parallel embedding lookup.
    return 2 * layers + (0 if name == "vit" else 1)


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("layers", [1, 3])
def test_optimal_collectives(name, layers, mesh):
    depth = {"vit": "depth", "gpt2": "n_layer"}.get(name, "num_hidden_layers")
    model = models.build(name, **{depth: layers})
    inputs = models.example_inputs(name)
    gm = fx_shard.shard(model, mesh, PLANS[name], example_inputs=inputs)
    counts = collectives(gm, *inputs)
    assert dict(counts) == {"all-reduce": expected_all_reduces(name, layers), **ZERO}
    with torch.no_grad():
        assert relative_error(gm(*(t.to(fx_shard.xla_device()) for t in inputs)), model(*inputs)) <= 1e-5


@pytest.mark.parametrize("name", ["llama", "llama-vllm"])
def test_gqa_keeps_q_sharded_and_parameter_bytes_ideal(name, mesh, devices):
    inputs = models.example_inputs(name)
    gm = fx_shard.shard(models.build(name), mesh, PLANS[name], example_inputs=inputs)
    counts = collectives(gm, *inputs)
    records = {n.target: n.meta[SHARDING_KEY] for n in gm.graph.find_nodes(op="call_module") if SHARDING_KEY in n.meta}
    q = next(r for t, r in records.items() if t.endswith(("q_proj", "qkv_proj.q")))
    assert q.style == "colwise" and q.specs["weight"] == ("tp", None)
    kv = {t: r for t, r in records.items() if t.endswith(("k_proj", "v_proj", "qkv_proj.k", "qkv_proj.v"))}
    # 2 KV heads: over all devices on 2; on 4 and 8 over "tp:2", the two blocks of devices whose q heads use them.
    assert {r.specs["weight"] for r in kv.values()} == {("tp" if devices == 2 else "tp:2", None)}
    assert {shape for t in kv for shape in local_shapes(gm.get_submodule(t).weight)} == {(8, 64)}
    assert counts.nonzero() == {"all-reduce": expected_all_reduces(name, 2)}
    total, per_device, ideal = parameter_bytes(gm)
    assert counts.parameter_bytes == per_device == ideal
    kv_bytes = sum(gm.get_submodule(t).weight.numel() * 4 for t in kv)
    sharded = {id(p): p for t, r in records.items() for n, p in gm.get_submodule(t).named_parameters() if n in r.specs}
    sharded_bytes = sum(p.numel() * p.element_size() for p in sharded.values())
    blocks = min(devices, 2)
    assert ideal == (sharded_bytes - kv_bytes) // devices + kv_bytes // blocks + (total - sharded_bytes)


@pytest.mark.parametrize("name", ["llama", "llama-vllm"])
def test_gqa_on_a_kv_mesh_shards_kv_without_collectives(name, devices):
    mesh = fx_shard.make_mesh(kv=2)
    inputs = models.example_inputs(name)
    model = models.build(name)
    gm = fx_shard.shard(model, mesh, PLANS[name], example_inputs=inputs)
    assert dict(collectives(gm, *inputs)) == {"all-reduce": expected_all_reduces(name, 2), **ZERO}
    records = {n.target: n.meta[SHARDING_KEY] for n in gm.graph.find_nodes(op="call_module") if SHARDING_KEY in n.meta}
    layer = "model.layers.0.self_attn."
    q, k = (layer + "q_proj", layer + "k_proj") if name == "llama" else (layer + "qkv_proj.q", layer + "qkv_proj.k")
    assert records[q].specs["weight"] == (("kv", "tp"), None)
    # With 2 devices (kv=2, tp=1) the 2 KV heads divide all 2 devices: same layout, both axes named.
    assert records[k].specs["weight"] == (("kv", None) if devices > 2 else (("kv", "tp"), None))
    assert local_shapes(gm.get_submodule(q).weight) == {(64 // devices, 64)}
    assert local_shapes(gm.get_submodule(k).weight) == {(8, 64)}  # 2 KV heads of 8 over kv=2
    with torch.no_grad():
        assert relative_error(gm(*(t.to(fx_shard.xla_device()) for t in inputs)), model(*inputs)) <= 1e-5


def test_logits_stay_vocab_sharded_unless_gathered(mesh, devices):
    import torch_xla

    inputs = models.example_inputs("llama")
    model = models.build("llama")
    plans = {False: PLANS["llama"], True: {**PLANS["llama"], "lm_head": {"style": "lm_head", "gather_output": True}}}
    for gather, plan in plans.items():
        gm = fx_shard.shard(model, mesh, plan, example_inputs=inputs)
        counts = collectives(gm, *inputs)
        assert dict(counts) == {"all-reduce": 5, **ZERO, "all-gather": int(gather)}
        with torch.no_grad():
            logits = gm(*(t.to(fx_shard.xla_device()) for t in inputs))
            torch_xla.sync()
            spec = torch_xla._XLAC._get_xla_sharding_spec(logits)
            assert ("replicated" in spec or spec == "") if gather else spec.startswith(f"{{devices=[1,1,{devices}]")
            assert relative_error(logits, model(*inputs)) <= 1e-5


@pytest.mark.parametrize("name", [*models.MODELS, "timm-vit"])
def test_auto_plan_reaches_the_optimum(name, mesh):
    if name == "timm-vit":
        import timm

        torch.manual_seed(0)
        model = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=8, num_classes=10).eval()
        inputs = (torch.randn(2, 3, 16, 16),)
    else:
        model, inputs = models.build(name), models.example_inputs(name)
    gm = fx_shard.shard(model, mesh, "auto", example_inputs=inputs)
    expected = 4 if name in ("vit", "timm-vit") else 5
    assert dict(collectives(gm, *inputs)) == {"all-reduce": expected, **ZERO}
    with torch.no_grad():
        assert relative_error(gm(*(t.to(fx_shard.xla_device()) for t in inputs)), model(*inputs)) <= 1e-5


def test_collectives_of_a_program_compiled_before(mesh):
    # XLA reuses a compiled program without dumping it again; its earlier dump is found by content.
    inputs = models.example_inputs("gpt2")
    gm = fx_shard.shard(models.build("gpt2", n_layer=4), mesh, PLANS["gpt2"], example_inputs=inputs)
    with torch.no_grad():
        gm(*(t.to(fx_shard.xla_device()) for t in inputs)).cpu()
    assert dict(collectives(gm, *inputs)) == {"all-reduce": 9, **ZERO}
    assert dict(collectives(gm, *inputs)) == {"all-reduce": 9, **ZERO}


def test_sibling_layers_as_one_matmul_need_fewer_all_reduces_in_training(mesh, devices):
    import copy

    # A batch no other test compiles, so the program is dumped here.
    model, inputs = models.build("llama"), (torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0)),)
    split = fx_shard.shard(copy.deepcopy(model), mesh, PLANS["llama"], example_inputs=inputs)
    fused = fx_shard.shard(copy.deepcopy(model), mesh, PLANS["llama"], example_inputs=inputs, fused="interleave")
    # Each column-parallel layer's input gradient is all-reduced on its own: one per layer when split,
    # one per group of siblings when fused. 2 blocks: q, k, v and gate, up (k, v apart from q over "tp:2").
    per_block_saved = 3 if devices == 2 else 2
    targets = inputs[0].flatten()

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.to(logits.device))

    counts_split, counts_fused = collectives(split, *inputs, loss=loss), collectives(fused, *inputs, loss=loss)
    assert set(counts_split.nonzero()) == set(counts_fused.nonzero()) == {"all-reduce"}
    assert counts_split["all-reduce"] - counts_fused["all-reduce"] == 2 * per_block_saved
    assert all(p.grad is None for p in fused.parameters())  # collectives() leaves .grad as it was
    reference = copy.deepcopy(model)
    loss(reference(*inputs)).backward()
    loss(fused(inputs[0].to(fx_shard.xla_device()))).backward()
    fx_shard.xla.sync([p.grad for p in fused.parameters()])  # one program for every gradient, not one per read
    for name, param in fused.named_parameters():  # the gradients reach the original parameters
        expected = reference.get_parameter(name).grad
        assert relative_error(param.grad, expected) <= 1e-4, name


@pytest.mark.parametrize("name", ["llama", "gpt2", "vit", "llama-vllm"])
def test_fused_layers_kept_fused_reach_the_optimum_too(name, mesh):
    model, inputs = models.build(name), models.example_inputs(name)
    gm = fx_shard.shard(model, mesh, PLANS[name], example_inputs=inputs, fused="interleave")
    assert dict(collectives(gm, *inputs)) == {"all-reduce": expected_all_reduces(name, 2), **ZERO}
    with torch.no_grad():
        assert relative_error(gm(*(t.to(fx_shard.xla_device()) for t in inputs)), model(*inputs)) <= 1e-5


@pytest.mark.parametrize("layout", ["GroupedQKV", "FalconQKV"])
@pytest.mark.parametrize("kv_mesh", [False, True])
def test_qkv_laid_out_per_kv_group_needs_no_collective(layout, kv_mesh, mesh, devices):
    import tests.toy

    model, x = tests.toy.seeded(getattr(tests.toy, layout)), torch.randn(2, 5, 64)
    plan = {"qkv": {"style": "qkv", "num_heads": 8, "num_kv_heads": 2}, "dense": "rowwise"}
    mesh = fx_shard.make_mesh(kv=2) if kv_mesh else mesh
    gm = fx_shard.shard(model, mesh, plan, example_inputs=(x,))
    # One all-reduce after the dense, nothing else: whole groups per device on 2 devices (kept fused),
    # on more devices q split by heads and k/v by group (split from every group's rows).
    assert dict(collectives(gm, x)) == {"all-reduce": 1, **ZERO}
    layers = {n.target for n in gm.graph.find_nodes(op="call_module")}
    if devices == 2:
        assert layers == {"qkv", "dense"}
        assert local_shapes(gm.get_submodule("qkv").weight) == {(48, 64)}
    else:
        assert layers == {"qkv.q", "qkv.k", "qkv.v", "dense"}
        assert local_shapes(gm.get_submodule("qkv.q").weight) == {(64 // devices, 64)}
        assert local_shapes(gm.get_submodule("qkv.k").weight) == {(8, 64)}
    with torch.no_grad():
        assert relative_error(gm(x.to(fx_shard.xla_device())), model(x)) <= 1e-5
    assert torch.equal(gm.state_dict()["qkv.weight"].cpu(), model.qkv.weight)


def test_auto_plan_on_a_model_with_unusual_names(mesh):
    from tests.test_infer import OddNames

    torch.manual_seed(0)
    model, x = OddNames(dim=64, heads=8).eval(), torch.randn(2, 5, 64)
    gm = fx_shard.shard(model, mesh, "auto", example_inputs=(x,))
    assert dict(collectives(gm, x)) == {"all-reduce": 2, **ZERO}  # one block: attention and MLP
    with torch.no_grad():
        assert relative_error(gm(x.to(fx_shard.xla_device())), model(x)) <= 1e-5


@pytest.mark.parametrize("repeat", ["expand", "interleave"])
def test_repeated_kv_reaches_the_optimum_with_kv_heads_sharded(repeat, mesh, devices):
    """Meta's / torchtitan's repeat_kv and gpt-fast's repeat_interleave: 2 KV heads on 2, 4, 8 devices."""
    import tests.toy

    model, x = tests.toy.seeded(tests.toy.RepeatedKvAttention, repeat, dim=64), torch.randn(2, 5, 64)
    gm = fx_shard.shard(model, mesh, "auto", example_inputs=(x,))
    assert dict(collectives(gm, x)) == {"all-reduce": 1, **ZERO}
    assert local_shapes(gm.get_submodule("wq").weight) == {(64 // devices, 64)}
    assert local_shapes(gm.get_submodule("wk").weight) == {(8, 64)}  # one KV head of 8 features per device
    with torch.no_grad():
        assert relative_error(gm(x.to(fx_shard.xla_device())), model(x)) <= 1e-5
