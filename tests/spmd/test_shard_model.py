"""shard_model: the drop-in for vLLM's tpu_distributed_utils.shard_model."""

import numpy as np
import pytest
import torch
import torch_xla.distributed.spmd as xs
from conftest import local_shapes, relative_error

import fx_shard
from fx_shard import models
from fx_shard.layers import QKVParallelLinear, RowParallelLinear
from fx_shard.split_linear import SplitLinear


@pytest.fixture
def vllm_mesh(devices):
    """The mesh as vLLM's TPU worker builds it."""
    return xs.Mesh(np.array(range(devices)), (devices, 1), ("x", "y"))


def test_shard_model_in_place_matches_unsharded(vllm_mesh, devices):
    model = models.build("llama-vllm")
    (ids,) = models.example_inputs("llama-vllm")
    with torch.no_grad():
        expected = model(ids)
        model.to(fx_shard.xla_device())
        assert fx_shard.shard_model(model, vllm_mesh) is None
        actual = model(ids.to(fx_shard.xla_device()))
    assert relative_error(actual, expected) <= 1e-5

    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    assert isinstance(attn.qkv_proj, SplitLinear)
    # q/k/v split, each sharded on dim 0 (vLLM: ('x', None)); row-parallel on dim 1.
    assert local_shapes(attn.qkv_proj.q.weight) == {(64 // devices, 64)}
    assert local_shapes(attn.qkv_proj.k.weight) == {(16 // devices, 64)}
    assert local_shapes(attn.o_proj.weight) == {(64, 64 // devices)}
    # Unlike vLLM's exact-name match, the merged gate_up (a ColumnParallelLinear subclass) is sharded too.
    assert isinstance(mlp.gate_up_proj, SplitLinear)
    assert local_shapes(mlp.gate_up_proj.get_submodule("0").weight) == {(128 // devices, 64)}
    assert local_shapes(mlp.down_proj.weight) == {(64, 128 // devices)}
    assert local_shapes(model.model.embed_tokens.weight) == {(256 // devices, 64)}


def test_shard_model_recognises_subclasses(vllm_mesh, devices):
    class MyQKV(QKVParallelLinear):
        pass

    class MyRow(RowParallelLinear):
        pass

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = MyQKV(32, 4, 8, 8, bias=True)
            self.out = MyRow(32, 32, bias=True)

        def forward(self, x):
            qkv, _ = self.qkv(x)
            q, k, v = qkv.chunk(3, dim=-1)
            y, _ = self.out(q * k + v)
            return y

    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(2, 32)
    expected = block(x)
    block.to(fx_shard.xla_device())
    fx_shard.shard_model(block, vllm_mesh)
    assert isinstance(block.qkv, SplitLinear)
    assert local_shapes(block.qkv.v.bias) == {(32 // devices,)}
    assert local_shapes(block.out.weight) == {(32, 32 // devices)}
    assert relative_error(block(x.to(fx_shard.xla_device())), expected) <= 1e-5
