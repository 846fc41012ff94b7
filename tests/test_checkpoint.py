"""Checkpoints without XLA: original keys on save and load, fused rows, shard indices, lazy reads, buffers.

What needs a device (load_sharded itself, torch.distributed.checkpoint) is in tests/spmd/test_checkpoint.py.
"""

from contextlib import ExitStack
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fx_shard
from fx_shard import models
from fx_shard.checkpoint import _device_pieces, _Location, _Reader, _split_parts, _unsaved_buffers, shard_indices
from fx_shard.errors import FxShardError
from fx_shard.models.plans import PLANS
from tests.toy import QKV_32


def transformed(name, seed=0, device=None):
    model = models.build(name, seed=seed, device=device)
    inputs = models.example_inputs(name)
    return model, fx_shard.transform(model, PLANS[name], mesh_shape={"tp": 4}, example_inputs=inputs)


def fake_mesh(ids, shape, names):
    """What shard_indices reads of an xs.Mesh, without an XLA runtime."""
    ids = np.asarray(ids)
    logical = ids.reshape(shape)
    return SimpleNamespace(device_ids=ids, mesh_shape=shape, axis_names=names, get_logical_mesh=lambda: logical)


@pytest.mark.parametrize("name", models.MODELS)
def test_transformed_state_dict_is_the_original(name):
    model, gm = transformed(name)
    expected, actual = model.state_dict(), gm.state_dict()
    assert list(actual) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", models.MODELS)
def test_original_checkpoint_loads_into_transformed_model(name):
    _, gm = transformed(name)
    other = models.build(name, seed=1)
    result = gm.load_state_dict(other.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    inputs = models.example_inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), other(*inputs))


def test_split_parts_map_to_their_rows_of_the_fused_tensor():
    _, gm = transformed("gpt2")
    parts = _split_parts(gm)
    k = _Location("transformer.h.0.attn.c_attn.k.weight", "transformer.h.0.attn.c_attn.weight", (192, 64), 0, 64, 64)
    assert parts[k.name] == k
    v = _Location("transformer.h.1.attn.c_attn.v.bias", "transformer.h.1.attn.c_attn.bias", (192,), 0, 128, 64)
    assert parts[v.name] == v
    assert len(parts) == 2 * 3 * 2  # 2 blocks, q/k/v, weight and bias

    _, gm = transformed("llama-vllm")
    parts = _split_parts(gm)
    q, kv = 8 * 8, 2 * 8  # 8 heads, 2 KV heads, head_dim 8
    assert parts["model.layers.0.self_attn.qkv_proj.v.weight"].offset == q + kv
    up = parts["model.layers.0.mlp.gate_up_proj.1.weight"]
    assert up.key == "model.layers.0.mlp.gate_up_proj.weight" and up.offset * 2 == up.key_shape[0]


def test_shard_indices_tile_like_xla():
    mesh = fake_mesh(range(4), (4,), ("tp",))
    assert shard_indices((8, 3), ("tp", None), mesh) == [(slice(2 * i, 2 * i + 2), slice(0, 3)) for i in range(4)]
    assert shard_indices((8, 3), None, mesh) == [(slice(0, 8), slice(0, 3))] * 4
    # Uneven: shards of ceil(6 / 4) = 2 rows; the last device's is empty (XLA pads it).
    assert [s[0] for s in shard_indices((6,), ("tp",), mesh)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 6)]

    # Devices 3, 1, 0, 2 laid out as a 2 x 2 (kv, tp) mesh; results are indexed by device id.
    mesh = fake_mesh([3, 1, 0, 2], (2, 2), ("kv", "tp"))
    rows = [s[0] for s in shard_indices((8, 4), (("kv", "tp"), None), mesh)]
    assert rows == [slice(4, 6), slice(2, 4), slice(6, 8), slice(0, 2)]
    cols = [s[1] for s in shard_indices((8, 4), (None, "tp"), mesh)]
    assert cols == [slice(0, 2), slice(2, 4), slice(2, 4), slice(0, 2)]


def test_pieces_read_only_each_devices_rows_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    fused = torch.arange(12 * 2, dtype=torch.float32).reshape(12, 2)  # [q: 4 | k: 4 | v: 4] rows
    save_file({"qkv.weight": fused}, str(tmp_path / "w.safetensors"))
    with ExitStack() as stack:
        reader = _Reader(stack, tmp_path / "w.safetensors")
        handle = reader._files["qkv.weight"]
        reads = []
        reader._files["qkv.weight"] = SimpleNamespace(
            get_slice=lambda key: _Recorder(handle.get_slice(key), reads),
            get_tensor=handle.get_tensor,
        )
        k = _Location("qkv.k.weight", "qkv.weight", (12, 2), 0, 4)
        pieces = _device_pieces(reader, k, (4, 2), ("tp", None), fake_mesh(range(4), (4,), ("tp",)), torch.float32)
    assert [p.tolist() for p in pieces] == [fused[4 + i : 5 + i].tolist() for i in range(4)]
    assert reads == [(slice(4 + i, 5 + i), slice(0, 2)) for i in range(4)]


class _Recorder:
    def __init__(self, safe_slice, reads):
        self._slice, self._reads = safe_slice, reads

    def __getitem__(self, index):
        self._reads.append(index)
        return self._slice[index]


