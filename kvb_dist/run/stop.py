"""Preemption: SIGTERM, what SLURM and Kubernetes send before they kill a job, stops the run at a
step every rank agrees on, after a checkpoint; the process then exits with EXIT_PREEMPTED.

The signal handler only sets a flag. Training asks `agreed(layout)` every few steps (one
all-reduce of one number), so all ranks stop after the same step even when only one of them got
the signal; the run then resumes exactly from that step.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

# EX_TEMPFAIL: "try again later". Distinct from a failure (1) and from a kill by signal (128 + n).
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Raised on every rank once they agreed to stop; the checkpoint is already written."""


class StopRequest:
    def __init__(self):
        self.signal_number = None

    def install(self) -> "StopRequest":
        signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signal_number, frame) -> None:
        self.signal_number = signal_number
        # os.write, not logging: a handler may run while the logging lock is held.
        os.write(2, f"[pid {os.getpid()}] got signal {signal_number}: stopping after the current step\n".encode())

    def agreed(self, layout) -> bool:
        """Whether any rank got the signal (collective: every rank asks at the same point)."""
        flag = torch.tensor([0.0 if self.signal_number is None else 1.0])
        return bool(layout.all_reduce_world(flag, op=dist.ReduceOp.MAX)[0] > 0)
