"""Run the tests under tests/spmd on XLA CPU meshes of 2, 4 and 8 devices, one process each."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SPMD = Path(__file__).parent / "spmd"


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_spmd_suite(devices, tmp_path):
    # The child's own temp dir: what its XLA dump (and anything else fx_shard writes there) leaves behind shows.
    env = {**os.environ, "FX_SHARD_DEVICES": str(devices), "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices),
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(SPMD)],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, f"{devices} devices:\n{proc.stdout[-12000:]}\n{proc.stderr[-4000:]}"
    assert sorted(p.name for p in tmp_path.glob("fx_shard*")) == []