@pytest.mark.parametrize("name", ["llama", "llama-vllm", "gpt2"])
def test_meta_buffers_are_recomputed_on_the_cpu(name):
    model = models.build(name)
    meta, gm = transformed(name, device="meta")
    buffers = {group.owners[0]: value for group, value in _unsaved_buffers(gm, meta)}
    expected = dict(model.named_buffers())
    assert len(buffers) == len(expected) > 0
    for (path, field), value in buffers.items():
        assert value.device.type == "cpu"
        torch.testing.assert_close(value, expected[f"{path}.{field}"], rtol=0, atol=0)
    assert all(b.is_meta for b in meta.buffers()), "the caller's model is left alone"
    with pytest.raises(FxShardError, match="is on meta and no checkpoint holds it"):
        _unsaved_buffers(gm, None)


def test_conv1d_parts_sit_along_the_fused_columns():
    from transformers.pytorch_utils import Conv1D

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(3 * 32, 32)

        def forward(self, x):
            q, k, v = self.c_attn(x).split(32, dim=2)
            return q * k + v

    inputs = (torch.randn(1, 5, 32),)
    gm = fx_shard.transform(Attention(), {"c_attn": QKV_32}, mesh_shape={"tp": 4}, example_inputs=inputs)
    parts = _split_parts(gm)
    assert parts["c_attn.k.weight"] == _Location("c_attn.k.weight", "c_attn.weight", (32, 96), 1, 32, 32)
    assert parts["c_attn.v.bias"] == _Location("c_attn.v.bias", "c_attn.bias", (96,), 0, 64, 32)


# What load_sharded refuses is refused before it starts an XLA runtime, so these run on the CPU with a mesh stand-in.
MESH4 = fake_mesh(range(4), (4,), ("tp",))


def meta_gpt2():
    meta = models.build("gpt2", device="meta")
    return meta, fx_shard.transform(meta, PLANS["gpt2"], mesh_shape={"tp": 4})


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_load_sharded_refuses_a_dtype_that_is_not_a_cast(dtype):
    meta, gm = meta_gpt2()
    state = {k: v.to(dtype) if k == "transformer.h.0.mlp.c_fc.weight" else v for k, v in models.build("gpt2").state_dict().items()}
    with pytest.raises(FxShardError, match=(
        rf"checkpoint tensor 'transformer.h.0.mlp.c_fc.weight' is {dtype}, but transformer.h.0.mlp.c_fc.weight is "
        rf"torch.float32; load a checkpoint of this model .* or convert that tensor first \(tensor.to\(torch.float32\)"
    )):
        fx_shard.load_sharded(gm, state, MESH4, model=meta)
    assert all(p.is_meta for p in gm.parameters()), "nothing was written"


def test_load_sharded_refuses_different_values_under_tied_keys():
    meta, gm = meta_gpt2()
    state = models.build("gpt2").state_dict()
    state["lm_head.weight"] = state["lm_head.weight"].clone() + 1  # an untied checkpoint
    with pytest.raises(FxShardError, match=(
        r"the checkpoint holds different values at 'transformer.wte.weight' and 'lm_head.weight', but the model ties "
        r"transformer.wte.weight and lm_head.weight \(one tensor\); load a checkpoint of a tied model"
    )):
        fx_shard.load_sharded(gm, state, MESH4, model=meta)


def test_tied_keys_saved_twice_are_compared_block_by_block(tmp_path):
    from safetensors.torch import save_file

    state = models.build("gpt2").state_dict()
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(tmp_path / "both.safetensors"))
    with ExitStack() as stack:
        reader = _Reader(stack, tmp_path / "both.safetensors")
        assert reader.same("transformer.wte.weight", "lm_head.weight")
        assert not reader.same("transformer.wte.weight", "transformer.wpe.weight")  # another shape
        assert reader.dtypes["transformer.wte.weight"] == torch.float32


def test_a_missing_key_that_would_stay_on_meta_does_not_suggest_strict_false():
    meta, gm = meta_gpt2()
    state = {k: v for k, v in models.build("gpt2").state_dict().items() if k != "transformer.h.0.mlp.c_fc.weight"}
    with pytest.raises(FxShardError) as error:
        fx_shard.load_sharded(gm, state, MESH4, model=meta, strict=False)
    assert str(error.value) == (
        "the checkpoint does not match the model:\n"
        "missing keys (1): transformer.h.0.mlp.c_fc.weight\n"
        "these would stay on meta: transformer.h.0.mlp.c_fc.weight\n"
        "load a checkpoint of this model that holds them (original keys; fused QKV as saved)"
    )


@pytest.mark.parametrize("zipped", [True, False])
def test_load_sharded_says_a_torch_save_file_is_not_safetensors(zipped, tmp_path):
    meta, gm = meta_gpt2()
    path = tmp_path / "model.safetensors"
    torch.save(models.build("gpt2").state_dict(), path, _use_new_zipfile_serialization=zipped)
    what = "a zip archive, as torch.save writes" if zipped else "a pickle file, as torch.save writes"
    with pytest.raises(FxShardError, match=(
        rf"model.safetensors is not a safetensors file \({what}.*\); convert it once with "
        r"safetensors.torch.save_file\(torch.load\(.*, weights_only=True\), 'model.safetensors'\) .*"
        r"or pass the state_dict itself"
    )):
        fx_shard.load_sharded(gm, path, MESH4, model=meta)
    path.rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FxShardError, match=r"no \*.safetensors file in .* \(it has pytorch_model.bin: convert with safetensors.torch.save_file"):
        fx_shard.load_sharded(gm, tmp_path, MESH4, model=meta)
