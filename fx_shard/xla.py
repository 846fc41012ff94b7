"""The one door to torch_xla: runtime set-up, meshes, materialization, and every torch_xla call fx_shard makes.

Only this module imports torch_xla, and only inside functions, so capture,
planning, the passes and the report run without it. Other modules (the
compile backend, checkpoints, collective counting) call the functions here.
"""

from __future__ import annotations

import atexit
import glob
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from fx_shard.axes import DATA_AXES, Spec, axis_names, split_sub_axis
from fx_shard.capture import generate_code
from fx_shard.constraint import ShardingConstraint
from fx_shard.errors import FxShardError, PlanError
from fx_shard.sharding import layer_parameters, model_sharding

__all__ = [
    "MESH_KEY", "aot_mark_sharding", "compilations", "global_tensor_from_shards", "hlo_dump_dir", "init_runtime", "local_shard_bytes",
    "make_mesh", "mark", "materialize", "mesh_for", "mesh_shape_of", "param_specs", "place_constraint",
    "require_hlo_dump", "runtime_device_ids", "shard_batch", "step", "sync", "tensors_hlo", "to_device_keeping_ties",
    "xla_device",
]

logger = logging.getLogger(__name__)

DEFAULT_CPU_DEVICES = 8
#: Where ``materialize`` keeps the mesh on the model (``root.meta``), for whatever shards tensors beside it (a KV cache).
MESH_KEY = "fx_shard_mesh"


def _torch_xla():
    try:
        import torch_xla
        import torch_xla.distributed.spmd  # noqa: F401
        import torch_xla.runtime  # noqa: F401
    except ImportError as e:
        raise FxShardError(
            "materializing on an XLA device needs torch_xla; install it with "
            "`pip install torch==2.9.0 torch_xla==2.9.0` (or use fx_shard.transform, which needs no XLA)"
        ) from e
    return torch_xla


@dataclass(frozen=True)
class _Runtime:
    """What the runtime of this process started with: its device count and where XLA dumps HLO text (or None)."""

    devices: int
    dump: Path | None


_runtime: _Runtime | None = None

# What fx_shard sets only while the runtime starts (XLA reads them then), and restores after. PJRT_DEVICE
# stays set: torch_xla reads it after the start too (xr.device_type()), and sets it itself on import.
_RESTORED_AFTER_START = ("XLA_FLAGS", "CPU_NUM_DEVICES")
_DUMP_TO = re.compile(r"--xla_dump_to=(\S+)")
_AS_TEXT = "--xla_dump_hlo_as_text"


def init_runtime(num_devices: int | None = None, *, hlo_dump: bool | str | os.PathLike | None = None) -> int:
    """Start the XLA runtime in SPMD mode and return its device count.

    With no ``PJRT_DEVICE`` set and no TPU attached, choose torch_xla's CPU
    backend with ``num_devices`` virtual devices (default 8).

    ``hlo_dump`` says where XLA writes the HLO text that
    ``fx_shard.collectives`` counts in (XLA reads its flags once, when the
    runtime starts):

    - ``True``, and ``None`` (the default) when this call starts the runtime:
      a new temporary directory ``fx_shard_hlo_*``, removed when the
      interpreter exits (or the directory ``XLA_FLAGS`` already names with
      ``--xla_dump_to``, left alone);
    - a path: that directory, never removed;
    - ``False``: no dump (``collectives`` then raises). This is how
      ``make_mesh``, ``xla_device`` and ``shard`` start the runtime when
      nothing started it before them: dumping costs compile time and disk.

    ``XLA_FLAGS`` and ``CPU_NUM_DEVICES`` are set only while the runtime
    starts and then restored, so child processes see the caller's values;
    ``PJRT_DEVICE`` stays set (torch_xla reads it after the start).

    The device count and the dump are fixed once the runtime starts: a later
    call asking for another count or another dump raises rather than
    silently using the first.
    """
    global _runtime
    starting = _runtime is None
    if starting:
        _runtime = _start(num_devices, hlo_dump)
    count, dump = _runtime.devices, _runtime.dump
    if num_devices is not None and num_devices != count:
        raise FxShardError(
            f"the XLA runtime of this process has {count} devices, not {num_devices}; the count is read once "
            "when the runtime starts: start a new process for another size"
        )
    # Starting, False is met even when the user's own XLA_FLAGS dump: fx_shard added none.
    if hlo_dump is not None and not (starting and hlo_dump is False) and not _same_dump(hlo_dump, dump):
        started = f"dumping HLO text to {dump}" if dump is not None else "without an HLO dump"
        raise FxShardError(
            f"the XLA runtime of this process started {started}, not as hlo_dump={hlo_dump!r} asks; XLA reads "
            "its flags once, when the runtime starts: start a new process for another dump"
        )
    return count


