"""Sharded checkpoints through torch.distributed.checkpoint (DCP): no rank holds the whole model.

A checkpoint is a folder that every rank writes together. A state is a flat dict of tensors:
DTensors (`ParallelLayout.global_view`) for what is split like the codebooks, so each rank
writes only its own codebooks (each replicated shard once) and a load reads only the slices a
rank holds, from a checkpoint of any layout or world size; plain tensors for what every rank
holds whole, written once. Loading copies into the given tensors in place.

Only tensors go in: DCP would pickle anything else and unpickle it on load. Its `.metadata`
file is a pickle too, read here by an unpickler that admits only DCP's own metadata types, so
loading a checkpoint never runs code from it.

A folder is complete when `save` returns on every rank (DCP writes `.metadata` last, after all
ranks' files). Callers record finished folders elsewhere (an atomically written record) and
treat any other folder as garbage from an interrupted save.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import struct
import warnings
import zipfile
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType

from kvb_dist.distributed.layout import ParallelLayout

METADATA_FILE = ".metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """Admits the classes DCP's metadata is made of and nothing else."""

    MODULES = ("torch.distributed.checkpoint.metadata",)
    NAMES = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if module in self.MODULES or (module, name) in self.NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not checkpoint metadata")


class _FileRange(io.RawIOBase):
    """Bytes [start, start + length) of an open file as a seekable stream of their own."""

    def __init__(self, file, start: int, length: int):
        self.file, self.start, self.length, self.position = file, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = offset if whence == 0 else self.position + offset if whence == 1 else self.length + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        size = max(0, min(len(buffer), self.length - self.position))
        self.file.seek(self.start + self.position)
        read = self.file.readinto(memoryview(buffer)[:size])
        self.position += read
        return read


