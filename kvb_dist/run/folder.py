"""The run folder belongs to one run: a lock for the run's lifetime, the config it was made with,
and no leftovers of writes that were killed.

    folder = RunFolder.claim(config, layout, redo=None)   # collective; raises the same on every rank
    ...
    folder.release()

Locks are `flock`s, so a dead job holds nothing: the kernel drops its locks with its last open
file. Rank 0 holds `.lock` exclusively (a second run's rank 0 fails to take it), and every rank
holds `.ranks.lock` shared: a new run's rank 0 first checks that nobody holds that one either,
which catches workers of a killed launcher that still run. Every decision is made on rank 0 and
broadcast, so all ranks see the same answer even while files change.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from kvb_dist.distributed.layout import ParallelLayout
from kvb_dist.run.phases import PHASES

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
RANKS_LOCK_NAME = ".ranks.lock"
CONFIG_NAME = "config.yaml"
# What each phase writes; redoing a phase deletes its outputs and those of every later phase.
PHASE_OUTPUTS = {
    "freeze": ("embeddings",),
    "initialize": ("checkpoints/initialize.pt", "checkpoints/initialize-*"),
    "train": ("checkpoints/train-*",),
    "evaluate": ("results.json", "plots"),
}
# Config keys that change no result: a run may continue with other values.
SAFE_KEYS = {
    "run.name", "run.out_dir", "run.checkpoint_every", "run.async_checkpoints", "run.tracker",
    "run.wandb_mode", "run.wandb_project", "run.threads", "data.root", "parallel.num_shards",
}
# The first phase whose results a config key changes (by "section.key", else by section).
FIRST_PHASE_CHANGED = {
    "run": "freeze",  # the seed draws the splits
    "data": "freeze",
    "encoder": "freeze",
    "bottleneck": "initialize",
    "init": "initialize",
    "train": "train",
    "data.num_tasks": "train",
    "data.classes_per_task": "train",
    "bottleneck.values_init": "train",
}
# Temporary files of our writers (save_atomic, shard writers, indexes): never a finished file.
TEMPORARY_PATTERNS = ("*.tmp", ".*.tmp-*")


class RunFolderError(ValueError):
    """The run folder cannot be used by this run (in use, or made with another config)."""


def config_differences(saved: Dict, current: Dict) -> List[Tuple[str, object, object]]:
    """(section.key, saved value, current value) for every key that differs."""
    differences = []
    for section in sorted(set(saved) | set(current)):
        before, now = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                differences.append((f"{section}.{key}", before.get(key), now.get(key)))
    return differences


def first_phase_changed(key: str) -> Optional[str]:
    """The earliest phase whose results `key` changes; None for keys that change no result."""
    if key in SAFE_KEYS:
        return None
    return FIRST_PHASE_CHANGED.get(key, FIRST_PHASE_CHANGED.get(key.split(".")[0], "freeze"))


def remove_phase_outputs(run_dir: Path, first_phase: str) -> List[Path]:
    """Deletes what `first_phase` and every later phase wrote; returns what was removed."""
    removed = []
    for phase in PHASES[PHASES.index(first_phase):]:
        for pattern in PHASE_OUTPUTS[phase]:
            for path in run_dir.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(path)
    return removed


def remove_temporary_files(run_dir: Path) -> List[Path]:
    """Leftovers of interrupted writes (a killed run, a full disk). Only call while holding the lock."""
    removed = []
    for pattern in TEMPORARY_PATTERNS:
        for path in run_dir.rglob(pattern):
            if path.is_file() and "wandb" not in path.relative_to(run_dir).parts:
                path.unlink()
                removed.append(path)
    return removed


def _holder() -> Dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def _in_use_message(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: {holder.get('command')}"
           if holder else "a process that left no details")
    stale = holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"])
    return (
        f"run folder {lock_path.parent} is in use by another run ({who}). "
        + ("That process is gone, but a process it started still holds the lock (a stale lock). " if stale else "")
        + f"Wait for it, stop it (find what holds the folder with `fuser -v {lock_path}`), or use another run.name. "
        "On a network file system the server frees a crashed node's lock once its lease expires (NFSv4: about 90 s)."
    )


def _try_lock(path: Path, mode: int) -> Tuple[Optional[int], Optional[str]]:
    """(fd, None) holding `mode` on path, or (None, why not)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, "busy"
    except OSError as error:  # the file system has no locks (some network file systems)
        os.close(fd)
        return None, f"unsupported: {error}"
    return fd, None


