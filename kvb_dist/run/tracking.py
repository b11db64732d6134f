"""One metrics sink per rank: wandb through Accelerate's trackers on rank 0, nothing elsewhere."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Dict, Mapping, Optional

logger = logging.getLogger(__name__)


def wandb_mode(requested: str) -> str:
    """"auto": online when the user is logged in (an API key in the environment or ~/.netrc), else offline.

    An explicit WANDB_MODE in the environment wins, as wandb itself would have it.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        logged_in = False
    return "online" if logged_in else "offline"


class Tracker:
    """Logs scalars and images; a no-op off the main process or with tracker "none"."""

    def __init__(self, accelerator, config, run_dir: Path):
        self.accelerator = accelerator
        self.active = config.run.tracker == "wandb" and accelerator.is_main_process
        self.mode = wandb_mode(config.run.wandb_mode) if config.run.tracker == "wandb" else "disabled"
        # Only the main process starts the tracker, so only it reads or writes the run id: every
        # rank making one raced on the file (runs that crashed on an empty id, or logged apart).
        if self.active:
            run_dir.mkdir(parents=True, exist_ok=True)
            accelerator.init_trackers(
                config.run.wandb_project,
                config=config.to_dict(),
                init_kwargs={
                    "wandb": {
                        "mode": self.mode,
                        "dir": str(run_dir),
                        "name": config.run.name,
                        # One wandb run per run folder, continued after a resume.
                        "id": _run_id(run_dir),
                        "resume": "allow",
                    }
                },
            )
            logger.info("wandb %s run in %s", self.mode, run_dir / "wandb")

    def log(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        if self.active:
            self.accelerator.log(dict(metrics), step=step)

    def log_images(self, images: Dict[str, Path]) -> None:
        if not self.active:
            return
        import wandb

        run = self.accelerator.get_tracker("wandb", unwrap=True)
        run.log({name: wandb.Image(str(path)) for name, path in images.items()})

    def finish(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()


def _run_id(run_dir: Path) -> str:
    """A stable wandb run id per run folder (kept in the folder so a resume continues the run)."""
    path = run_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(run_id)
    os.replace(temporary, path)  # whole or absent, even if this process dies while writing
    return run_id
