"""The report on models sharded on the XLA mesh: bytes as torch_xla places them, collectives as XLA partitions
them. (The reports checked in under docs/reports are compared in tests/test_cli.py, at 8 devices.)"""

import pytest
import torch

import fx_shard
from fx_shard import models
from fx_shard.models.plans import PLANS
from fx_shard.report import report_data


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_bytes_and_collectives_as_measured(name, mesh, devices):
    inputs = models.example_inputs(name)
    with torch.no_grad():
        gm = fx_shard.shard(models.build(name), mesh, PLANS[name], example_inputs=inputs)
        counts = fx_shard.collectives(gm, *inputs)
    data = report_data(gm, measured=counts)
    b = data["costs"]["parameter_bytes"]
    assert counts.parameter_bytes == b["per_device"] == b["measured_per_device"]
    c = data["costs"]["collectives"]
    assert c["measured"] == {op: counts[op] for op in c["measured"]}
    assert c["measured"] == c["predicted"], c
    text = fx_shard.report(gm, measured=counts)
    assert "Measured in XLA's partitioned HLO of one forward: as predicted." in text
    assert f"{counts.parameter_bytes:,} B" in text and "equal to the computed per-device bytes" in text

