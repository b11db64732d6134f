"""The four phases of a run, each a function of the run context and what earlier phases wrote.

    freeze      encoder frozen; the data set embedded once into WebDataset shards
    initialize  keys fitted on the embedding shards (k-means and/or EMA epochs), then frozen
    train       values learned on the task stream, evaluated after every task; baselines too
    evaluate    accuracy matrices -> average accuracy, forgetting, key usage, plots, table

Every phase skips the work it finds done in the run folder, so a crashed run resumes by
running the same command again. A SIGTERM (ctx.stop) stops training after the current step,
other phases at their end, with a checkpoint: `Preempted` is raised on every rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Sequence

import torch

from kvb_dist.run.config import Config
from kvb_dist.distributed.layout import ParallelLayout
from kvb_dist.run.stop import Preempted, StopRequest
from kvb_dist.run.tracking import Tracker

logger = logging.getLogger(__name__)

PHASES = ("freeze", "initialize", "train", "evaluate")


@dataclass
class RunContext:
    config: Config
    layout: ParallelLayout
    tracker: Tracker
    device: torch.device
    stop: StopRequest = field(default_factory=StopRequest)  # install() it to stop on SIGTERM
    mixed_precision: str = "no"  # the Accelerate setting the freeze phase runs the encoder under

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def is_main(self) -> bool:
        return self.layout.rank == 0

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)


def run_phases(ctx: RunContext, phases: Sequence[str] = PHASES) -> Dict:
    """Runs the requested phases in order; returns the evaluation summary (or {})."""
    from kvb_dist.run.phases import evaluate, freeze, initialize, train

    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ValueError(f"unknown phase(s) {unknown}; valid phases: {list(PHASES)}")
    summary: Dict = {}
    for phase in PHASES:
        if phase not in phases:
            continue
        logger.info("phase %s", phase)
        if phase == "freeze":
            freeze.run(ctx)
        elif phase == "initialize":
            initialize.run(ctx)
        elif phase == "train":
            train.run(ctx)
        else:
            summary = evaluate.run(ctx)
        ctx.layout.barrier()
        if ctx.stop.agreed(ctx.layout):
            raise Preempted(f"after the {phase} phase")
    return summary
