"""Run the tests under tests/spmd on XLA CPU meshes of 2, 4 and 8 devices, one process each.

Each child's progress is shown as it runs (one dot per test, by file) and its
counts close the session's summary (tests/conftest.py).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SPMD = Path(__file__).parent / "spmd"
_RESULT = re.compile(r"^(\S+)::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
_MARKS = {"PASSED": ".", "FAILED": "F", "ERROR": "E", "SKIPPED": "s", "XFAIL": "x", "XPASS": "X"}


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_spmd_suite(devices, tmp_path, capsys, request):
    # The child's own temp dir: what its XLA dump (and anything else fx_shard writes there) leaves behind shows.
    env = {**os.environ, "FX_SHARD_DEVICES": str(devices), "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices),
           "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(SPMD)]
    lines, current = [], None
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            match = _RESULT.match(line)
            if match:
                with capsys.disabled():
                    if match.group(1) != current:
                        current = match.group(1)
                        print(f"\n    {devices} devices: {Path(current).name} ", end="", flush=True)
                    print(_MARKS[match.group(2)], end="", flush=True)
        code = proc.wait(timeout=1800)
    summary = next((line.strip("= \n") for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)), "no summary")
    results = getattr(request.config, "fx_shard_spmd_results", {})
    results[devices] = summary
    request.config.fx_shard_spmd_results = results
    output = "".join(lines)
    assert code == 0, f"{devices} devices:\n{output[-16000:]}"
    assert sorted(p.name for p in tmp_path.glob("fx_shard*")) == []
