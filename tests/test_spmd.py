"""Run the tests under tests/spmd on XLA CPU meshes of 2, 4 and 8 devices, one process each.

The three children start together, when collection ends (tests/conftest.py):
compiling is mostly one thread, so they share the cores with each other and
with this process's own tests better than one after the other. Each test
streams its child's progress (one dot per test, by file), what it printed
before its turn first, and its counts close the session's summary.
"""

import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

SPMD = Path(__file__).parent / "spmd"
DEVICE_COUNTS = (2, 4, 8)
_RESULT = re.compile(r"^(\S+)::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
_MARKS = {"PASSED": ".", "FAILED": "F", "ERROR": "E", "SKIPPED": "s", "XFAIL": "x", "XPASS": "X"}


class Child:
    """One pytest child on a mesh of ``devices``, in a temp dir of its own; its output read into a queue as it
    comes (None at the end)."""

    def __init__(self, devices: int) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"fx_shard_tests_spmd{devices}_")
        self.tmp = Path(self._tmp.name)
        # The child's own temp dir: what its XLA dump (and anything else fx_shard writes there) leaves behind shows.
        env = {**os.environ, "FX_SHARD_DEVICES": str(devices), "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices),
               "TMPDIR": str(self.tmp)}
        command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(SPMD)]
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._tmp.cleanup()


@pytest.fixture(scope="module")
def children(request):
    return request.config.fx_shard_spmd_children


@pytest.mark.parametrize("devices", DEVICE_COUNTS)
def test_spmd_suite(devices, children, capsys, request):
    child = children[devices]
    lines, current = [], None
    while (line := child.lines.get(timeout=1800)) is not None:
        lines.append(line)
        match = _RESULT.match(line)
        if match:
            with capsys.disabled():
                if match.group(1) != current:
                    current = match.group(1)
                    print(f"\n    {devices} devices: {Path(current).name} ", end="", flush=True)
                print(_MARKS[match.group(2)], end="", flush=True)
    code = child.proc.wait(timeout=60)
    summary = next((line.strip("= \n") for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)), "no summary")
    results = getattr(request.config, "fx_shard_spmd_results", {})
    results[devices] = summary
    request.config.fx_shard_spmd_results = results
    output = "".join(lines)
    assert code == 0, f"{devices} devices:\n{output[-16000:]}"
    assert sorted(p.name for p in child.tmp.glob("fx_shard*")) == []
