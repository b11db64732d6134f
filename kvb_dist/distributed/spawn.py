"""Run a function on W spawned gloo ranks and collect what each returns (tests, benchmarks).

A hang becomes a failure: the process group has a short timeout, the parent waits a bounded
time, kills what is left and reports every rank's exit code and traceback.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROCESS_GROUP_TIMEOUT = timedelta(seconds=30)


def _to_bytes(value: Any) -> bytes:
    # Tensors put on a queue live in shared memory owned by the child; bytes outlive the child.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _rank_main(rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, results, threads: int,
               process_group_timeout: timedelta) -> None:
    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=process_group_timeout
    )
    try:
        results.put((rank, True, _to_bytes(fn(rank, world_size, *args))))
    except BaseException:  # report, then exit non-zero
        results.put((rank, False, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(
    world_size: int, fn: Callable, *args: Any, timeout: float = 90.0, threads: int = 1,
    process_group_timeout: timedelta = PROCESS_GROUP_TIMEOUT,
) -> List[Any]:
    """fn(rank, world_size, *args) on every rank; returns the results in rank order.

    fn must be importable (a module-level function) and its result picklable.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        processes = [
            context.Process(target=_rank_main, args=(r, world_size, init_file, fn, args, results, threads, process_group_timeout), daemon=True)
            for r in range(world_size)
        ]
        for p in processes:
            p.start()
        deadline = time.monotonic() + timeout
        outcomes = {}
        while len(outcomes) < world_size and time.monotonic() < deadline:
            try:
                rank, ok, value = results.get(timeout=0.5)
                outcomes[rank] = (ok, value)
            except queue_module.Empty:
                if all(not p.is_alive() for p in processes) and results.empty():
                    break
        for p in processes:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
    failures = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(outcomes.items()) if not ok]
    missing = [r for r in range(world_size) if r not in outcomes]
    codes = [p.exitcode for p in processes]
    if failures or missing or any(c != 0 for c in codes):
        raise RuntimeError(
            f"ranks failed (exit codes {codes}, no result from {missing}):\n" + "\n".join(failures)
        )
    return [_from_bytes(outcomes[r][1]) for r in range(world_size)]
