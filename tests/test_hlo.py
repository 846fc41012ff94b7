"""Tests for fx_shard.hlo: HLO text parsing, and the real dump of a CPU mesh.

The real tests run XLA in a subprocess: the device count and XLA_FLAGS are
read once per process, and this pytest process must not start the runtime.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fx_shard.hlo import (
    COLLECTIVE_OPS,
    CollectiveStats,
    collectives_in,
    count_collectives,
    dump_snapshot,
    matmul_flops,
    partitioned_modules,
    program_memory,
    program_name,
    program_peak_memory,
    shape_bytes,
)

ZERO = CollectiveStats(0, 0)


def nonzero(counts: dict[str, CollectiveStats]) -> dict[str, CollectiveStats]:
    return {op: s for op, s in counts.items() if s != ZERO}


# --- parsing -----------------------------------------------------------------


def test_empty_text_has_every_op_at_zero():
    counts = count_collectives("")
    assert tuple(counts) == COLLECTIVE_OPS
    assert set(counts.values()) == {ZERO}


@pytest.mark.parametrize(
    "shape, expected",
    [
        ("f32[4,8]{1,0}", 128),
        ("bf16[4,8]{1,0}", 64),
        ("f16[3]{0}", 6),
        ("f64[2,2]", 32),
        ("s32[5]", 20),
        ("s64[5]", 40),
        ("u32[2]", 8),
        ("u8[7]", 7),
        ("s8[7]", 7),
        ("pred[10]{0}", 10),
        ("f32[]", 4),
        ("f32[<=8,2]{1,0}", 64),
        ("bf16[8,128]{1,0:T(8,128)(2,1)}", 2048),
        ("(f32[2,4]{1,0}, f32[8]{0})", 64),
        ("((f32[2]), bf16[4], s32[])", 8 + 8 + 4),
        ("(f32[], /*index=1*/f32[2])", 12),
        ("token[]", 0),
    ],
)
def test_shape_bytes(shape, expected):
    assert shape_bytes(shape) == expected


def test_sync_ops_with_tuple_result_and_root():
    hlo = """
HloModule m, entry_computation_layout={(f32[2,4]{1,0}, f32[8]{0})->(f32[2,4]{1,0}, f32[8]{0})}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %a = f32[] add(%x, %y)
}

ENTRY %main (p0: f32[2,4], p1: f32[8]) -> (f32[2,4], f32[8]) {
  %p0 = f32[2,4]{1,0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  %rs = f32[2]{0} reduce-scatter(%p1), replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  %a2a = s32[4,4]{1,0} all-to-all(%p0), replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %ar = (f32[2,4]{1,0}, f32[8]{0}) all-reduce(%p0, %p1), channel_id=1, to_apply=%add
}
"""
    assert nonzero(count_collectives(hlo)) == {
        "all-reduce": CollectiveStats(1, 32 + 32),
        "reduce-scatter": CollectiveStats(1, 8),
        "all-to-all": CollectiveStats(1, 64),
    }


def test_async_start_done_counted_once_with_result_bytes():
    hlo = """
ENTRY %main (p: bf16[16,16], q: f32[4,2]) -> f32[4,8] {
  %p = bf16[16,16]{1,0} parameter(0)
  %q = f32[4,2]{1,0} parameter(1)
  %ars = bf16[16,16]{1,0} all-reduce-start(%p), channel_id=1, to_apply=%add
  %ard = bf16[16,16]{1,0} all-reduce-done(%ars)
  %ags = (f32[4,2]{1,0}, f32[4,8]{1,0}) all-gather-start(%q), channel_id=2, dimensions={1}
  %agd = f32[4,8]{1,0} all-gather-done((f32[4,2]{1,0}, f32[4,8]{1,0}) %ags)
  %cps = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%q), source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8]{0} collective-permute-done(%cps)
  ROOT %t = (f32[4,8]{1,0}) tuple(%agd)
}
"""
    assert nonzero(count_collectives(hlo)) == {
        "all-reduce": CollectiveStats(1, 16 * 16 * 2),
        "all-gather": CollectiveStats(1, 4 * 8 * 4),
        "collective-permute": CollectiveStats(1, 8 * 4),
    }


def test_collectives_print_as_a_short_summary():
    from fx_shard.collectives import Collectives

    stats = count_collectives("""
  %ar = f32[16,64]{1,0} all-reduce(f32[16,64]{1,0} %a), to_apply=%add
  %ar.1 = f32[16,64]{1,0} all-reduce(f32[16,64]{1,0} %b), to_apply=%add
  %ag = f32[4,8]{1,0} all-gather(f32[4,2]{1,0} %q), dimensions={1}
