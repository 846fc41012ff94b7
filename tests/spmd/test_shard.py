"""fx_shard.shard on the built-in models: same outputs, parameters sharded as recorded."""

import pytest
import torch
from conftest import local_shapes, relative_error, sharding_spec

import fx_shard
from fx_shard import models
from fx_shard.axes import local_shape
from fx_shard.models.plans import PLANS
from fx_shard.sharding import SHARDING_KEY, layer_parameters


@pytest.mark.parametrize("name", models.MODELS)
def test_sharded_model_matches_unsharded(name, mesh, devices):
    model = models.build(name)
    inputs = models.example_inputs(name)
    with torch.no_grad():
        expected = model(*inputs)
        gm = fx_shard.shard(model, mesh, PLANS[name])
        actual = gm(*(t.to(fx_shard.xla_device()) for t in inputs))
    assert relative_error(actual, expected) <= 1e-5

    checked = 0
    for target, record, pname, param in layer_parameters(gm):
        spec = record.specs.get(pname)
        if spec is None:
            assert sharding_spec(param) == "", f"{target}.{pname} should be replicated"
            continue
        assert local_shapes(param) == {local_shape(param.shape, spec, {"tp": devices})}, f"{target}.{pname}"
        checked += 1
    assert checked >= 8


def test_state_dict_keeps_original_keys_and_values(mesh):
    model = models.build("llama-vllm")
    gm = fx_shard.shard(model, mesh)
    expected = model.state_dict()
    actual = gm.state_dict()
    assert list(actual) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key].cpu(), value, rtol=0, atol=0)


def test_tied_embedding_is_one_sharded_tensor(mesh, devices):
    gm = fx_shard.shard(models.build("gpt2"), mesh, PLANS["gpt2"])
    assert gm.lm_head.weight is gm.transformer.wte.weight
    assert local_shapes(gm.lm_head.weight) == {(256 // devices, 64)}


def test_hybrid_mesh_works_like_mesh(devices):
    # HybridMesh builds its device order from TPU topology; on the CPU, fill one in by hand.
    import numpy as np
    import torch_xla.distributed.spmd as xs

    mesh = xs.HybridMesh.__new__(xs.HybridMesh)
    xs.Mesh.__init__(mesh, np.arange(devices), (1, devices), ("dcn", "model"))
    model = models.build("vit")
    (image,) = models.example_inputs("vit")
    with torch.no_grad():
        gm = fx_shard.shard(model, mesh, PLANS["vit"])
        assert relative_error(gm(image.to(fx_shard.xla_device())), model(image)) <= 1e-5
    assert local_shapes(gm.get_submodule("blocks.0.mlp.fc1").weight) == {(256 // devices, 64)}
    assert gm.meta[SHARDING_KEY].tp_axis == "model"


def test_a_model_already_on_the_device_is_refused(mesh):
    model = models.build("gpt2").to(fx_shard.xla_device())
    with pytest.raises(fx_shard.FxShardError, match=r"GPT2.transformer.wte.weight is already on xla:0; fx_shard.shard and transform take a model on the CPU or the meta device .* use fx_shard.shard_model"):
        fx_shard.shard(model, mesh, PLANS["gpt2"])


def test_shard_of_a_transformed_model_places_it_as_transformed(mesh, devices):
    model, inputs = models.build("llama"), models.example_inputs("llama")
    transformed = fx_shard.transform(model, PLANS["llama"], mesh_shape={"tp": devices}, example_inputs=inputs)
    gm = fx_shard.shard(transformed, mesh)
    reference = fx_shard.shard(model, mesh, PLANS["llama"], example_inputs=inputs)
    assert gm.meta[SHARDING_KEY].layers == transformed.meta[SHARDING_KEY].layers == reference.meta[SHARDING_KEY].layers
    specs = lambda m: {n: sharding_spec(p) for n, p in m.named_parameters()}  # noqa: E731
    assert specs(gm) == specs(reference)
    with torch.no_grad():
        assert relative_error(gm(*(t.to(fx_shard.xla_device()) for t in inputs)), model(*inputs)) <= 1e-5
    with pytest.raises(fx_shard.FxShardError, match=r"GraphModule is already sharded on xla:0 \(fx_shard.shard's result\): use it as it is"):
        fx_shard.shard(gm, mesh)
