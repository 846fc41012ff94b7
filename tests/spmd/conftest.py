"""Runs inside a child process whose XLA runtime has FX_SHARD_DEVICES virtual devices."""

import os

import pytest
import torch

import fx_shard

DEVICES = int(os.environ["FX_SHARD_DEVICES"])


def pytest_configure(config):
    config.addinivalue_line("markers", "devices(n): run only in the child whose mesh has n devices (the suite's time budget)")


def pytest_collection_modifyitems(config, items):
    """Deselect (not skip) tests marked for another device count: each runs once, in the child it names."""
    elsewhere = [item for item in items if (mark := item.get_closest_marker("devices")) and mark.args[0] != DEVICES]
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = [item for item in items if item not in elsewhere]


@pytest.fixture(scope="session")
def devices() -> int:
    return fx_shard.init_runtime(DEVICES)


@pytest.fixture(scope="session")
def mesh(devices):
    return fx_shard.make_mesh()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| over the output's scale, max |expected|."""
    return ((actual.cpu() - expected).abs().max() / expected.abs().max()).item()


def local_shapes(tensor: torch.Tensor) -> set[tuple[int, ...]]:
    """The shapes of ``tensor``'s shards on each device, as torch_xla reports them."""
    import torch_xla.distributed.spmd as xs

    return {tuple(shard.data.shape) for shard in xs.XLAShardedTensor(tensor).local_shards}


def sharding_spec(tensor: torch.Tensor) -> str:
    import torch_xla

    return torch_xla._XLAC._get_xla_sharding_spec(tensor)