""")
    counts = Collectives(stats=stats, memory_bytes=123_456, parameter_bytes=58_624, programs=("SyncTensorsGraph.1",))
    text = "Collectives(all-reduce=2, all-gather=1; results 8.1 KiB per device; parameters 57.2 KiB per device)"
    assert str(counts) == repr(counts) == text  # 2 * 16 * 64 * 4 + 4 * 8 * 4 bytes = 8,320 B
    idle = Collectives(stats=count_collectives(""), memory_bytes=None, parameter_bytes=900, programs=())
    assert str(idle) == "Collectives(none; parameters 900 B per device)"
    assert counts["all-reduce"] == 2 and dict(counts.nonzero()) == {"all-reduce": 2, "all-gather": 1}


def test_async_start_without_done_uses_result_element():
    hlo = """
  %ags = (f32[4,2]{1,0}, f32[4,8]{1,0}) all-gather-start(%q), dimensions={1}
  %cps = (bf16[8]{0}, bf16[8]{0}, u32[], u32[]) collective-permute-start(%q), source_target_pairs={{0,1}}
"""
    counts = count_collectives(hlo)
    assert counts["all-gather"] == CollectiveStats(1, 128)
    assert counts["collective-permute"] == CollectiveStats(1, 16)


def test_lines_without_percent_and_names_or_metadata_that_look_like_ops():
    hlo = """
ENTRY main.5 {
  param = bf16[2,3]{1,0} parameter(0)
  all-gather.3 = bf16[2,3]{1,0} add(param, param), metadata={op_name="all-gather(x)"}
  dot = bf16[2,3]{1,0} multiply(all-gather.3, param), metadata={op_name="reduce-scatter(y) all-reduce(z)"}
  ROOT all-reduce.1 = bf16[2,3]{1,0} all-reduce(dot), channel_id=1, replica_groups=[1,4]<=[4], to_apply=add
}
"""
    assert nonzero(count_collectives(hlo)) == {"all-reduce": CollectiveStats(1, 12)}


def test_async_wrapped_collective_counted_once_in_its_computation():
    # Newer XLA wraps some collectives in async-start/async-done; the wrapped
    # computation holds the real op, which is what counts.
    hlo = """
%wrapped_reduce_scatter (p: f32[8]) -> f32[2] {
  %p = f32[8]{0} parameter(0)
  ROOT %reduce-scatter.1 = f32[2]{0} reduce-scatter(%p), dimensions={0}, to_apply=%add
}

ENTRY %main (x: f32[8]) -> f32[2] {
  %x = f32[8]{0} parameter(0)
  %s = ((f32[8]{0}), f32[2]{0}, s32[]) async-start(%x), calls=%wrapped_reduce_scatter
  ROOT %d = f32[2]{0} async-done(%s), calls=%wrapped_reduce_scatter
}
"""
    assert nonzero(count_collectives(hlo)) == {"reduce-scatter": CollectiveStats(1, 8)}


def test_matmul_flops_of_plain_batched_and_fused_dots():
    # As XLA's CPU backend dumps a partitioned module (operands without shapes),
    # plus one dot printed with its operands' shapes and one inside a fusion.
    hlo = """
