"""The run folder's checkpoints: small records written atomically, tensors in sharded DCP folders.

A record (plain data: progress, accuracy rows, config values) is one file written by rank 0
through a temporary file, fsync and rename, and loaded without executing pickled code. A
`CheckpointSeries` pairs a record with the DCP folder of tensors it was saved with: the record
is written only after every rank finished writing the folder, so a record always names a
complete folder, and a folder no record names (a save that was interrupted) is deleted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
import torch.distributed as dist

from kvb_dist.distributed import checkpoint as sharded
from kvb_dist.distributed.layout import ParallelLayout


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target.

    A crash leaves either the previous checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise


def load(path: str | Path) -> Optional[Any]:
    """The checkpoint at path, or None if there is none. weights_only: tensors and plain data only."""
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def record_path(folder: Path, name: str) -> Path:
    """Where the record of the checkpoint series `name` lives (read it with `load`)."""
    return Path(folder) / f"{name}.pt"


class CheckpointSeries:
    """Checkpoints `<name>.pt` (the record) + `<name>-<serial>/` (its tensors) in a folder.

    Collective: every rank constructs it and calls save / load_ together. With `background`,
    `save(..., wait=False)` returns once the tensors are copied to host memory and the folder is
    written by a background thread; its record is written by `wait()`, which the next save calls
    first. The thread's collectives run on a gloo group of their own, so they never interleave
    with training's.
    """

    def __init__(self, folder: Path, name: str, layout: ParallelLayout, background: bool = False):
        self.folder, self.name, self.layout, self.background = Path(folder), name, layout, background
        self._background_group: Optional[dist.ProcessGroup] = None
        self.record_path = record_path(self.folder, name)
        # Rank 0 reads, everyone gets its answer: ranks never disagree on what is done.
        self.record = layout.decided_on_rank0(lambda: load(self.record_path))
        self._pending: Optional[tuple] = None  # (future, record) of a background save
        if layout.rank == 0:
            self._remove_unrecorded_folders()
        layout.barrier()

    def tensors_folder(self, record: Optional[Dict] = None) -> Optional[Path]:
        record = self.record if record is None else record
        return None if record is None else self.folder / record["tensors"]

    def load_(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Fills `tensors` in place from the latest recorded folder (only the slices each rank holds)."""
        sharded.load_(tensors, self.tensors_folder(), self.layout)

    def save(self, tensors: Mapping[str, torch.Tensor], record: Dict, wait: bool = True) -> None:
        self.wait()
        serial = 0 if self.record is None else self.record["serial"] + 1
        record = {**record, "serial": serial, "tensors": f"{self.name}-{serial:06d}"}
        target = self.tensors_folder(record)
        if wait or not self.background:
            sharded.save(tensors, target, self.layout)
            self._finish(record)
            return
        if self._background_group is None:
            self._background_group = self.layout.new_cpu_group()  # collective: every rank saves together
        self._pending = (sharded.save_async(tensors, target, self.layout, self._background_group), record)

    def wait(self) -> None:
        """Completes a background save: its folder is written on every rank, then its record."""
        if self._pending is not None:
            future, record = self._pending
            self._pending = None
            future.result()
            self._finish(record)

    def _finish(self, record: Dict) -> None:
        # DCP's save ends with a collective after every rank's files are written, so rank 0 may
        # record the folder as soon as its own save returns.
        self.record = record
        if self.layout.rank == 0:
            save_atomic(record, self.record_path)
            self._remove_unrecorded_folders()

    def _remove_unrecorded_folders(self) -> None:
        keep = self.tensors_folder()
        for path in self.folder.glob(f"{self.name}-*"):
            if path.is_dir() and path != keep and path.name[len(self.name) + 1 :].isdigit():
                shutil.rmtree(path, ignore_errors=True)
