"""Load an original checkpoint straight into a rewritten model's sharded layout.

A rewritten GraphModule keeps the model's ``state_dict`` keys (a split QKV
saves fused, see ``SplitLinear``), so ``gm.state_dict()`` and
``gm.load_state_dict(original)`` work as they do on the model. Plain
``load_state_dict`` on a sharded model keeps every parameter's sharding, but
``param.copy_`` first sends the whole tensor to every device and reshards it
on the next step. ``load_sharded`` sends each device only its own piece:

>>> model = models.build("llama", device="meta")            # nothing allocated
>>> gm = fx_shard.transform(model, plan, mesh_shape={"tp": 8}, example_inputs=inputs)
>>> load_sharded(gm, "checkpoint/", mesh, model=model)      # *.safetensors, read per shard

For each parameter it reads, per device, only the rows and columns that
device holds (``safe_open(...).get_slice``; a split QKV part reads its rows of
the fused tensor, its columns for a ``Conv1D`` weight) and builds the sharded XLA tensor from those pieces with
``torch_xla._XLAC._global_tensor_from_cpu_shards``, with the sharding
``xs.mark_sharding`` would give it. Tied parameters stay one tensor;
non-persistent buffers (rotary tables), which no checkpoint holds, are taken
from ``model`` or recomputed with its ``reset_buffers()``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import fx, nn

from fx_shard import xla
from fx_shard.axes import Spec, axis_names, local_shape
from fx_shard.capture import generate_code
from fx_shard.capture_nn import saved_key
from fx_shard.errors import FxShardError, PlanError
from fx_shard.sharding import SHARDING_KEY, transformed
from fx_shard.split_linear import SplitLinear
from fx_shard.xla import mesh_for, mesh_shape_of, param_specs, xla_device

__all__ = ["load_sharded", "shard_indices"]

logger = logging.getLogger(__name__)

Source = str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, torch.Tensor]


def load_sharded(
    gm: fx.GraphModule,
    source: Source,
    mesh,
    *,
    model: nn.Module | None = None,
    strict: bool = True,
) -> fx.GraphModule:
    """Fill ``gm`` (a ``transform`` / ``shard`` result) from ``source``, each tensor in its sharded layout.

    ``source`` is a ``.safetensors`` file, a directory of them, a list of
    files, or a ``state_dict`` (CPU tensors), with the original model's keys.
    ``mesh`` must have the shape ``gm`` was transformed for. Parameters on
    ``meta`` become new XLA Parameters; parameters already on the device keep
    their identity (``param.data`` is replaced). Every sharded parameter is
    built from per-device pieces, so no device ever receives the whole
    tensor; replicated parameters go to every device whole, as ``shard``
    places them. Non-persistent buffers still on ``meta`` are copied from
    ``model`` (the module ``gm`` was transformed from), or, if ``model``'s are
    on ``meta`` too, recomputed by its owning module's ``reset_buffers()``.

    Missing keys are an error (a parameter left on ``meta`` cannot run);
    with ``strict`` (the default) so are keys no parameter or buffer takes.
    A tied tensor (``lm_head.weight`` is ``wte.weight``) loads from any of
    its keys; when the checkpoint holds several (a ``state_dict``, or a file
    saved with both), they must hold the same values. A checkpoint tensor of
    another floating dtype is cast (a bfloat16 checkpoint into float32
    parameters); any other dtype difference (integers or booleans into
    floating point) is an error. Every check runs before anything is
    written, and a read that fails later (a damaged file) puts back what was
    installed: ``gm`` is loaded whole or left as it was. Returns ``gm``.
    """
    summary = transformed(gm)
    if summary is None:
        raise FxShardError(
            f"{type(gm).__name__} was not rewritten by fx_shard (no ModelSharding in .meta[{SHARDING_KEY!r}]); "
            "load into the result of fx_shard.transform(model, plan, mesh_shape=...) or fx_shard.shard, "
            "or use load_state_dict for a module fx_shard did not transform"
        )
    if mesh_shape_of(mesh) != dict(summary.mesh_shape):
        raise PlanError(
            f"gm was transformed for mesh {dict(summary.mesh_shape)} but the mesh given is {mesh_shape_of(mesh)}; "
            f"transform the model again with mesh_shape={mesh_shape_of(mesh)}"
        )
    specs = {id(param): spec for param, spec, _ in param_specs(gm).values()}
    with _open(source) as reader:
        plan, missing, left_on_meta, taken = [], [], [], set()
        for group in _tensor_groups(gm):
            present = [loc for loc in group.locations if loc.key in reader.shapes]
            if present:
                for location in present:
                    _check_shape(location, reader.shapes[location.key])
                    _check_dtype(location, reader.dtypes[location.key], group.tensor.dtype)
                _check_tied(reader, present)
                taken.update(loc.key for loc in present)
                plan.append((group, present[0]))
            elif group.persistent:
                missing.append(group.locations[0].key)
                if group.tensor.is_meta:
                    left_on_meta.append(group.locations[0].name)
        unexpected = sorted(set(reader.shapes) - taken)
        if left_on_meta or (strict and (missing or unexpected)):
            raise FxShardError(_mismatch_message(missing, unexpected, left_on_meta))
        buffers = _unsaved_buffers(gm, model)
        # Nothing is touched before the checkpoint and the buffers are known to fit; a read that fails
        # after that (a damaged file) puts back what was installed, so the model is loaded whole or not at all.
        device = xla_device()  # only now: every check above runs without an XLA runtime
        undo: list = []
        key = None
        try:
            for group, location in plan:
                key = location.key
                if group.is_param:
                    loaded = _load_param(reader, location, group.tensor, specs.get(id(group.tensor)), mesh, device)
                else:
                    loaded = _read(reader, location, _full_index(group.tensor.shape)).to(group.tensor.dtype).to(device)
                undo.append(_install(gm, group, loaded))
            key = None
            for group, buffer in buffers:
                undo.append(_install(gm, group, buffer.to(device)))
        except Exception as e:
            for restore in reversed(undo):
                restore()
            where = f"reading checkpoint tensor {key!r}" if key else "placing the non-persistent buffers"
            raise FxShardError(
                f"{where} failed ({type(e).__name__}: {e}); nothing was loaded, {type(gm).__name__} is as it was: "
                "check the checkpoint file (a partial download, a damaged copy) and load it again"
            ) from e
    generate_code(gm)
    logger.info("load_sharded: %d tensors into %s", len(plan), type(gm).__name__)
    return gm


# --------------------------------------------------------------------------- where each tensor lives


@dataclass(frozen=True)
class _Location:
    """Where tensor ``name`` of ``gm`` is in the checkpoint: ``key`` (``key_shape``), from ``offset`` along ``dim``.

    A split part sits at an offset along the fused tensor's output dimension
    (0, or 1 for a ``Conv1D`` weight); any other tensor is the whole of its key.
    With ``groups > 1`` the fused rows repeat per group: the part has
    ``size / groups`` rows at ``offset`` within each group's block.
    """

    name: str
    key: str
    key_shape: tuple[int, ...]
    dim: int = 0
    offset: int = 0
    size: int = 0
    groups: int = 1


@dataclass(frozen=True)
class _Group:
    """One tensor of ``gm`` with every (module, attribute) that holds it (tied weights: several)."""

    tensor: torch.Tensor
    owners: tuple[tuple[str, str], ...]
    locations: tuple[_Location, ...]
    is_param: bool
    persistent: bool


def _tensor_groups(gm: fx.GraphModule) -> Iterator[_Group]:
    """Every parameter and persistent-or-not buffer of ``gm`` once, with its checkpoint locations."""
    split_parts = _split_parts(gm)
    groups: dict[int, dict] = {}
    for path, module in gm.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for field, tensor in table.items():
                if tensor is None:
                    continue
                name = prefix + field
                location = split_parts.get(name, _Location(name, saved_key(gm, name), tuple(tensor.shape)))
                persistent = is_param or field not in module._non_persistent_buffers_set
                group = groups.setdefault(id(tensor), {
                    "tensor": tensor, "owners": [], "locations": [], "is_param": is_param, "persistent": False,
                })
                if (path, field) not in group["owners"]:
                    group["owners"].append((path, field))
                    if persistent:
                        group["locations"].append(location)
                group["persistent"] |= persistent
    for group in groups.values():
        yield _Group(
            group["tensor"], tuple(group["owners"]), tuple(group["locations"]), group["is_param"], group["persistent"]
        )


def _split_parts(gm: fx.GraphModule) -> dict[str, _Location]:
    """Where each ``SplitLinear`` part's weight and bias are in the fused tensors, by part tensor name."""
    locations: dict[str, _Location] = {}
    for path, module in gm.named_modules():
        if not isinstance(module, SplitLinear):
            continue
        prefix = f"{path}." if path else ""
        for field in ("weight", "bias"):
            parts = [getattr(getattr(module, n), field, None) for n in module.part_names]
            if any(p is None for p in parts):
                continue
            dim = getattr(module, "dim", 0) if field == "weight" else 0
            fused_shape = list(parts[0].shape)
            fused_shape[dim] = sum(module.output_sizes)
            offset = 0
            for part_name, size in zip(module.part_names, module.output_sizes):
                name = f"{prefix}{part_name}.{field}"
                groups = module.groups
                locations[name] = _Location(name, saved_key(gm, prefix + field), tuple(fused_shape), dim, offset // groups, size, groups)
                offset += size
    return locations


def _check_shape(location: _Location, shape: tuple[int, ...]) -> None:
    if tuple(shape) != location.key_shape:
        raise FxShardError(
            f"checkpoint tensor {location.key!r} has shape {tuple(shape)}, but {location.name} needs "
            f"{location.key_shape}; load a checkpoint of the same model configuration"
        )


def _check_dtype(location: _Location, saved: torch.dtype, dtype: torch.dtype) -> None:
    """A checkpoint tensor loads into ``dtype`` if it has that dtype, or if both are floating point (a cast).

    A float16 / bfloat16 checkpoint into float32 parameters (or the reverse) is how models are shipped and
    loaded, so it is cast, as ``load_state_dict`` does; integers or booleans into floating point (or the
    reverse, or between integer widths) are not a cast of the same values: refused.
    """
    if saved == dtype or (saved.is_floating_point and dtype.is_floating_point):
        return
    raise FxShardError(
        f"checkpoint tensor {location.key!r} is {saved}, but {location.name} is {dtype}; load a checkpoint of this "
        f"model (its {dtype} values), or convert that tensor first (tensor.to({dtype}) in the state_dict) if its "
        "values are meant as such"
    )


def _check_tied(reader: _Reader, present: Sequence[_Location]) -> None:
    """Several keys of one tied tensor in the checkpoint (a state_dict keeps both names) must hold the same values."""
    first = present[0]
    for other in present[1:]:
        if not reader.same(first.key, other.key):
            raise FxShardError(
                f"the checkpoint holds different values at {first.key!r} and {other.key!r}, but the model ties "
                f"{first.name} and {other.name} (one tensor); load a checkpoint of a tied model (saved with "
                "safetensors.torch.save_model, or with one of the keys), or untie the weights in the model first"
            )


def _mismatch_message(missing: list[str], unexpected: list[str], left_on_meta: list[str]) -> str:
    lines = ["the checkpoint does not match the model:"]
    if missing:
        lines.append(f"missing keys ({len(missing)}): {_first(missing)}")
    if left_on_meta:
        lines.append(f"these would stay on meta: {_first(left_on_meta)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {_first(unexpected)}")
    if left_on_meta:
        # strict=False would not help: a parameter left on meta cannot run.
        lines.append("load a checkpoint of this model that holds them (original keys; fused QKV as saved)")
    else:
        lines.append("load the checkpoint of this model (original keys; fused QKV as saved), or pass strict=False")
    return "\n".join(lines)


def _first(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (" ..." if len(keys) > n else "")


# --------------------------------------------------------------------------- reading


class _Reader:
    """Checkpoint tensors by key: their shapes, and any slice of one without reading the rest."""

    def __init__(self, stack: ExitStack, source: Source) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._files: dict[str, object] = {}
        if isinstance(source, Mapping):
            self._tensors = dict(source)
            for key, value in self._tensors.items():
                if not isinstance(value, torch.Tensor):
                    raise FxShardError(
                        f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; pass a state_dict of "
                        "tensors (model.state_dict(), or torch.load(path, weights_only=True))"
                    )
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
            self.dtypes = {k: v.dtype for k, v in self._tensors.items()}
            return
        for path in _files(source):
            handle = stack.enter_context(_open_safetensors(path))
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if key in self._files:
                    raise FxShardError(f"checkpoint key {key!r} is in more than one file (second: {path})")
                self._files[key] = handle
                info = handle.get_slice(key)
                self.shapes[key] = tuple(info.get_shape())
                self.dtypes[key] = _torch_dtype(info.get_dtype(), key, path)

    def same(self, a: str, b: str) -> bool:
        """Whether keys ``a`` and ``b`` hold equal tensors (read block by block from files)."""
        if self.shapes[a] != self.shapes[b] or self.dtypes[a] != self.dtypes[b]:
            return False
        if a in self._tensors and b in self._tensors:
            x, y = self._tensors[a], self._tensors[b]
            if x is y or (x.device == y.device and x.data_ptr() == y.data_ptr() and x.stride() == y.stride()):
                return True  # one tensor under two names, as a tied model's own state_dict has it
            return torch.equal(x.detach().cpu(), y.detach().cpu())
        rows = self.shapes[a][0] if self.shapes[a] else 1
        step = max(1, (1 << 24) // max(1, math.prod(self.shapes[a][1:])))  # about 16M elements a block
        for start in range(0, rows, step):
            index = _full_index(self.shapes[a])
            if index:
                index = (slice(start, min(start + step, rows)), *index[1:])
            if not torch.equal(self.read(a, index), self.read(b, index)):
                return False
        return True

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """``checkpoint[key][index]`` on the CPU; from a file, only those elements are read."""
        if key in self._tensors:
            return self._tensors[key][index].detach().cpu()
        handle = self._files[key]
        if all(s == slice(0, n) for s, n in zip(index, self.shapes[key])):
            return handle.get_tensor(key)
        return handle.get_slice(key)[index]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _torch_dtype(name: str, key: str, path: Path) -> torch.dtype:
    dtype = _SAFETENSORS_DTYPES.get(name)
    if dtype is None:
        raise FxShardError(f"checkpoint tensor {key!r} in {path} has dtype {name}, which fx_shard cannot load")
    return dtype


def _open_safetensors(path: Path):
    """``safe_open(path)``, or an error saying what the file is when it is not a safetensors file."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK\x03\x04"):
            what = "a zip archive, as torch.save writes"
        elif head[:1] == b"\x80":
            what = "a pickle file, as torch.save writes with _use_new_zipfile_serialization=False"
        else:
            what = f"{type(e).__name__}: {e}"
        raise FxShardError(
            f"{path} is not a safetensors file ({what}); convert it once with "
            f"safetensors.torch.save_file(torch.load({str(path)!r}, weights_only=True), 'model.safetensors') "
            "(for a model with tied weights: safetensors.torch.save_model(model, 'model.safetensors')), "
            "or pass the state_dict itself: load_sharded(gm, torch.load(path, weights_only=True), mesh)"
        ) from e


@contextmanager
def _open(source: Source) -> Iterator[_Reader]:
    with ExitStack() as stack:
        yield _Reader(stack, source)


def _files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.safetensors"))
            if not found:
                others = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth") for p in path.glob(ext))
                hint = (
                    f" (it has {', '.join(others[:3])}: convert with safetensors.torch.save_file, or pass "
                    "torch.load(path, weights_only=True))" if others else ""
                )
                raise FxShardError(f"no *.safetensors file in {path}{hint}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FxShardError(f"checkpoint {path} does not exist")
    return files


def _full_index(shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def _read(reader: _Reader, location: _Location, index: tuple[slice, ...]) -> torch.Tensor:
    """``index`` into the tensor at ``location`` (shifted to its place in a fused tensor, group by group)."""
    rows = index[location.dim]
    if location.groups == 1:
        moved = slice(rows.start + location.offset, rows.stop + location.offset)
        return reader.read(location.key, (*index[:location.dim], moved, *index[location.dim + 1:]))
    per_group = location.size // location.groups
    stride = location.key_shape[location.dim] // location.groups
    pieces = []
    for group in range(location.groups):
        start, stop = max(rows.start, group * per_group), min(rows.stop, (group + 1) * per_group)
        if start < stop or not pieces and group == location.groups - 1:
            shift = group * (stride - per_group) + location.offset
            moved = slice(start + shift, max(start, stop) + shift)
            pieces.append(reader.read(location.key, (*index[:location.dim], moved, *index[location.dim + 1:])))
    return torch.cat(pieces, location.dim)


# --------------------------------------------------------------------------- per-device pieces


def shard_indices(shape: Sequence[int], spec: Spec | None, mesh) -> list[tuple[slice, ...]]:
    """The part of a ``shape`` tensor sharded by ``spec`` over ``mesh`` that each device holds.

    One index per device, by device id (mesh ``device_ids`` order is not
    device order); each is a slice per dimension, unpadded (the last shard
    of an uneven split is shorter, or empty). This is XLA's tiling as
    ``xs.mark_sharding`` asks for it: a dimension split over axes ``(a, b)``
    is split ``size(a) * size(b)`` ways, ``a`` major; a sub-axis ``"tp:k"``
    as ``mesh_for`` makes it an axis of a finer mesh.
    """
    if spec is not None:
        mesh, spec = mesh_for(mesh, spec)
    logical = mesh.get_logical_mesh()
    names = list(mesh.axis_names)
    indices: list[tuple[slice, ...]] = [()] * logical.size
    for coords in _all_coords(logical.shape):
        device = int(logical[coords])
        index = []
        for size, entry in zip(shape, spec or (None,) * len(shape)):
            axes = axis_names(entry)
            ways = math.prod(logical.shape[names.index(a)] for a in axes)
            tile = 0
            for a in axes:
                tile = tile * logical.shape[names.index(a)] + coords[names.index(a)]
            chunk = math.ceil(size / ways) if ways > 1 else size
            start = min(tile * chunk, size)
            index.append(slice(start, min(start + chunk, size)))
        indices[device] = tuple(index)
    return indices


def _all_coords(shape: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    for flat in range(math.prod(shape)):
        coords = []
        for size in reversed(shape):
            coords.append(flat % size)
            flat //= size
        yield tuple(reversed(coords))


def _device_pieces(
    reader: _Reader, location: _Location, shape: Sequence[int], spec: Spec, mesh, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Each device's piece of the tensor at ``location``, by device id, padded to one shard shape.

    A piece that several devices hold (a replicated mesh axis) is read once.
    """
    padded = local_shape(shape, spec, mesh_shape_of(mesh))
    cache: dict[tuple, torch.Tensor] = {}
    pieces = []
    for index in shard_indices(shape, spec, mesh):
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:
            piece = _read(reader, location, index).to(dtype)
            if tuple(piece.shape) != padded:
                full = piece.new_zeros(padded)
                full[tuple(slice(0, n) for n in piece.shape)] = piece
                piece = full
            cache[key] = piece
        pieces.append(cache[key])
    return pieces


def _load_param(
    reader: _Reader, location: _Location, param: torch.Tensor, spec: Spec | None, mesh, device
) -> torch.Tensor:
    if spec is None:
        return _read(reader, location, _full_index(param.shape)).to(param.dtype).to(device)
    pieces = _device_pieces(reader, location, param.shape, spec, mesh, param.dtype)
    return xla.global_tensor_from_shards([pieces[d] for d in xla.runtime_device_ids()], mesh, spec, list(param.shape))


def _install(gm: fx.GraphModule, group: _Group, loaded: torch.Tensor) -> Callable[[], None]:
    """Put ``loaded`` where ``group``'s tensor was: into the same Parameter if it is on the device, else a new one.

    Returns what puts the old tensor back.
    """
    old = group.tensor
    if group.is_param and not old.is_meta and old.device.type == loaded.device.type:
        data = old.data
        old.data = loaded
        return lambda: setattr(old, "data", data)
    new = nn.Parameter(loaded, requires_grad=old.requires_grad) if group.is_param else loaded
    tables = [
        (gm.get_submodule(path)._parameters if group.is_param else gm.get_submodule(path)._buffers, field)
        for path, field in group.owners
    ]
    before = [(table, field, table[field]) for table, field in tables]
    for table, field in tables:
        table[field] = new

    def restore() -> None:
        for table, field, tensor in before:
            table[field] = tensor

    return restore


# --------------------------------------------------------------------------- buffers no checkpoint holds


def _unsaved_buffers(gm: fx.GraphModule, model: nn.Module | None) -> list[tuple[_Group, torch.Tensor]]:
    """Each non-persistent buffer with its value: ``gm``'s, else ``model``'s, else from ``reset_buffers()``."""
    buffers = []
    for group in _tensor_groups(gm):
        if group.is_param or group.persistent:
            continue
        buffer = group.tensor
        if buffer.is_meta:
            buffer = _buffer_from_model(model, *group.owners[0])
        buffers.append((group, buffer))
    return buffers


def _buffer_from_model(model: nn.Module | None, path: str, field: str) -> torch.Tensor:
    name = f"{path}.{field}" if path else field
    if model is None:
        raise FxShardError(
            f"buffer {name} is on meta and no checkpoint holds it (non-persistent); pass model= (the module gm "
            "was transformed from) so it can be copied or recomputed with the owner's reset_buffers()"
        )
    try:
        owner = model.get_submodule(path)
        buffer = owner._buffers[field]
    except (AttributeError, KeyError) as e:
        raise FxShardError(f"model has no buffer {name}; pass the module gm was transformed from") from e
    if not buffer.is_meta:
        return buffer
    if not hasattr(owner, "reset_buffers"):
        raise FxShardError(
            f"buffer {name} is on meta in model too, and {type(owner).__name__} has no reset_buffers() to "
            "recompute it; build the model with its buffers on the CPU (only parameters on meta)"
        )
    # A shallow copy whose buffers are empty CPU tensors: reset_buffers computes on its buffers' device.
    clone = copy.copy(owner)
    clone._buffers = {k: torch.empty(0, dtype=v.dtype) if v is not None else None for k, v in owner._buffers.items()}
    clone.reset_buffers()
    return clone._buffers[field]
