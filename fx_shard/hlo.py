"""Collectives and memory read from XLA's HLO dump directory.

torch_xla has no call that returns the SPMD-partitioned HLO, so
``fx_shard.init_runtime`` sets ``XLA_FLAGS="--xla_dump_to=DIR
--xla_dump_hlo_as_text"`` while the runtime starts and fx_shard reads what
XLA writes (``fx_shard.xla.hlo_dump_dir()``). This module only parses files:
it never imports torch_xla, so it is safe in a process that must not start XLA.

What the CPU backend writes (torch_xla 2.9.0, measured), per compiled program::

    module_0000.SyncTensorsGraph.6.before_optimizations.txt          pre-partition HLO, no collectives
    module_0000.SyncTensorsGraph.6.cpu_after_optimizations.txt       partitioned per-device HLO
    module_0000.SyncTensorsGraph.6.cpu_after_optimizations-buffer-assignment.txt
    module_0000.SyncTensorsGraph.6.cpu_after_optimizations-memory-usage-report.txt
    module_0000.SyncTensorsGraph.6.debug_options

The memory usage report exists on CPU. It starts with ``Total bytes used: 468
(468B)``: the sum of all buffer allocations of one device's program
(parameters, outputs, temporaries, thread-local scalars), followed by the
allocations sorted by size. That total is what :func:`program_memory` returns;
it is an allocation total, not the live peak. The buffer-assignment file has
the peak ("Live ranges at N (peak)", then ``Stack trace breakdown for peak
usage: 1 248 bytes``, digits grouped by spaces), which is smaller when buffers
are reused; :func:`program_peak_memory` returns it.

Program names: the model's step is ``SyncTensorsGraph.<n>`` (also under
``torch.compile(backend="openxla")``); calling ``.cpu()`` on a sharded result
compiles ``ReplicateShardedData.<n>``, whose all-gather brings the shards to
the host and is not part of the model's computation (see :func:`collectives_in`).
Module numbers restart at 0000 in every process, so use one dump directory
per process: a reused directory has its files overwritten under the same names.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

COLLECTIVE_OPS: tuple[str, ...] = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)

#: Programs that torch_xla compiles to move data, not to run the model.
TRANSFER_PROGRAMS: tuple[str, ...] = ("ReplicateShardedData",)

_PARTITIONED_SUFFIX = "after_optimizations.txt"
_MEMORY_REPORT_SUFFIX = "-memory-usage-report.txt"
_BUFFER_ASSIGNMENT_SUFFIX = "-buffer-assignment.txt"

# Bits per element of HLO primitive types; token/opaque carry no data.
_ELEMENT_BITS: dict[str, int] = {
    "pred": 8,
    "s2": 2, "s4": 4, "s8": 8, "s16": 16, "s32": 32, "s64": 64,
    "u2": 2, "u4": 4, "u8": 8, "u16": 16, "u32": 32, "u64": 64,
    "f16": 16, "bf16": 16, "f32": 32, "f64": 64,
    "c64": 64, "c128": 128,
    "f4e2m1fn": 4,
    "f8e3m4": 8, "f8e4m3": 8, "f8e4m3fn": 8, "f8e4m3fnuz": 8, "f8e4m3b11fnuz": 8,
    "f8e5m2": 8, "f8e5m2fnuz": 8, "f8e8m0fnu": 8,
    "token": 0, "opaque": 0,
}

_COMMENT = re.compile(r"/\*.*?\*/")
_INSTRUCTION_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"\s*(?P<op>[a-z][\w\-]*)\(")
_ARRAY_SHAPE = re.compile(r"\b(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[^\]]*)\]")
_TOTAL_BYTES = re.compile(r"Total bytes used:\s*(\d+)")
_PEAK_BYTES = re.compile(r"peak usage:\s*([\d ,]+) bytes")
_LHS_CONTRACTING = re.compile(r"\blhs_contracting_dims=\{(?P<dims>[\d,]*)\}")


@dataclass(frozen=True)
class CollectiveStats:
    """How many instances of one collective a program has, and the per-device
    bytes of their results (summed), as a cost measure of the communication."""

    count: int
    bytes: int


@dataclass(frozen=True)
class _Instruction:
    name: str
    shape: str
    opcode: str
    operands: str
    attributes: str = ""


def _split_shape(text: str) -> tuple[str, str] | None:
    """Split ``SHAPE rest`` where SHAPE may be a (nested) tuple with spaces
    inside; returns (shape, rest) or None when brackets do not balance."""
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                return None
        elif ch.isspace() and depth == 0:
            return text[:i], text[i:]
    return None


def _matching_paren(text: str, start: int) -> int:
    """Index just past the parenthesis that closes the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _parse_instruction(line: str) -> _Instruction | None:
    """Parse one HLO instruction line (``[ROOT] [%]name = shape opcode(...)``),
    locating the opcode by position so that op names inside metadata strings
    or instruction names never count."""
    line = _COMMENT.sub("", line)
    head = _INSTRUCTION_HEAD.match(line)
    if head is None:
        return None
    split = _split_shape(line[head.end():])
    if split is None:
        return None
    shape, rest = split
    op = _OPCODE.match(rest)
    if op is None:
        return None
    open_paren = op.end() - 1
    close = _matching_paren(rest, open_paren)
    operands = rest[open_paren + 1:close - 1]
    return _Instruction(head.group("name"), shape, op.group("op"), operands, rest[close:].strip())


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets, each part stripped (a
    trailing empty part dropped): the elements of a tuple or an operand list."""
    elements, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            elements.append(text[start:i].strip())
            start = i + 1
    if text[start:].strip():
        elements.append(text[start:].strip())
    return elements


def _top_level_elements(shape: str) -> list[str]:
    """The elements of a tuple shape ``(a, b, ...)``; ``[shape]`` for an array."""
    shape = shape.strip()
    if not shape.startswith("("):
        return [shape]
    return _split_top_level(shape[1:_matching_paren(shape, 0) - 1])


def _dims(text: str) -> list[int]:
    """The sizes in the brackets of an array shape, ``"4,<=8"`` giving [4, 8]
    (a bounded dynamic dimension counts at its bound)."""
    return [int(d.strip().removeprefix("<=")) for d in text.split(",") if d.strip()]


def _array_dims(shape: str) -> list[int] | None:
    """The dimensions of a shape that starts with an array type
    (``f32[4,16]{1,0}``, also ``f32[4,16]{1,0} %operand``); None otherwise
    (a tuple shape, an operand printed without its shape)."""
    match = _ARRAY_SHAPE.match(shape.strip())
    return None if match is None else _dims(match.group("dims"))


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, summing the arrays of a tuple shape.

    Handles layouts (``{1,0:T(8,128)}``), bounded dynamic dims (``<=8``) and
    scalars (``f32[]``); unknown element types count as zero, with a warning.
    """
    total_bits = 0
    for m in _ARRAY_SHAPE.finditer(_COMMENT.sub("", shape)):
        dtype = m.group("dtype")
        bits = _ELEMENT_BITS.get(dtype)
        if bits is None:
            logger.warning("unknown HLO element type %r in shape %r; counted as 0 bytes", dtype, shape)
            continue
        elements = math.prod(_dims(m.group("dims")))
        total_bits += (elements * bits + 7) // 8 * 8
    return total_bits // 8


