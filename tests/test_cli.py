"""The README's commands: the main job runs and agrees with the unsharded model; CI runs the test command."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"^\s*(pip install .+)$", (ROOT / "README.md").read_text(), flags=re.M)[:2]


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()
    assert main_job.endswith("fx-shard demo")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def run_cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """``fx-shard ARGS`` in a child process, which starts its own XLA runtime, with ``tmp`` as its temp dir.

    A child that exits 0 leaves nothing of fx_shard's there (its HLO dump is removed at exit).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES", "FX_SHARD_DEVICES")}
    tmp.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "fx_shard.cli", *args], env={**env, "TMPDIR": str(tmp)},
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 0:
        assert sorted(p.name for p in tmp.glob("fx_shard*")) == [], f"fx-shard {args[0]} left files in {tmp}"
    return proc


def test_checked_in_reports_are_current(tmp_path):
    # The reports under docs/reports are made at 8 devices, measured: regenerate them in a child with 8.
    out = tmp_path / "reports"
    proc = run_cli(tmp_path / "tmp", "report", "all", "--devices", "8", "--measure", "--format", "markdown",
                   "--output-dir", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    checked_in = sorted(p.name for p in (ROOT / "docs" / "reports").glob("*.md"))
    assert checked_in == sorted(p.name for p in out.glob("*.md"))
    stale = [name for name in checked_in if (ROOT / "docs" / "reports" / name).read_text() != (out / name).read_text()]
    assert not stale, (
        f"docs/reports/{', '.join(stale)} stale; regenerate: "
        "fx-shard report all --devices 8 --measure --format markdown --output-dir docs/reports"
    )


@pytest.mark.parametrize(("model", "devices"), [("llama", 8), ("gpt2", 2)])
def test_demo_agrees_with_unsharded(model, devices, tmp_path):
    proc = run_cli(tmp_path, "demo", "--model", model, "--devices", str(devices))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert f"{model}: sharded over {devices} XLA devices" in out
    assert "(within 1e-05)" in out
    # 2 blocks: 2 all-reduces each, 1 for the vocabulary-parallel embedding, nothing else.
    assert "collectives in one forward (XLA's partitioned HLO): all-reduce 5\n" in out
    layer = "model.layers.0.self_attn.q_proj" if model == "llama" else "transformer.h.0.attn.c_attn.q"
    assert re.search(rf"^{re.escape(layer)}\s+colwise\s", out, flags=re.M), out
