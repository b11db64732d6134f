"""Atomic checkpoints of tensors and plain data, loaded without executing pickled code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target.

    A crash leaves either the previous checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | Path) -> Optional[Any]:
    """The checkpoint at path, or None if there is none. weights_only: tensors and plain data only."""
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