def _collective_of(opcode: str) -> str | None:
    """The collective an opcode belongs to: the op itself or its ``-start``
    form; ``-done`` and everything else give None."""
    if opcode in COLLECTIVE_OPS:
        return opcode
    base = opcode.removesuffix("-start")
    if base != opcode and base in COLLECTIVE_OPS:
        return base
    return None


def _start_result_shape(inst: _Instruction, done_shapes: dict[str, str]) -> str:
    """The result shape of an async ``-start``: its ``-done``'s shape when the
    done is found; otherwise taken from the start's tuple, which for
    all-gather/collective-permute holds (operand, result, ...)."""
    if inst.name in done_shapes:
        return done_shapes[inst.name]
    elements = _top_level_elements(inst.shape)
    if inst.opcode == "all-reduce-start" or len(elements) < 2:
        return inst.shape
    return elements[1]


def count_collectives(hlo_text: str) -> dict[str, CollectiveStats]:
    """Count the collectives in one HLO module's text, with per-device bytes.

    Every op in COLLECTIVE_OPS is a key (zero when absent). An async pair is
    counted once, as its ``-start``; bytes are the op's result size. Counts are
    static: an op inside a loop body counts once however often it runs.
    """
    instructions = [i for i in map(_parse_instruction, hlo_text.splitlines()) if i is not None]
    done_shapes: dict[str, str] = {}
    for inst in instructions:
        if inst.opcode.endswith("-done") and inst.operands.strip():
            # A done has one operand, printed "%start" or "<shape> %start".
            start_name = inst.operands.split()[-1].lstrip("%")
            done_shapes[start_name] = inst.shape
    counts = dict.fromkeys(COLLECTIVE_OPS, 0)
    sizes = dict.fromkeys(COLLECTIVE_OPS, 0)
    for inst in instructions:
        op = _collective_of(inst.opcode)
        if op is None:
            continue
        shape = _start_result_shape(inst, done_shapes) if inst.opcode.endswith("-start") else inst.shape
        counts[op] += 1
        sizes[op] += shape_bytes(shape)
    return {op: CollectiveStats(counts[op], sizes[op]) for op in COLLECTIVE_OPS}