def _started() -> _Runtime:
    """This process's runtime; started without a dump if nothing started it (counting was not asked for)."""
    global _runtime
    if _runtime is None:
        _runtime = _start(None, False)
    return _runtime


def _start(num_devices: int | None, hlo_dump: bool | str | os.PathLike | None) -> _Runtime:
    """Start the runtime with the dump ``hlo_dump`` asks for, or take the one something else started."""
    saved = {name: os.environ.get(name) for name in _RESTORED_AFTER_START}  # before torch_xla's import adds flags
    if "PJRT_DEVICE" not in os.environ and not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
        os.environ["PJRT_DEVICE"] = "CPU"
    torch_xla = _torch_xla()
    xr = torch_xla.runtime
    if torch_xla._XLAC._xla_runtime_is_initialized():  # started before fx_shard: with the flags set then
        if not xr.is_spmd():
            xr.use_spmd()
        return _Runtime(xr.global_runtime_device_count(), _dump_in(os.environ.get("XLA_FLAGS", "")))
    try:
        if os.environ.get("PJRT_DEVICE") == "CPU":  # also when importing torch_xla chose the CPU
            os.environ.setdefault("CPU_NUM_DEVICES", str(num_devices or DEFAULT_CPU_DEVICES))
        flags = os.environ["XLA_FLAGS"] = _with_dump(os.environ.get("XLA_FLAGS", ""), hlo_dump)
        if not xr.is_spmd():
            xr.use_spmd()
        count = xr.global_runtime_device_count()  # starts the runtime, which reads XLA_FLAGS now (measured)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return _Runtime(count, _dump_in(flags))


def _with_dump(flags: str, hlo_dump: bool | str | os.PathLike | None) -> str:
    """``flags`` (XLA_FLAGS) with the dump ``hlo_dump`` asks for; a temporary directory is removed at exit."""
    if hlo_dump is False:
        return flags
    if hlo_dump is None or hlo_dump is True:
        if _dump_flag(flags) is None:
            dump = Path(tempfile.mkdtemp(prefix="fx_shard_hlo_"))
            atexit.register(_remove_dump, dump, os.getpid())
            flags += f" --xla_dump_to={dump}"
    else:
        dump = Path(hlo_dump).expanduser().resolve()
        dump.mkdir(parents=True, exist_ok=True)
        flags = f"{_DUMP_TO.sub('', flags)} --xla_dump_to={dump}"
    if _AS_TEXT not in flags:
        flags += f" {_AS_TEXT}"
    return " ".join(flags.split())


def _dump_flag(flags: str) -> str | None:
    """The directory ``--xla_dump_to`` names in ``flags`` (the last one, as XLA reads them), or None."""
    found = _DUMP_TO.findall(flags)
    return found[-1] if found else None


def _dump_in(flags: str) -> Path | None:
    """The directory XLA started with ``flags`` writes HLO text to, or None."""
    named = _dump_flag(flags)
    return Path(named) if named and _AS_TEXT in flags else None


def _same_dump(wanted: bool | str | os.PathLike, dump: Path | None) -> bool:
    if isinstance(wanted, bool):
        return wanted == (dump is not None)
    return dump is not None and Path(wanted).expanduser().resolve() == dump.resolve()


def _remove_dump(dump: Path, owner: int) -> None:
    """At exit, remove fx_shard's own dump directory (not from a forked child that inherited the hook)."""
    if os.getpid() == owner:
        shutil.rmtree(dump, ignore_errors=True)


def hlo_dump_dir() -> Path | None:
    """The directory this process's XLA writes HLO text to, as fixed when ``init_runtime`` started it.

    None before the runtime started, or when it started without a dump.
    """
    return None if _runtime is None else _runtime.dump