class RunFolder:
    """A claimed run folder; see the module docstring."""

    @classmethod
    def claim(cls, config, layout: ParallelLayout, redo: Optional[str] = None) -> "RunFolder":
        """Locks the run folder for this run, checks (or first saves) its config, cleans leftovers.

        redo: a phase whose outputs (and every later phase's) are deleted first, so it runs again
        with the current config. Collective; raises the same RunFolderError on every rank.
        """
        if redo is not None and redo not in PHASES:
            raise ValueError(f"redo must be one of {list(PHASES)}, got {redo!r}")
        run_dir = Path(config.run_dir)
        folder = cls(run_dir, layout)
        try:
            problem = layout.decided_on_rank0(lambda: folder._claim_on_rank0(config.to_dict(), redo))
        except BaseException:
            folder.release()
            raise
        if problem is not None:
            folder.release()
            raise RunFolderError(problem)
        if layout.rank != 0:
            folder._ranks_fd, _ = _try_lock(run_dir / RANKS_LOCK_NAME, fcntl.LOCK_SH)
        elif folder._ranks_fd is not None:
            # The probe's exclusive lock becomes a shared one; rank 0's .lock keeps other runs out meanwhile.
            fcntl.flock(folder._ranks_fd, fcntl.LOCK_SH)
        layout.barrier()
        return folder

    def __init__(self, path: Path, layout: ParallelLayout):
        self.path, self.layout = path, layout
        self._lock_fd: Optional[int] = None
        self._ranks_fd: Optional[int] = None

    def _claim_on_rank0(self, config: Dict, redo: Optional[str]) -> Optional[str]:
        run_dir = self.path
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_path = run_dir / LOCK_NAME
        self._lock_fd, why = _try_lock(lock_path, fcntl.LOCK_EX)
        if why == "busy":
            return _in_use_message(lock_path)
        if self._lock_fd is None:
            logger.warning("run folder %s cannot be locked (%s): a second run in it would not be detected", run_dir, why)
        else:
            previous = os.read(self._lock_fd, 4096).decode(errors="replace").strip()
            if previous:
                logger.warning("the previous run in %s did not end cleanly (%s); cleaning its leftovers", run_dir, previous)
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, json.dumps(_holder()).encode(), 0)
        self._ranks_fd, why = _try_lock(run_dir / RANKS_LOCK_NAME, fcntl.LOCK_EX)
        if why == "busy":
            return (
                f"processes of an earlier run still use run folder {run_dir} (workers of a killed launcher?): "
                f"stop them first (`fuser -v {run_dir / RANKS_LOCK_NAME}` lists them), then run again"
            )
        for path in remove_temporary_files(run_dir):
            logger.info("removed %s, left by an interrupted write", path)

        config_path = run_dir / CONFIG_NAME
        saved = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
        if saved is not None:
            changed = [(k, a, b, first_phase_changed(k)) for k, a, b in config_differences(saved, config)]
            for key, before, now, phase in changed:
                if phase is None:
                    logger.info("config %s: %r -> %r (changes no result)", key, before, now)
            affecting = [c for c in changed if c[3] is not None]
            if affecting:
                earliest = min((c[3] for c in affecting), key=PHASES.index)
                if redo is None or PHASES.index(redo) > PHASES.index(earliest):
                    listed = "; ".join(f"{k}: {a!r} (saved) vs {b!r} (now)" for k, a, b, _ in affecting)
                    return (
                        f"run folder {run_dir} was made with another config: {listed}. These change the "
                        f"{earliest} phase and later ones: use another run.name for a new run, or pass "
                        f"--redo {earliest} to redo {', '.join(PHASES[PHASES.index(earliest):])} here with the new config"
                    )
        if redo is not None:
            removed = remove_phase_outputs(run_dir, redo)
            logger.info("--redo %s: removed %s", redo, ", ".join(str(p.relative_to(run_dir)) for p in removed) or "nothing")
        if saved != config:
            temporary = config_path.with_name(f".{CONFIG_NAME}.tmp-{os.getpid()}")
            temporary.write_text(yaml.safe_dump(config, sort_keys=False))
            os.replace(temporary, config_path)
        return None

    def release(self) -> None:
        """Ends the claim (the kernel also does it when the process dies); rank 0 clears its details."""
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
        for fd in (self._lock_fd, self._ranks_fd):
            if fd is not None:
                os.close(fd)
        self._lock_fd = self._ranks_fd = None
