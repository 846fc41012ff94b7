"""Checkpoints of sharded models: state_dict round trip, load_state_dict, load_sharded, torch.distributed.checkpoint."""

import math

import numpy as np
import pytest
import torch
from conftest import local_shapes, relative_error, sharding_spec

import fx_shard
from fx_shard import models
from fx_shard.axes import local_shape
from fx_shard.checkpoint import load_sharded, shard_indices
from fx_shard.errors import FxShardError, PlanError
from fx_shard.models.plans import PLANS
from fx_shard.sharding import layer_parameters
from tests.toy import QKV_32, GPT2Like


def sharded(name, mesh, seed=0):
    return fx_shard.shard(models.build(name, seed=seed), mesh, PLANS[name], example_inputs=models.example_inputs(name))


# Batch 1: XLA caches compiled programs by graph, and test_collectives.py needs to be the first to compile
# the batch-2 forward of each built-in model (collectives() reads the HLO dump written at compile time).
BATCH = 1


def run(gm, name):
    with torch.no_grad():
        return gm(*(t.to(fx_shard.xla_device()) for t in models.example_inputs(name, batch=BATCH))).cpu()


def expected_output(model, name):
    with torch.no_grad():
        return model(*models.example_inputs(name, batch=BATCH))


def host_to_device_bytes() -> float:
    """Bytes sent from the host to devices so far, counted once per receiving device."""
    import torch_xla
    import torch_xla.debug.metrics as met

    torch_xla.sync()
    data = met.metric_data("OutboundData")
    return data[1] if data else 0.0


