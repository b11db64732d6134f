"""One metrics sink per rank: wandb through Accelerate's trackers on rank 0, nothing elsewhere.

Every training stream ("class_incremental/kvb", ...) has its own step axis, "<stream>/step",
derived from the checkpointed (task, step in task): a resumed run continues it. wandb's own
global step is never passed, since wandb drops rows whose step is below the run's current one.
"""

from __future__ import annotations

import configparser
import logging
import netrc
import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"

# Metrics of the initialize phase and the metric that is their x axis (logged in the same row).
INIT_STEP_METRICS = {
    "init/kmeans_sse": "init/kmeans_iteration",
    "init/ema_epoch": "init/ema_steps",
    "init/dead_pairs_replaced": "init/ema_steps",
}


# ---------------------------------------------------------------------------------------------
# Login sources, in the order wandb itself reads them (wandb/sdk/lib/wbauth/authenticate.py).


def _home(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("HOME") or Path.home())


def _expand(path: str, environ: Mapping[str, str]) -> Path:
    return _home(environ) / path[2:] if path.startswith("~/") else Path(path)


def wandb_settings_path(environ: Mapping[str, str]) -> Path:
    """wandb's global settings file: $WANDB_CONFIG_DIR/settings, else ~/.config/wandb/settings."""
    config_dir = environ.get("WANDB_CONFIG_DIR")
    return _expand(config_dir, environ) / "settings" if config_dir else _home(environ) / ".config" / "wandb" / "settings"


def wandb_settings(environ: Mapping[str, str]) -> Dict[str, str]:
    """The [default] section of wandb's global settings file; {} when absent or unreadable (as wandb)."""
    parser = configparser.ConfigParser()
    try:
        parser.read(wandb_settings_path(environ))
    except (OSError, configparser.Error):
        return {}
    return dict(parser["default"]) if parser.has_section("default") else {}


def wandb_base_url(environ: Mapping[str, str]) -> str:
    """The server wandb talks to: WANDB_BASE_URL, else the settings file's base_url, else the public host."""
    url = environ.get("WANDB_BASE_URL") or wandb_settings(environ).get("base_url") or DEFAULT_BASE_URL
    return url.rstrip("/")


def netrc_path(environ: Mapping[str, str]) -> Path:
    """$NETRC, else ~/.netrc, else ~/_netrc where it exists (wandb's wbnetrc._get_netrc_file_path)."""
    if environ.get("NETRC"):
        return _expand(environ["NETRC"], environ)
    unix, windows = _home(environ) / ".netrc", _home(environ) / "_netrc"
    return windows if not unix.exists() and windows.exists() else unix


def wandb_login_source(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Where wandb would find credentials for its server, or None when it would find none.

    The environment (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE), then the netrc entry for the
    host of the server URL, then an api_key in wandb's settings file.
    """
    environ = os.environ if environ is None else environ
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if environ.get(name):
            return name
    host = urlsplit(wandb_base_url(environ)).netloc
    path = netrc_path(environ)
    try:
        entry = netrc.netrc(str(path)).authenticators(host) if host else None
    except (netrc.NetrcParseError, OSError):  # wandb too reads an unreadable file as no login
        entry = None
    if entry is not None and entry[2]:  # an entry without a password is no key
        return f"{path} ({host})"
    if wandb_settings(environ).get("api_key"):
        return str(wandb_settings_path(environ))
    return None


def wandb_mode(requested: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """"auto": online when wandb finds a login (see wandb_login_source), else offline.

    An explicit WANDB_MODE in the environment wins, as wandb itself would have it.
    """
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    return "online" if wandb_login_source(environ) else "offline"


# ---------------------------------------------------------------------------------------------
# The run's config and steps


def stream_step(task_index: int, step_in_task: int, steps_per_task: int) -> int:
    """A stream's step over all its tasks, from what a checkpoint restores: task 2 step 5 of 60 is 125."""
    return task_index * steps_per_task + step_in_task


def run_layout(config, world_size: int) -> Dict[str, object]:
    """The launch as wandb's run config records it: world size, replicas x shards."""
    shards = config.parallel.num_shards or world_size
    replicas = world_size // shards
    return {"world_size": world_size, "replicas": replicas, "shards": shards, "layout": f"{replicas}x{shards}"}


def versions() -> Dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("kvb-dist", "torch", "accelerate", "wandb"):
        try:
            found[package.replace("-", "_")] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package.replace("-", "_")] = "not installed"
    return found


class Tracker:
    """Logs scalars, tables, images and artifacts; a no-op off the main process or with tracker "none"."""

    def __init__(self, accelerator, config, run_dir: Path):
        self.accelerator = accelerator
        self.active = config.run.tracker == "wandb" and accelerator.is_main_process
        self.mode = wandb_mode(config.run.wandb_mode) if config.run.tracker == "wandb" else "disabled"
        self._axes: set = set()  # step metrics already given to wandb's define_metric in this process
        # Only the main process starts the tracker, so only it reads or writes the run id: every
        # rank making one raced on the file (runs that crashed on an empty id, or logged apart).
        if self.active:
            run_dir.mkdir(parents=True, exist_ok=True)
            # getattr: small stand-ins for the Accelerator (tests) need not carry a world size.
            layout = run_layout(config, getattr(accelerator, "num_processes", 1))
            accelerator.init_trackers(
                config.run.wandb_project,
                config={**config.to_dict(), "launch": layout, "versions": versions()},
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

    def _run(self):
        return self.accelerator.get_tracker("wandb", unwrap=True)

    def _define_axis(self, pattern: str, step_metric: str) -> None:
        if (pattern, step_metric) not in self._axes:
            run = self._run()
            run.define_metric(step_metric)
            run.define_metric(pattern, step_metric=step_metric)
            self._axes.add((pattern, step_metric))

    def log(self, metrics: Mapping[str, float]) -> None:
        """Metrics off any stream (init, final): on wandb's own step; init metrics on their own axis."""
        if not self.active:
            return
        for name in metrics:
            if name in INIT_STEP_METRICS and INIT_STEP_METRICS[name] in metrics:
                self._define_axis(name, INIT_STEP_METRICS[name])
        self._run().log(dict(metrics))

    def log_stream(self, stream: str, metrics: Mapping[str, float], task_index: int, step_in_task: int, steps_per_task: int) -> None:
        """Metrics of a training stream (names "<stream>/..."), at the stream's step "<stream>/step"."""
        if not self.active:
            return
        axis = f"{stream}/step"
        self._define_axis(f"{stream}/*", axis)
        self._run().log({**metrics, axis: stream_step(task_index, step_in_task, steps_per_task)})

    def log_table(self, name: str, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
        if not self.active:
            return
        import wandb

        self._run().log({name: wandb.Table(columns=list(columns), data=[list(row) for row in rows])})

    def log_images(self, images: Dict[str, Path]) -> None:
        if not self.active:
            return
        import wandb

        self._run().log({name: wandb.Image(str(path)) for name, path in images.items()})

    def log_artifact(self, name: str, kind: str, files: Mapping[str, Path]) -> None:
        """Files (name in the artifact -> path) as one artifact of this run, "<name>-<run id>".

        wandb makes a new version only when the files changed (a rerun logs them again).
        """
        if not self.active:
            return
        import wandb

        run = self._run()
        artifact = wandb.Artifact(re.sub(r"[^\w.-]", "_", f"{name}-{run.id}"), type=kind)
        for name_in_artifact, path in files.items():
            artifact.add_file(str(path), name=name_in_artifact)
        run.log_artifact(artifact)

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