def matmul_flops(hlo_text: str) -> int:
    """FLOPs of the ``dot`` instructions of one HLO module: 2 x result elements
    x contracted elements for each (a multiply and an add per pair), summed.

    The contracted size is read from the left operand's shape, printed with the
    operand or else that of the instruction defining it. In a partitioned
    module these are per-device FLOPs. Static like :func:`count_collectives`
    (a dot in a loop body counts once); convolutions and custom-call matmuls
    are not counted.
    """
    instructions = [i for i in map(_parse_instruction, hlo_text.splitlines()) if i is not None]
    dims_of = {i.name: dims for i in instructions if (dims := _array_dims(i.shape)) is not None}
    total = 0
    for inst in instructions:
        contracting = _LHS_CONTRACTING.search(inst.attributes)
        operands = _split_top_level(inst.operands)
        if inst.opcode != "dot" or contracting is None or not operands or inst.name not in dims_of:
            continue
        lhs = operands[0]  # "%name" or "f32[4,16]{1,0} %name"
        lhs_dims = _array_dims(lhs)
        if lhs_dims is None:
            lhs_dims = dims_of.get(lhs.split()[-1].lstrip("%"))
        if lhs_dims is None:
            logger.debug("dot %s: shape of its left operand %r not found; not counted", inst.name, lhs)
            continue
        contracted = math.prod(lhs_dims[d] for d in _dims(contracting.group("dims")))
        total += 2 * math.prod(dims_of[inst.name]) * contracted
    return total


def dump_snapshot(dump_dir: str | Path) -> set[str]:
    """Names of the files now in ``dump_dir`` (empty if it does not exist yet),
    to pass as ``after=`` and so get only the programs compiled since."""
    path = Path(dump_dir)
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


def partitioned_modules(dump_dir: str | Path, after: set[str] | None = None) -> list[Path]:
    """The partitioned per-device HLO files (``*after_optimizations.txt``) in
    ``dump_dir``, skipping names in ``after``, oldest first (by modification
    time, then name)."""
    path = Path(dump_dir)
    if not path.is_dir():
        return []
    seen = after or set()
    files = [p for p in path.glob(f"*{_PARTITIONED_SUFFIX}") if p.name not in seen]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def program_name(module_file: Path) -> str:
    """The program's name from a dump file name, e.g. ``SyncTensorsGraph.6``
    from ``module_0000.SyncTensorsGraph.6.cpu_after_optimizations.txt``."""
    parts = Path(module_file).name.split(".")
    return ".".join(parts[1:-2]) if len(parts) > 3 else Path(module_file).stem