def _storage_start(file, item_offset: int, item_length: int, num_bytes: int) -> Optional[int]:
    """Where the bytes of the one tensor storage of a torch.save blob begin in the file, or None.

    None unless the blob holds exactly one uncompressed storage of num_bytes.
    """
    with zipfile.ZipFile(_FileRange(file, item_offset, item_length)) as archive:
        records = [info for info in archive.infolist() if "/data/" in info.filename and not info.filename.endswith("/")]
        if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED or records[0].file_size != num_bytes:
            return None
        header_offset = records[0].header_offset
    file.seek(item_offset + header_offset)
    header = file.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return item_offset + header_offset + 30 + name_length + extra_length


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is read without running pickled code.

    It also reads the rows a rank wants straight into their place: DCP reads each saved chunk
    whole (its bytes, then a tensor) before copying the slice it wants, which briefly holds twice
    the chunk. Chunks that kvb_dist saved are row-major (`save` writes contiguous tensors and
    marks its checkpoints), so a run of rows of a chunk is a run of bytes in the file.
    """

    def read_data(self, plan, planner):
        metadata = planner.metadata
        if ROW_MAJOR not in metadata.state_dict_metadata:  # not written by kvb_dist: DCP's own way
            return super().read_data(plan, planner)
        rest = []
        for item in plan.items:
            if not (item.type == LoadItemType.TENSOR and self._read_rows_directly(item, planner, metadata)):
                rest.append(item)
        if rest:
            return super().read_data(dataclasses.replace(plan, items=rest), planner)
        done = torch.futures.Future()
        done.set_result(None)
        return done

    def _read_rows_directly(self, item, planner, metadata) -> bool:
        """Rows [a, b) of a saved chunk read into the target tensor; False where that does not apply."""
        info = self.storage_data[item.storage_index]
        tensor_meta = metadata.state_dict_metadata[item.storage_index.fqn]
        chunk = next((c for c in tensor_meta.chunks if tuple(c.offsets) == tuple(item.storage_index.offset)), None)
        target = planner.resolve_tensor(item).detach()
        whole_rows = all(o == 0 for o in item.storage_offsets[1:]) and tuple(item.lengths[1:]) == tuple(chunk.sizes[1:]) if chunk else False
        if not (whole_rows and target.ndim and not info.transform_descriptors and target.is_contiguous() and target.device.type == "cpu"):
            return False
        element = target.element_size()
        chunk_bytes = math.prod(chunk.sizes) * element
        with open(Path(self.path) / info.relative_path, "rb") as file:
            start = _storage_start(file, info.offset, info.length, chunk_bytes)
            if start is None:
                return False
            row_bytes = chunk_bytes // max(1, chunk.sizes[0])
            file.seek(start + item.storage_offsets[0] * row_bytes)
            buffer = target.reshape(-1).view(torch.uint8).numpy()
            if file.readinto(memoryview(buffer)) != buffer.nbytes:
                raise OSError(f"{info.relative_path} is shorter than its checkpoint metadata says")
        planner.commit_tensor(item, target)
        return True

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a finished checkpoint: it has no {METADATA_FILE} (an interrupted save, or, if "
                f"another rank wrote it, a folder this rank cannot see: checkpoints need a file system all ranks share)"
            )
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} does not hold checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _check_tensors(state: Mapping[str, torch.Tensor]) -> None:
    wrong = [name for name, value in state.items() if not isinstance(value, torch.Tensor)]
    if wrong:
        raise TypeError(f"a sharded checkpoint holds tensors only; not tensors: {wrong}")


def _group_args(layout: ParallelLayout, group: Optional[dist.ProcessGroup]) -> dict:
    if layout.world_group is None:  # a world of one: no collectives at all
        return {"no_dist": True}
    return {"process_group": group if group is not None else layout.world_group}


# DCP warns on every single-process call that it "assumes the intent" we stated with no_dist.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


# A marker every kvb_dist checkpoint holds: its chunks are row-major (see SafeReader).
ROW_MAJOR = "kvb_dist.row_major_chunks"


def _to_save(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    _check_tensors(state)
    if ROW_MAJOR in state:
        raise ValueError(f"{ROW_MAJOR!r} is a name kvb_dist's checkpoints reserve")
    out = {name: t if t.is_contiguous() else t.contiguous() for name, t in state.items()}
    out[ROW_MAJOR] = torch.ones(1)
    return out


def save(state: Mapping[str, torch.Tensor], folder, layout: ParallelLayout) -> None:
    """Collective: every rank writes its part of `state` into `folder`; returns when all are written."""
    dcp.save(_to_save(state), checkpoint_id=str(folder), **_group_args(layout, None))


def save_async(state: Mapping[str, torch.Tensor], folder, layout: ParallelLayout, group: Optional[dist.ProcessGroup]) -> Future:
    """Like `save`, but the tensors are copied to host memory and written in a background thread.

    The returned future resolves when the folder is complete. `group` must be a CPU (gloo)
    group used by nothing else, since the background thread runs collectives on it while
    training runs its own.
    """
    return dcp.async_save(_to_save(state), checkpoint_id=str(folder), **_group_args(layout, group))


def load_(state: Mapping[str, torch.Tensor], folder, layout: ParallelLayout) -> None:
    """Collective: fills every tensor of `state` in place from `folder`, reading only the slices it holds.

    A module built on the meta device is materialized first (`module.to_empty(device=...)`):
    meta tensors hold no memory to fill. Checked before any collective, so every rank of a
    layout built alike raises the same error.
    """
    _check_tensors(state)
    on_meta = [name for name, t in state.items() if t.is_meta]
    if on_meta:
        raise ValueError(
            f"cannot load into tensors on the meta device ({on_meta[:5]}{' ...' if len(on_meta) > 5 else ''}): "
            f"materialize the module first with module.to_empty(device=...)"
        )
    dcp.load(dict(state), storage_reader=SafeReader(str(folder)), **_group_args(layout, None))


def saved_tensors(folder) -> Dict[str, tuple]:
    """Name -> (global shape, dtype) of every tensor in a finished checkpoint (reads only its metadata)."""
    metadata = SafeReader(str(folder)).read_metadata()
    return {
        name: (meta.size, meta.properties.dtype)
        for name, meta in metadata.state_dict_metadata.items()
        if hasattr(meta, "size") and name != ROW_MAJOR
    }


# ---------------------------------------------------------------------------------------------
# Optimizer state as a flat dict of tensors


def init_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """Creates the per-parameter state of parameters that have none (moments, step counters).

    One step with zero gradients and a zero learning rate, as torch.distributed.checkpoint's own
    optimizer helpers do: it allocates the state without moving a parameter. The state is meant
    to be overwritten by a load.
    """
    grads = {p: p.grad for group in optimizer.param_groups for p in group["params"]}
    stateless = [p for p in grads if not optimizer.state.get(p)]
    if not stateless:
        return
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    sparse = isinstance(optimizer, torch.optim.SparseAdam)  # it refuses dense gradients
    for p in grads:  # parameters that have state sit the step out, so their moments stay
        p.grad = None
    for p in stateless:
        p.grad = torch.zeros_like(p).to_sparse(p.ndim - 1) if sparse else torch.zeros_like(p)
    try:
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, learning_rates):
            group["lr"] = lr
        for p, grad in grads.items():
            p.grad = grad


def optimizer_tensors(
    optimizer: torch.optim.Optimizer,
    named_params: Mapping[str, nn.Parameter],
    views: Optional[Mapping[str, Callable[[torch.Tensor], torch.Tensor]]] = None,
) -> Dict[str, torch.Tensor]:
    """The optimizer's state tensors as ``{"<param name>.<state key>": tensor}``, sharing memory.

    A state tensor shaped like its parameter gets the parameter's view (`views[name]`, e.g. the
    sharded values' `global_view`); scalars such as step counters are replicated as they are.
    Hyperparameters are not included: the optimizer is rebuilt from the config.
    """
    views = views or {}
    init_optimizer_state_(optimizer)
    out = {}
    for name, param in named_params.items():
        view = views.get(name, lambda t: t)
        state = optimizer.state[param]
        for key, value in state.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                # A Python number (SparseAdam's step) cannot be loaded in place: keep it as a 0-dim
                # tensor, which the optimizers' arithmetic accepts.
                value = state[key] = torch.tensor(float(value), dtype=torch.float64)
            if isinstance(value, torch.Tensor):
                out[f"{name}.{key}"] = view(value) if value.shape == param.shape else value
    return out


# ---------------------------------------------------------------------------------------------
# One process, whole tensors: export and import for models small enough to fit


def load_full(folder, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Every tensor of a finished checkpoint whose name starts with `prefix`, whole, in this process.

    Names are returned without the prefix. Allocates the full model: for small models only.
    """
    saved = saved_tensors(folder)
    full = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in saved.items() if name.startswith(prefix)}
    if not full:
        raise ValueError(f"{folder} holds no tensor named {prefix}*; it holds {sorted(saved)}")
    load_(full, folder, ParallelLayout.single())
    return {name[len(prefix) :]: t for name, t in full.items()}


def save_full(tensors: Mapping[str, torch.Tensor], folder, prefix: str = "") -> None:
    """Writes whole tensors from one process as a checkpoint that any layout loads its slices from."""
    save({prefix + name: t for name, t in tensors.items()}, folder, ParallelLayout.single())
