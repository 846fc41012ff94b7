"""fx_shard.xla's runtime start: the HLO dump it sets up, and what it leaves behind (nothing).

One test starts XLA, in a child process (the device count and XLA_FLAGS are
read once per process, and this pytest process must not start the runtime);
the others check the choices without starting it.
"""

import json
import os
import subprocess
import sys

import pytest

from fx_shard import xla
from fx_shard.errors import FxShardError

# A flag of the user's that XLA must still see, and that its dump's debug_options file shows (not a default).
USER_FLAGS = "--xla_cpu_enable_fast_min_max=false"

CHILD = r"""
import json, os, subprocess, sys
import torch
import fx_shard
from fx_shard import models
from fx_shard.models.plans import PLANS
from fx_shard.xla import hlo_dump_dir

before = {k: os.environ.get(k) for k in ("XLA_FLAGS", "CPU_NUM_DEVICES")}
assert fx_shard.init_runtime(2) == 2
after = {k: os.environ.get(k) for k in ("XLA_FLAGS", "CPU_NUM_DEVICES")}
model = models.build("gpt2")
inputs = models.example_inputs("gpt2")
with torch.no_grad():
    gm = fx_shard.shard(model, fx_shard.make_mesh(), PLANS["gpt2"], example_inputs=inputs)
    counts = fx_shard.collectives(gm, *inputs).nonzero()
dump = hlo_dump_dir()
options = "".join(p.read_text() for p in dump.glob("*.debug_options"))
show = "import json, os; print(json.dumps({k: os.environ.get(k) for k in ('XLA_FLAGS', 'CPU_NUM_DEVICES')}))"
grandchild = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, check=True).stdout
print(json.dumps({"before": before, "after": after, "grandchild": json.loads(grandchild), "counts": counts,
                  "dump": str(dump), "files": len(list(dump.iterdir())), "options": options,
                  "pjrt_device": os.environ.get("PJRT_DEVICE")}))
"""


def test_runtime_leaves_environment_and_temp_dir_as_they_were(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES", "FX_SHARD_DEVICES")}
    env.update(XLA_FLAGS=USER_FLAGS, TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    original = {"XLA_FLAGS": USER_FLAGS, "CPU_NUM_DEVICES": None}
    # The runtime had 2 devices and dumped (the count is exact), with the user's flag too, into the child's
    # temp dir; the child's environment and its own children's are the user's again.
    assert seen["counts"] == {"all-reduce": 5}  # 2 blocks x 2, and the vocabulary-parallel embedding
    assert seen["dump"].startswith(str(tmp_path / "fx_shard_hlo_")) and seen["files"] > 0
    assert "xla_cpu_enable_fast_min_max: false" in seen["options"]
    assert seen["before"] == seen["after"] == seen["grandchild"] == original
    assert seen["pjrt_device"] == "CPU"  # torch_xla reads it after the start: it stays (docs/usage.md)
    # ... and at exit the dump went.
    assert sorted(p.name for p in tmp_path.glob("fx_shard*")) == []


def test_dump_flags_added_only_when_asked(tmp_path):
    # False: the flags as they were; a path: that directory instead of the user's, created, with text HLO;
    # the default with a directory already named: the user's, made text.
    assert xla._with_dump("--a=1", False) == "--a=1"
    named = xla._with_dump("--xla_dump_to=/x --a=1", tmp_path / "d")
    assert named == f"--a=1 --xla_dump_to={tmp_path / 'd'} --xla_dump_hlo_as_text"
    assert (tmp_path / "d").is_dir()
    assert xla._with_dump("--xla_dump_to=/x", None) == "--xla_dump_to=/x --xla_dump_hlo_as_text"
    assert xla._dump_in("--xla_dump_to=/x --xla_dump_hlo_as_text") == xla.Path("/x")
    assert xla._dump_in("--xla_dump_to=/x") is None


def test_a_runtime_started_on_the_way_does_not_dump(monkeypatch):
    # make_mesh / xla_device / shard start the runtime with hlo_dump=False when nothing started it; counting
    # (collectives, through require_hlo_dump) starts it with the default dump. (A stand-in start: no XLA here.)
    asked = []
    monkeypatch.setattr(xla, "_start", lambda devices, hlo_dump: asked.append(hlo_dump) or xla._Runtime(8, None))
    monkeypatch.setattr(xla, "_runtime", None)
    assert xla._started().devices == 8 and asked == [False]
    monkeypatch.setattr(xla, "_runtime", None)
    with pytest.raises(FxShardError):
        xla.require_hlo_dump()
    assert asked == [False, None]  # None: init_runtime's default, a dump
    # Started with hlo_dump=False while the user's XLA_FLAGS name a dump: theirs is read, and that is no conflict.
    monkeypatch.setattr(xla, "_start", lambda devices, hlo_dump: xla._Runtime(8, xla.Path("/theirs")))
    monkeypatch.setattr(xla, "_runtime", None)
    assert xla.init_runtime(hlo_dump=False) == 8 and xla.hlo_dump_dir() == xla.Path("/theirs")


def test_collectives_without_a_dump_says_how_to_get_one(monkeypatch, tmp_path):
    # A runtime started with hlo_dump=False (as if: nothing starts XLA here).
    monkeypatch.setattr(xla, "_runtime", xla._Runtime(devices=2, dump=None))
    with pytest.raises(FxShardError, match=r"call fx_shard.init_runtime\(\) before anything else starts XLA"):
        xla.require_hlo_dump()
    assert xla.init_runtime(2, hlo_dump=False) == 2
    with pytest.raises(FxShardError, match="started without an HLO dump, not as hlo_dump=True asks"):
        xla.init_runtime(hlo_dump=True)
    monkeypatch.setattr(xla, "_runtime", xla._Runtime(devices=2, dump=tmp_path))
    assert xla.require_hlo_dump() == tmp_path
    assert xla.init_runtime(hlo_dump=tmp_path) == 2
    with pytest.raises(FxShardError, match="start a new process for another dump"):
        xla.init_runtime(hlo_dump=tmp_path / "other")