def require_hlo_dump() -> Path:
    """``hlo_dump_dir()``, starting the runtime with a dump if nothing started it; else an ``FxShardError``
    saying how to get one when it started without."""
    init_runtime()
    dump = hlo_dump_dir()
    if dump is None:
        raise FxShardError(
            "fx_shard.collectives reads the HLO that XLA dumps, but this process's XLA runtime started without a "
            "dump: make_mesh, xla_device and shard start it so unless fx_shard.init_runtime() came first (or it was "
            "init_runtime(hlo_dump=False), or the runtime started outside fx_shard with no --xla_dump_to in "
            "XLA_FLAGS). XLA reads its flags once, when the runtime starts: in a new process, call "
            "fx_shard.init_runtime() before anything else starts XLA (init_runtime(hlo_dump=DIR) keeps the files)"
        )
    return dump


def xla_device() -> torch.device:
    """The XLA device (SPMD's single logical device), starting the runtime (without a dump) if needed."""
    _started()
    return _torch_xla().device()


def make_mesh(tp: int | None = None, *, dp: int = 1, fsdp: int = 1, kv: int | None = None):
    """A mesh over all XLA devices, axes named, data axes outer: ``("dp", "fsdp", ["kv"], "tp")``.

    ``dp`` and ``fsdp`` split the batch (``shard_batch``); parameters are
    also sharded over ``fsdp`` (``fx_shard.fsdp``). A data axis of size 1 is
    left out. ``tp`` defaults to the devices the data axes leave.

    ``kv`` splits the ``tp`` devices into ``kv`` groups, axes ``("kv", "tp")``:
    for grouped-query attention with fewer KV heads than devices, k/v are
    sharded over ``kv`` and everything else over both axes, so each device's
    q heads find their k/v group locally (no collective, k/v not replicated).
    """
    import numpy as np

    count = _started().devices
    xs = _torch_xla().distributed.spmd
    for name, size in (("dp", dp), ("fsdp", fsdp), ("tp", tp)):
        if size is not None and size < 1:
            raise PlanError(f"make_mesh: {name}={size} is not a mesh axis size; give a positive number of devices")
    tp = tp if tp is not None else count // (dp * fsdp)
    if dp * fsdp * tp != count:
        raise PlanError(
            f"make_mesh: dp={dp} x fsdp={fsdp} x tp={tp} covers {dp * fsdp * tp} devices, but this process has "
            f"{count}; a mesh must cover every device: choose sizes whose product is {count}"
        )
    if kv is not None and (kv < 1 or tp % kv):
        raise PlanError(f"kv={kv} does not divide tp={tp}; choose a kv that divides it (KV heads per group)")
    shape, names = ((kv, tp // kv), ("kv", "tp")) if kv is not None else ((tp,), ("tp",))
    data = [(name, size) for name, size in zip(DATA_AXES, (dp, fsdp)) if size > 1]
    shape, names = (*(size for _, size in data), *shape), (*(name for name, _ in data), *names)
    return xs.Mesh(np.arange(count), shape, names)


def shard_batch(batch: Any, mesh) -> Any:
    """``batch`` (a tensor or a pytree of tensors) on the XLA device, dimension 0 split over the data axes.

    The mesh's data axes (``dp``, ``fsdp``: those present, outer first) split
    the batch dimension together, as one spec entry; the other dimensions are
    replicated (over ``tp``), the layout a data- and tensor-parallel step
    expects. Leaves that are not tensors are returned as they are.
    """
    from torch.utils._pytree import tree_map

    shape = mesh_shape_of(mesh)
    data = tuple(a for a in DATA_AXES if a in shape)
    ways = math.prod(shape[a] for a in data)
    device = xla_device()

    def place(x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.dim() == 0 or x.shape[0] % ways:
            raise PlanError(
                f"shard_batch: a batch of shape {tuple(x.shape)} does not split over the data axes "
                f"{' x '.join(f'{a}={shape[a]}' for a in data)} ({ways} devices) on dimension 0; "
                f"give a batch size that is a multiple of {ways}"
            )
        x = x.to(device)
        if data:
            mark(x, mesh, (data[0] if len(data) == 1 else data, *(None,) * (x.dim() - 1)))
        return x

    return tree_map(place, batch)


def mesh_shape_of(mesh) -> dict[str, int]:
    """``{axis name: size}`` of an ``xs.Mesh`` (or ``HybridMesh``)."""
    names = getattr(mesh, "axis_names", None)
    shape = getattr(mesh, "mesh_shape", None)
    if shape is None:
        raise PlanError(f"{mesh!r} is not a torch_xla mesh; build one with fx_shard.make_mesh or xs.Mesh")
    if names is None:
        raise PlanError(
            f"the mesh of shape {tuple(shape)} has no axis names; build it with axis_names, "
            "e.g. xs.Mesh(ids, shape, ('tp',)), so plans can name axes"
        )
    return dict(zip(names, shape))


def mesh_for(mesh, spec: Spec) -> tuple[object, Spec]:
    """``(mesh, spec)`` as torch_xla takes them: each sub-axis ``"tp:k"`` an axis of a finer view of ``mesh``.

    The view splits axis ``tp`` of size n into ``("tp:k", "tp:k/")`` of sizes
    (k, n/k) over the same devices in the same order; the spec's ``"tp:k"``
    names the first, and a whole ``"tp"`` both. Without sub-axes, unchanged.
    """
    split = dict(split_sub_axis(a) for entry in spec for a in axis_names(entry) if ":" in a)
    if not split:
        return mesh, spec
    import numpy as np

    shape, names, whole = [], [], {}
    for name, size in zip(mesh.axis_names, mesh.mesh_shape):
        if name in split:
            major = f"{name}:{split[name]}"
            whole[name] = (major, f"{major}/")
            shape += [split[name], size // split[name]]
            names += whole[name]
        else:
            shape.append(size)
            names.append(name)
    view = _torch_xla().distributed.spmd.Mesh(np.asarray(mesh.get_logical_mesh()).ravel(), tuple(shape), tuple(names))
    expand = lambda entry: tuple(n for a in axis_names(entry) for n in whole.get(a, (a,)))  # noqa: E731
    return view, tuple(None if entry is None else expand(entry) for entry in spec)


def mark(tensor: torch.Tensor, mesh, spec: Spec) -> None:
    """``xs.mark_sharding(tensor, mesh, spec)``, sub-axes included."""
    view, spec = mesh_for(mesh, spec)
    _torch_xla().distributed.spmd.mark_sharding(tensor, view, spec)


def materialize(gm: fx.GraphModule, mesh) -> fx.GraphModule:
    """Move ``gm`` to the XLA device and shard each parameter as its node's record says.

    A parameter shared by several layers (tied embeddings) is marked once;
    two records asking different specs for it is an error. Sharding
    constraints in the graph get the mesh.
    """
    generate_code(gm)
    to_device_keeping_ties(gm, xla_device())
    for param, spec, owner in param_specs(gm).values():
        mark(param, mesh, spec)
        logger.debug("%s: %s", owner, spec)
    for module in gm.modules():
        if isinstance(module, ShardingConstraint):
            place_constraint(module, mesh)
    gm.meta[MESH_KEY] = mesh
    summary = model_sharding(gm)
    for path in summary.outside:  # layers outside graphs: a hook, not a node
        record = summary.layers[path]
        if record.output_spec is not None:
            constraint = ShardingConstraint(record.output_spec)
            place_constraint(constraint, mesh)
            gm.get_submodule(path).register_forward_hook(lambda module, args, out, c=constraint: _constrain_first(c, out))
    return gm


def place_constraint(constraint: ShardingConstraint, mesh) -> None:
    """Give a ``ShardingConstraint`` its mesh, as torch_xla takes it (sub-axes resolved), and the marking call.

    The mesh's text is made here, outside any trace: dynamo cannot trace ``str(mesh)``.
    """
    view, spec = mesh_for(mesh, constraint.spec)
    constraint.place(view, spec, str(view), _mark_activation)


def _mark_activation(x: torch.Tensor, mesh, mesh_text: str, spec: Spec) -> torch.Tensor:
    """Pin ``x``'s sharding: torch_xla's op form when traced (dynamo and aot_autograd keep it), else eagerly."""
    if torch.compiler.is_compiling():
        return torch.ops.xla.aot_mark_sharding(x, mesh_text, str(spec))
    _torch_xla().distributed.spmd.mark_sharding(x, mesh, spec)
    return x


def aot_mark_sharding():
    """torch_xla's ``aot_mark_sharding`` op (``(tensor, mesh text, spec text)``), which aot_autograd can trace."""
    _torch_xla()  # registers torch.ops.xla
    return torch.ops.xla.aot_mark_sharding.default


def sync(tensors: list[torch.Tensor]) -> None:
    """Compute ``tensors`` on the device now (one XLA program)."""
    _torch_xla()._XLAC._xla_sync_multi(tensors, [], True, True)


def step() -> None:
    """End the traced step: compute every pending tensor (one XLA program) and start the next trace afresh.

    Unlike ``sync``, this also resets torch_xla's random seed to a device value,
    so a step that samples traces the same program every time.
    """
    _torch_xla().sync()


def compilations() -> int:
    """How many programs XLA has compiled in this process so far (torch_xla's ``CompileTime`` metric)."""
    _torch_xla()
    import torch_xla.debug.metrics as metrics

    data = metrics.metric_data("CompileTime")
    return data[0] if data else 0


def tensors_hlo(tensors: list[torch.Tensor]) -> str:
    """The HLO text of the program that would compute ``tensors`` (before SPMD partitioning)."""
    return _torch_xla()._XLAC._get_xla_tensors_hlo(tensors)


def local_shard_bytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` takes on one device: its local shard if sharded, else all of it."""
    torch_xla = _torch_xla()
    if torch_xla._XLAC._get_xla_sharding_spec(tensor):
        shard, _device = torch_xla._XLAC._get_local_shards([tensor])[0][0]
        return shard.numel() * tensor.element_size()
    return tensor.numel() * tensor.element_size()


def runtime_device_ids() -> list[int]:
    """The ids of this process's addressable XLA devices, in runtime order."""
    return [int(d.split(":")[-1]) for d in _torch_xla()._XLAC._xla_get_runtime_devices()]


def global_tensor_from_shards(pieces: list[torch.Tensor], mesh, spec: Spec, shape: list[int]) -> torch.Tensor:
    """A sharded XLA tensor of ``shape`` built from each device's piece (in ``runtime_device_ids`` order)."""
    view, spec = mesh_for(mesh, spec)
    return _torch_xla()._XLAC._global_tensor_from_cpu_shards(pieces, view.get_op_sharding(tuple(spec)), shape)


def _constrain_first(constraint, output):
    if isinstance(output, tuple):
        return (constraint(output[0]), *output[1:])
    return constraint(output)


def to_device_keeping_ties(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module.to(device)``, except that a Parameter shared by several layers stays one tensor.

    ``Module.to`` makes a new Parameter per owner when moving to XLA, which
    would double tied embeddings (and train them as two tensors).
    """
    moved: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) not in moved:
                    data = tensor.detach().to(device)
                    is_param = isinstance(tensor, torch.nn.Parameter)
                    moved[id(tensor)] = torch.nn.Parameter(data, tensor.requires_grad) if is_param else data
                table[name] = moved[id(tensor)]
    return module


def param_specs(gm: fx.GraphModule) -> dict[int, tuple[torch.nn.Parameter, tuple, str]]:
    """Each sharded parameter once, by identity, with its spec and owning parameter name (layers' first)."""
    specs: dict[int, tuple[torch.nn.Parameter, tuple, str]] = {}
    for target, record, name, param in layer_parameters(gm):
        spec = record.specs.get(name)
        if spec is None:
            continue
        owner = f"{target}.{name}"
        seen = specs.get(id(param))
        if seen is not None and seen[1] != spec:
            raise PlanError(
                f"{owner} is the same tensor as {seen[2]} but the plan shards it {spec} there and "
                f"{seen[1]} here; give both layers styles that agree (e.g. 'vocab' and 'lm_head')"
            )
        specs[id(param)] = (param, spec, owner)
    for name, spec in model_sharding(gm).unplanned.items():  # parameters of no layer, on an fsdp mesh
        param = gm.get_parameter(name)
        specs.setdefault(id(param), (param, spec, name))
    return specs