def specs_by_name(gm) -> dict[str, str]:
    # A replicated parameter's spec reads "" until a run of the model (shard's self-check, a call) may make
    # torch_xla annotate it "{replicated}": the same placement either way.
    return {name: sharding_spec(p) or "{replicated}" for name, p in gm.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("name", models.MODELS)
def test_state_dict_of_sharded_model_is_the_original(name, mesh):
    model = models.build(name)
    gm = sharded(name, mesh)
    expected, actual = model.state_dict(), gm.state_dict()
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].device.type == "xla", key
        torch.testing.assert_close(actual[key].cpu(), value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", models.MODELS)
def test_load_state_dict_keeps_every_sharding(name, mesh):
    gm = sharded(name, mesh)
    before = specs_by_name(gm)
    other = models.build(name, seed=1)
    result = gm.load_state_dict(other.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert specs_by_name(gm) == before
    assert any(spec.startswith("{devices=") for spec in before.values())
    assert relative_error(run(gm, name), expected_output(other, name)) <= 1e-5


def test_load_state_dict_sends_every_device_the_whole_tensor(mesh, devices):
    # Measured: param.copy_(cpu_tensor) puts the whole tensor on every device and reshards at the next step.
    gm = sharded("llama", mesh)
    state_dict = models.build("llama", seed=1).state_dict()
    start = host_to_device_bytes()
    gm.load_state_dict(state_dict)
    sent = host_to_device_bytes() - start
    assert sent == devices * sum(t.numel() * t.element_size() for t in state_dict.values())


@pytest.mark.parametrize("name", models.MODELS)
def test_load_sharded_from_safetensors_into_meta_transform(name, mesh, devices, tmp_path):
    from safetensors.torch import save_model

    model = models.build(name)
    save_model(model, str(tmp_path / "model.safetensors"))  # drops tied duplicates, as on the Hub
    reference = sharded(name, mesh)
    meta = models.build(name, device="meta")
    gm = fx_shard.transform(meta, PLANS[name], mesh_shape={"tp": devices}, example_inputs=models.example_inputs(name))

    start = host_to_device_bytes()
    assert load_sharded(gm, tmp_path, mesh, model=meta) is gm
    sent = host_to_device_bytes() - start

    assert relative_error(run(gm, name), expected_output(model, name)) <= 1e-5
    assert not any(t.is_meta for t in [*gm.parameters(), *gm.buffers()])
    assert specs_by_name(gm) == specs_by_name(reference)
    per_device = 0
    for target, record, pname, param in layer_parameters(gm):
        spec = record.specs.get(pname)
        if spec is not None:
            shard = local_shape(param.shape, spec, {"tp": devices})
            assert local_shapes(param) == {shard}, f"{target}.{pname}"
    for param in gm.parameters():  # each shared tensor once
        shard = max(s.data.numel() for s in _local_shards(param)) if sharding_spec(param) else param.numel()
        per_device += shard * param.element_size()
    buffers = sum(b.numel() * b.element_size() for b in gm.buffers())
    # No device ever received more than its own piece of a sharded parameter.
    assert sent == devices * (per_device + buffers)
    for (key, buffer), (_, original) in zip(gm.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(buffer.cpu(), original, rtol=0, atol=0, msg=key)


def _local_shards(param):
    import torch_xla.distributed.spmd as xs

    return xs.XLAShardedTensor(param).local_shards


def test_load_sharded_keeps_ties_and_state_dict(mesh, devices):
    model = models.build("gpt2")
    meta = models.build("gpt2", device="meta")
    gm = fx_shard.transform(meta, PLANS["gpt2"], mesh_shape={"tp": devices})
    load_sharded(gm, {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, mesh, model=meta)
    assert gm.lm_head.weight is gm.transformer.wte.weight
    assert local_shapes(gm.lm_head.weight) == {(256 // devices, 64)}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(gm.state_dict()[key].cpu(), value, rtol=0, atol=0, msg=key)


def test_load_sharded_into_sharded_model_keeps_parameter_objects(mesh):
    gm = sharded("llama-vllm", mesh)
    params = dict(gm.named_parameters())
    before = specs_by_name(gm)
    other = models.build("llama-vllm", seed=1)
    load_sharded(gm, other.state_dict(), mesh)
    assert all(p is params[n] for n, p in gm.named_parameters())
    assert specs_by_name(gm) == before
    assert relative_error(run(gm, "llama-vllm"), expected_output(other, "llama-vllm")) <= 1e-5


def test_load_sharded_conv1d_parts_read_their_columns(mesh, devices, tmp_path):
    from safetensors.torch import save_file

    plan = {"c_attn": QKV_32, "c_proj": "rowwise"}
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = GPT2Like().eval()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        meta = GPT2Like()
    gm = fx_shard.transform(meta, plan, mesh_shape={"tp": devices}, example_inputs=(x,))
    load_sharded(gm, tmp_path / "model.safetensors", mesh)
    assert specs_by_name(gm) == specs_by_name(fx_shard.shard(model, mesh, plan, example_inputs=(x,)))
    assert local_shapes(gm.get_submodule("c_attn.k").weight) == {(32, 32 // devices)}
    with torch.no_grad():
        assert relative_error(gm(x.to(fx_shard.xla_device())), model(x)) <= 1e-5


@pytest.mark.parametrize("source", ["safetensors", "state_dict"])
def test_load_sharded_grouped_qkv_parts_read_every_group(source, mesh, devices, tmp_path):
    from safetensors.torch import save_file

    from tests.toy import GroupedQKV, seeded

    model, x = seeded(GroupedQKV), torch.randn(2, 5, 64)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    plan = {"qkv": {"style": "qkv", "num_heads": 8, "num_kv_heads": 2}, "dense": "rowwise"}
    with torch.device("meta"):
        meta = GroupedQKV()
    gm = fx_shard.transform(meta, plan, mesh_shape={"tp": devices}, example_inputs=(x,))
    load_sharded(gm, tmp_path / "model.safetensors" if source == "safetensors" else model.state_dict(), mesh)
    assert specs_by_name(gm) == specs_by_name(fx_shard.shard(model, mesh, plan, example_inputs=(x,)))
    if devices > 2:  # split by group: k holds row block [32, 40) of group 0 and [80, 88) of group 1
        assert local_shapes(gm.get_submodule("qkv.k").weight) == {(8, 64)}
    with torch.no_grad():
        assert relative_error(gm(x.to(fx_shard.xla_device())), model(x)) <= 1e-5
    for key, value in model.state_dict().items():
        torch.testing.assert_close(gm.state_dict()[key].cpu(), value, rtol=0, atol=0, msg=key)


def test_shard_indices_are_xlas(devices):
    import torch_xla
    import torch_xla.distributed.spmd as xs

    ids = np.arange(devices)[::-1].copy()  # device order differs from mesh order
    mesh = xs.Mesh(ids, (2, devices // 2), ("kv", "tp"))
    local = [int(d.split(":")[-1]) for d in torch_xla._XLAC._xla_get_runtime_devices()]
    cases = [((8, 6), ("tp", None)), ((8, 6), (None, "kv")), ((8, 6), ("kv", "tp")), ((8, 6), (("kv", "tp"), None)),
             ((6, 4), (("tp", "kv"), None)), ((7, 3), ("kv", None))]
    if devices >= 4:  # sub-axes: 2 blocks of consecutive devices along an axis
        cases += [((8, 6), ("tp:2", None)), ((8, 6), (None, ("kv", "tp:2"))), ((6, 4), ("kv", "tp:2"))]
    for shape, spec in cases:
        tensor = torch.zeros(shape).to(fx_shard.xla_device())
        fx_shard.xla.mark(tensor, mesh, spec)
        xla = torch_xla._XLAC._get_local_shard_replica_and_indices([tensor])[0]
        ours = shard_indices(shape, spec, mesh)
        for device, (_, index) in zip(local, xla):
            index = [slice(0, n) for n in shape] if index is Ellipsis else index  # replicated (an axis of size 1)
            assert [(s.start, s.stop) for s in index] == [(s.start, s.stop) for s in ours[device]], (shape, spec)


def test_load_sharded_pads_uneven_shards(mesh, devices):
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    gm = fx_shard.transform(model.to("meta"), {"0": "colwise", "2": "rowwise"}, mesh_shape={"tp": devices})
    # Rows not divisible by the mesh: the planner refuses, so give the record by hand.
    state = {"0.weight": torch.arange(6 * 4.0).reshape(6, 4), "0.bias": torch.arange(6.0),
             "2.weight": torch.ones(4, 6), "2.bias": torch.zeros(4)}
    gm.get_submodule("0").weight = nn.Parameter(torch.empty(6, 4, device="meta"))
    gm.get_submodule("0").bias = nn.Parameter(torch.empty(6, device="meta"))
    gm.get_submodule("2").weight = nn.Parameter(torch.empty(4, 6, device="meta"))
    load_sharded(gm, state, mesh)
    weight = gm.get_submodule("0").weight
    torch.testing.assert_close(weight.cpu(), state["0.weight"], rtol=0, atol=0)
    assert local_shapes(weight) == {(math.ceil(6 / devices), 4)}


def test_load_sharded_errors_say_what_to_do(mesh, devices, tmp_path):
    import torch_xla.distributed.spmd as xs

    meta = models.build("llama", device="meta")
    gm = fx_shard.transform(meta, PLANS["llama"], mesh_shape={"tp": devices})
    state = models.build("llama").state_dict()
    other_mesh = xs.Mesh(np.arange(devices), (devices // 2, 2), ("dp", "tp"))
    with pytest.raises(PlanError, match=r"transformed for mesh \{'tp': \d\} but the mesh given is"):
        load_sharded(gm, state, other_mesh)
    without_head = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with pytest.raises(FxShardError, match=r"missing keys \(1\): lm_head.weight\nthese would stay on meta: lm_head"):
        load_sharded(gm, without_head, mesh, model=meta)
    with pytest.raises(FxShardError, match=r"unexpected keys \(1\): extra"):
        load_sharded(gm, {**state, "extra": torch.ones(1)}, mesh, model=meta)
    bad = {**state, "lm_head.weight": torch.ones(3, 3)}
    with pytest.raises(FxShardError, match=r"'lm_head.weight' has shape \(3, 3\), but lm_head.weight needs \(256, 64"):
        load_sharded(gm, bad, mesh, model=meta)
    assert all(p.is_meta for p in gm.parameters()), "a checkpoint that does not fit changes nothing"
    with pytest.raises(FxShardError, match=r"buffer model.rotary_emb.cos_cached is on meta .* pass model="):
        load_sharded(gm, state, mesh)
    with pytest.raises(FxShardError, match="does not exist"):
        load_sharded(gm, tmp_path / "nothing.safetensors", mesh, model=meta)


def test_torch_distributed_checkpoint_with_spmd_planners(mesh, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner, SPMDSavePlanner

    model = models.build("gpt2")
    gm = sharded("gpt2", mesh)
    # One process, no process group: no_dist=True. The checkpoint has the original keys (qkv fused).
    dcp.save(gm.state_dict(), storage_writer=dcp.FileSystemWriter(tmp_path), planner=SPMDSavePlanner(), no_dist=True)
    saved = dcp.FileSystemReader(tmp_path).read_metadata().state_dict_metadata
    assert set(saved) == set(model.state_dict())
    assert tuple(saved["transformer.h.0.attn.c_attn.weight"].size) == (192, 64)

    target = sharded("gpt2", mesh, seed=1)
    before = specs_by_name(target)
    state_dict = target.state_dict()
    dcp.load(state_dict, storage_reader=dcp.FileSystemReader(tmp_path), planner=SPMDLoadPlanner(), no_dist=True)
    target.load_state_dict(state_dict)  # fused qkv entries are copies: split them into the parts
    assert relative_error(run(target, "gpt2"), expected_output(model, "gpt2")) <= 1e-5
    after = specs_by_name(target)
    for name, spec in before.items():
        # Replicated parameters come back annotated "{replicated}" (before: no annotation); sharded ones unchanged.
        assert after[name] == spec or (spec == "" and after[name] == "{replicated}"), name


@pytest.mark.parametrize("saved", ["state_dict", "save_model", "without_head", "both_keys"])
def test_load_sharded_takes_a_tied_models_own_checkpoint(saved, mesh, devices, tmp_path):
    from safetensors.torch import save_file, save_model

    model = models.build("gpt2")
    state = model.state_dict()
    path = tmp_path / "model.safetensors"
    if saved == "save_model":
        save_model(model, str(path))  # keeps one of the tied keys
    elif saved == "without_head":
        save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, str(path))
    elif saved == "both_keys":
        save_file({k: v.clone() for k, v in state.items()}, str(path))  # safetensors refuses shared tensors
    meta = models.build("gpt2", device="meta")
    gm = fx_shard.transform(meta, PLANS["gpt2"], mesh_shape={"tp": devices})
    load_sharded(gm, state if saved == "state_dict" else path, mesh, model=meta)
    assert gm.lm_head.weight is gm.transformer.wte.weight
    for key, value in state.items():
        torch.testing.assert_close(gm.state_dict()[key].cpu(), value, rtol=0, atol=0, msg=key)


def test_load_sharded_casts_a_bfloat16_checkpoint(mesh, devices):
    model = models.build("llama")
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    meta = models.build("llama", device="meta")
    gm = fx_shard.transform(meta, PLANS["llama"], mesh_shape={"tp": devices})
    load_sharded(gm, state, mesh, model=meta)
    for key, value in state.items():
        loaded = gm.state_dict()[key]
        assert loaded.dtype == torch.float32, key
        torch.testing.assert_close(loaded.cpu(), value.float(), rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("into", ["meta", "sharded"])
def test_load_sharded_is_all_or_nothing(into, mesh, devices, monkeypatch):
    from fx_shard import checkpoint

    meta = models.build("llama", device="meta")
    if into == "meta":
        gm = fx_shard.transform(meta, PLANS["llama"], mesh_shape={"tp": devices})
        before = None
    else:
        gm = sharded("llama", mesh)
        before = {k: v.cpu() for k, v in gm.state_dict().items()}
    read = checkpoint._Reader.read

    def damaged(self, key, index):  # the last tensor read fails, as from a truncated file
        if key == "lm_head.weight":
            raise OSError("unexpected end of file")
        return read(self, key, index)

    monkeypatch.setattr(checkpoint._Reader, "read", damaged)
    with pytest.raises(FxShardError, match=(
        r"reading checkpoint tensor 'lm_head.weight' failed \(OSError: unexpected end of file\); nothing was loaded, "
        r"Llama is as it was: check the checkpoint file"
    )):
        load_sharded(gm, models.build("llama", seed=1).state_dict(), mesh, model=meta)
    if before is None:
        assert all(t.is_meta for t in gm.parameters())
        assert all(t.is_meta for _, t in gm.named_buffers())
    else:
        for key, value in gm.state_dict().items():
            torch.testing.assert_close(value.cpu(), before[key], rtol=0, atol=0, msg=key)


def test_load_sharded_reads_nn_multihead_attentions_packed_keys(mesh, devices, tmp_path):
    """nn.TransformerEncoder's in_proj_weight / in_proj_bias fill the q, k, v parts of its in_proj layer."""
    from safetensors.torch import save_file

    def encoder(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        layer = torch.nn.TransformerEncoderLayer(64, 8, 128, dropout=0.0, batch_first=True)
        return torch.nn.Sequential(torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)).eval()

    model, x = encoder(1), torch.randn(2, 5, 64)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    gm = fx_shard.transform(encoder(0).to("meta"), "auto", mesh_shape={"tp": devices})
    load_sharded(gm, tmp_path, mesh)
    assert local_shapes(gm.get_submodule("0.layers.0.self_attn.in_proj.k").weight) == {(64 // devices, 64)}
    with torch.no_grad():
        assert relative_error(gm(x.to(fx_shard.xla_device())), model(x)) <= 1e-5
    assert list(gm.state_dict()) == list(model.state_dict())