def is_transfer_program(module_file: Path) -> bool:
    """True for programs torch_xla compiles to move data (ReplicateShardedData)."""
    return program_name(module_file).split(".")[0] in TRANSFER_PROGRAMS


def _report_bytes(dump_dir: str | Path, module_file: Path, suffix: str, pattern: re.Pattern) -> int | None:
    """The byte count ``pattern`` finds in the report named ``module_file`` +
    ``suffix`` in ``dump_dir`` (digit groups joined), or None."""
    report = Path(dump_dir) / (Path(module_file).name.removesuffix(".txt") + suffix)
    if not report.is_file():
        logger.debug("no report %s", report)
        return None
    match = pattern.search(report.read_text(errors="replace"))
    return int(re.sub(r"[ ,]", "", match.group(1))) if match else None


def program_memory(dump_dir: str | Path, module_file: Path) -> int | None:
    """Per-device bytes allocated by a program: ``Total bytes used`` from the
    memory usage report written beside ``module_file``, or None when there is
    no report (or it has no total)."""
    return _report_bytes(dump_dir, module_file, _MEMORY_REPORT_SUFFIX, _TOTAL_BYTES)


def program_peak_memory(dump_dir: str | Path, module_file: Path) -> int | None:
    """Per-device live peak of a program's buffers: the ``peak usage`` of the
    buffer assignment written beside ``module_file`` (at most
    :func:`program_memory`, less when buffers are reused), or None when there
    is no buffer assignment (or it has no peak)."""
    return _report_bytes(dump_dir, module_file, _BUFFER_ASSIGNMENT_SUFFIX, _PEAK_BYTES)


def collectives_in(files: list[Path], include_transfers: bool = False) -> dict[str, CollectiveStats]:
    """Collectives summed over several partitioned programs.

    A step may compile more than one program, and the collectives of a step
    are spread over all that run, so summing (not picking the largest file,
    which can be the wrong one for tiny models) is the right total. Programs
    that only move data to the host (``ReplicateShardedData``, compiled by
    ``.cpu()`` on a sharded tensor, one all-gather) are left out unless
    ``include_transfers``.
    """
    counts = dict.fromkeys(COLLECTIVE_OPS, 0)
    sizes = dict.fromkeys(COLLECTIVE_OPS, 0)
    for file in files:
        if not include_transfers and is_transfer_program(file):
            logger.debug("skipping transfer program %s", file.name)
            continue
        for op, stats in count_collectives(Path(file).read_text(errors="replace")).items():
            counts[op] += stats.count
            sizes[op] += stats.bytes
    return {op: CollectiveStats(counts[op], sizes[op]) for op in COLLECTIVE_OPS}


_METADATA = re.compile(r",?\s*metadata=\{[^}]*\}")
_NUMBERED_REFERENCE = re.compile(r"(%[\w\-]+)\.\d+")


def program_signature(hlo_text: str) -> Counter:
    """What a program computes, independent of instruction names and order.

    Each instruction as ``shape opcode attributes`` (operands and metadata
    left out), counted. Two texts of one program, as torch_xla hands it to
    XLA (``_get_xla_tensors_hlo``) and as XLA dumps it before optimizing,
    differ in names, numbering and parameter order, but not here; it is how
    ``fx_shard.collectives`` finds an earlier dump of a cached program.
    """
    signature: Counter = Counter()
    for inst in map(_parse_instruction, hlo_text.splitlines()):
        if inst is not None:
            attributes = _NUMBERED_REFERENCE.sub(r"\1", _METADATA.sub("", inst.attributes))
            signature[f"{inst.shape} {inst.opcode} {attributes}"] += 1
    return signature


def partitioned_module_of(dump_dir: str | Path, signature: Counter) -> Path | None:
    """The partitioned HLO file of the dumped program whose pre-optimization text has ``signature``."""
    for before in sorted(Path(dump_dir).glob("*before_optimizations.txt")):
        if program_signature(before.read_text(errors="replace")) == signature:
            prefix = before.name.removesuffix("before_optimizations.txt")
            return next(iter(sorted(Path(dump_dir).glob(f"{prefix}*{_PARTITIONED_SUFFIX}"))), None)
    return None