%fused_computation (p0: f32[4,16], p1: f32[8,16]) -> f32[4,8] {
  %p0 = f32[4,16]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  ROOT %dot.3 = f32[4,8]{1,0} dot(f32[4,16]{1,0} %p0, f32[8,16]{1,0} %p1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}

ENTRY %main (param: f32[4,4], param.1: f32[8,4], param.3: f32[2,4,5], param.4: f32[2,5,6], param.5: f32[4,16], param.6: f32[8,16]) -> f32[4,8] {
  %param = f32[4,4]{1,0} parameter(0)
  %param.1 = f32[8,4]{1,0} parameter(1)
  %param.3 = f32[2,4,5]{2,1,0} parameter(2)
  %param.4 = f32[2,5,6]{2,1,0} parameter(3)
  %param.5 = f32[4,16]{1,0} parameter(4)
  %param.6 = f32[8,16]{1,0} parameter(5)
  %dot = f32[4,8]{1,0} dot(%param, %param.1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  %dot.2 = f32[2,4,6]{2,1,0} dot(%param.3, %param.4), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
  %add = f32[4,8]{1,0} add(%dot, %dot), metadata={op_name="dot(x)"}
  ROOT %f = f32[4,8]{1,0} fusion(%param.5, %param.6), kind=kOutput, calls=%fused_computation
}
"""
    # 2 x result elements x contracted size: 2*32*4 + 2*48*5 + 2*32*16
    assert matmul_flops(hlo) == 256 + 480 + 1024
    assert matmul_flops("") == 0


# --- dump directory ------------------------------------------------------------


def _write(path: Path, text: str, mtime: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime, mtime))


def test_dump_dir_files_snapshot_memory_and_transfers(tmp_path):
    assert dump_snapshot(tmp_path / "missing") == set()
    assert partitioned_modules(tmp_path / "missing") == []
    ar = "  %all-reduce = f32[4,8]{1,0} all-reduce(%dot), to_apply=%add\n"
    ag = "  %all-gather = f32[4,8]{0,1} all-gather(%copy), dimensions={1}\n"
    first = tmp_path / "module_0000.SyncTensorsGraph.6.cpu_after_optimizations.txt"
    _write(first, ar, 3_000_000_000)
    _write(tmp_path / "module_0000.SyncTensorsGraph.6.before_optimizations.txt", "", 1)
    _write(
        tmp_path / "module_0000.SyncTensorsGraph.6.cpu_after_optimizations-buffer-assignment.txt",
        "Total bytes used: 1284 (1.3KiB)\n  Live ranges at 10 (peak):\n    dot.1{}: 48 bytes (cumulative: 1248 bytes)\n"
        "  Stack trace breakdown for peak usage: 1 248 bytes\n",
        1,
    )
    _write(
        tmp_path / "module_0000.SyncTensorsGraph.6.cpu_after_optimizations-memory-usage-report.txt",
        "Total bytes used: 468 (468B)\n\nAllocations sorted by size:\n",
        1,
    )
    snap = dump_snapshot(tmp_path)
    later = tmp_path / "module_0001.ReplicateShardedData.6.cpu_after_optimizations.txt"
    _write(later, ag, 2_000_000_000)  # older mtime than `first`: order is by mtime
    middle = tmp_path / "module_0002.SyncTensorsGraph.9.cpu_after_optimizations.txt"
    _write(middle, ar, 2_500_000_000)

    assert partitioned_modules(tmp_path) == [later, middle, first]
    assert partitioned_modules(tmp_path, after=snap) == [later, middle]
    assert program_name(first) == "SyncTensorsGraph.6"
    assert program_memory(tmp_path, first) == 468
    assert program_memory(tmp_path, later) is None
    assert program_peak_memory(tmp_path, first) == 1248
    assert program_peak_memory(tmp_path, later) is None

    files = partitioned_modules(tmp_path)
    assert nonzero(collectives_in(files)) == {"all-reduce": CollectiveStats(2, 256)}
    assert nonzero(collectives_in(files, include_transfers=True)) == {
        "all-reduce": CollectiveStats(2, 256),
        "all-gather": CollectiveStats(1, 128),
    }


# --- real XLA dump (subprocess, 4 virtual CPU devices) ---------------------------

SCRIPT = """
import sys
import numpy as np
import torch
import torch_xla
import torch_xla.runtime as xr
import torch_xla.distributed.spmd as xs

xr.use_spmd()
assert xr.global_runtime_device_count() == 4
mesh = xs.Mesh(np.arange(4), (4,), ("tp",))
dev = torch_xla.device()
x = torch.randn(4, 16).to(dev)
w = torch.randn(8, 16).to(dev)
if sys.argv[1] == "row":
    xs.mark_sharding(x, mesh, (None, "tp"))
    xs.mark_sharding(w, mesh, (None, "tp"))
else:
    xs.mark_sharding(w, mesh, ("tp", None))
y = x @ w.T
torch_xla.sync()
print("SHARDING", torch_xla._XLAC._get_xla_sharding_spec(y))
y.cpu()
"""


def run_xla(dump_dir: Path, mode: str) -> str:
    env = {
        **os.environ,
        "PJRT_DEVICE": "CPU",
        "CPU_NUM_DEVICES": "4",
        "XLA_FLAGS": f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_row_parallel_matmul_has_one_all_reduce(tmp_path):
    run_xla(tmp_path, "row")
    files = partitioned_modules(tmp_path)
    # One program; the result is replicated, so .cpu() needs no transfer program.
    assert [program_name(f).split(".")[0] for f in files] == ["SyncTensorsGraph"]
    assert nonzero(collectives_in(files)) == {"all-reduce": CollectiveStats(1, 4 * 8 * 4)}
    # The CPU backend writes a memory usage report: measured 468 bytes per device
    # (params 64 + 128, result 128, the dot's temp 128, tuple and scalars 20).
    memory = program_memory(tmp_path, files[0])
    assert memory is not None and memory >= 64 + 128 + 128
    # Each device's dot: f32[4,8] result, 16 / 4 = 4 contracted elements.
    assert matmul_flops(files[0].read_text()) == 2 * 4 * 8 * 4
    peak = program_peak_memory(tmp_path, files[0])
    assert peak is not None and 128 <= peak <= memory


def test_column_parallel_matmul_needs_no_collective(tmp_path):
    out = run_xla(tmp_path, "col")
    assert "SHARDING {devices=[1,4]0,1,2,3}" in out  # y stays sharded on its last dim
    files = partitioned_modules(tmp_path)
    # Measured: the step itself has no collective. y.cpu() on the sharded y then
    # compiles a second program, ReplicateShardedData, with one all-gather of the
    # f32[4,8] result to bring it to the host; collectives_in leaves it out
    # unless asked.
    assert [program_name(f).split(".")[0] for f in files] == ["SyncTensorsGraph", "ReplicateShardedData"]
    assert nonzero(collectives_in(files)) == {}
    assert nonzero(collectives_in(files, include_transfers=True)) == {
        "all-gather": CollectiveStats(1, 4 * 8 * 4)
    }


def test_program_signature_ignores_names_numbering_order_and_metadata():
    from fx_shard.hlo import program_signature

    ours = """HloModule IrToHlo.6, entry_computation_layout={(f32[8,16]{1,0})->(f32[8]{0})}
%AddComputation.2 (x.3: f32[], y.4: f32[]) -> f32[] {
  ROOT %add.5 = f32[] add(f32[] %x.3, f32[] %y.4)
}
ENTRY %IrToHlo.6 (p0.1: f32[8,16]) -> (f32[8]) {
  %p0.1 = f32[8,16]{1,0} parameter(0), sharding={devices=[1,4]0,1,2,3}
  %constant.7 = f32[] constant(0)
  %reduce.8 = f32[8]{0} reduce(f32[8,16]{1,0} %p0.1, f32[] %constant.7), dimensions={1}, to_apply=%AddComputation.2, metadata={op_type="aten__sum"}
  ROOT %tuple.9 = (f32[8]{0}) tuple(f32[8]{0} %reduce.8)
}"""
    dumped = """HloModule SyncTensorsGraph.16, num_partitions=4
%AddComputation.12 (x.13: f32[], y.14: f32[]) -> f32[] {
  ROOT %add.15 = f32[] add(%x.13, %y.14)
}
ENTRY %SyncTensorsGraph.16 (p0.11: f32[8,16]) -> (f32[8]) {
  %constant.17 = f32[] constant(0)
  %p0.11 = f32[8,16]{1,0} parameter(0), sharding={devices=[1,4]0,1,2,3}
  %reduce.18 = f32[8]{0} reduce(%p0.11, %constant.17), dimensions={1}, to_apply=%AddComputation.12
  ROOT %tuple.19 = (f32[8]{0}) tuple(%reduce.18)
}"""
    assert program_signature(ours) == program_signature(dumped)
    resharded = dumped.replace("devices=[1,4]0,1,2,3", "devices=[4,1]0,1,2,3")
    assert program_signature(ours) != program_signature(resharded)
