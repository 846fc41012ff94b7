"""The report on models sharded on the XLA mesh: bytes as torch_xla places them, collectives as XLA partitions
them, and the reports checked in under docs/reports regenerated at 8 devices."""

from pathlib import Path

import pytest
import torch
from conftest import DEVICES

import fx_shard
from fx_shard import models
from fx_shard.cli import main
from fx_shard.models.plans import PLANS
from fx_shard.report import report_data

REPORTS = Path(__file__).parent.parent.parent / "docs" / "reports"


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


@pytest.mark.skipif(DEVICES != 8, reason="the checked-in reports are for 8 devices")
@pytest.mark.parametrize("name", models.MODELS)
def test_checked_in_report_is_current(name, devices, tmp_path):
    assert main(["report", name, "--devices", "8", "--measure", "--format", "markdown", "--output-dir", str(tmp_path)]) == 0
    fresh = (tmp_path / f"{name}.md").read_text()
    assert (REPORTS / f"{name}.md").read_text() == fresh, (
        f"docs/reports/{name}.md is stale; regenerate: "
        "fx-shard report all --devices 8 --measure --format markdown --output-dir docs/reports"
    )
