"""wandb conventions: login sources as wandb reads them, one step axis per stream that a resume
continues, the run config, and a SIGTERM + rerun on two ranks logging offline to one run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvb_dist.run import tracking
from kvb_dist.run.config import load_config
from kvb_dist.run.phases import evaluate

from test_launcher import LAUNCH_TIMEOUT, REPO, command, environment, sigterm_one_rank_mid_training

# ---------------------------------------------------------------------------------------------
# Login sources (pure: an environment mapping and files under a temporary home)


@pytest.fixture
def home(tmp_path):
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def write_netrc(path: Path, host: str, password: str = "k" * 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"machine {host}\n  login user\n  password {password}\n")
    path.chmod(0o600)  # netrc refuses a readable password file for the user's own ~/.netrc
    return path


def write_settings(folder: Path, **values: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings").write_text("[default]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))


def test_no_login_anywhere_is_offline(home):
    environ = {"HOME": str(home)}
    assert tracking.wandb_login_source(environ) is None
    assert tracking.wandb_mode("auto", environ) == "offline"


def test_environment_keys_are_a_login(home):
    assert tracking.wandb_mode("auto", {"HOME": str(home), "WANDB_API_KEY": "x" * 40}) == "online"
    assert tracking.wandb_login_source({"HOME": str(home), "WANDB_IDENTITY_TOKEN_FILE": "/t"}) == "WANDB_IDENTITY_TOKEN_FILE"


def test_netrc_entry_counts_for_the_host_wandb_talks_to(home):
    write_netrc(home / ".netrc", "wandb.example.com")
    environ = {"HOME": str(home)}
    assert tracking.wandb_mode("auto", environ) == "offline"  # an entry for another host than api.wandb.ai
    environ["WANDB_BASE_URL"] = "https://wandb.example.com/"
    assert tracking.wandb_mode("auto", environ) == "online"
    assert "wandb.example.com" in tracking.wandb_login_source(environ)


def test_settings_file_base_url_from_wandb_config_dir_or_the_default_folder(home, tmp_path):
    write_netrc(home / ".netrc", "local.example:8080")
    write_settings(tmp_path / "wandb_config", base_url="http://local.example:8080")
    assert tracking.wandb_mode("auto", {"HOME": str(home), "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config")}) == "online"
    assert tracking.wandb_mode("auto", {"HOME": str(home)}) == "offline"
    write_settings(home / ".config" / "wandb", base_url="http://local.example:8080")
    assert tracking.wandb_base_url({"HOME": str(home)}) == "http://local.example:8080"
    assert tracking.wandb_mode("auto", {"HOME": str(home)}) == "online"
    # The environment's URL wins over the settings file, as in wandb.
    assert tracking.wandb_mode("auto", {"HOME": str(home), "WANDB_BASE_URL": "https://api.wandb.ai"}) == "offline"


def test_netrc_variable_names_the_file(home, tmp_path):
    netrc = write_netrc(tmp_path / "elsewhere" / "auth", "api.wandb.ai")
    assert tracking.wandb_mode("auto", {"HOME": str(home)}) == "offline"
    assert tracking.wandb_mode("auto", {"HOME": str(home), "NETRC": str(netrc)}) == "online"


def test_api_key_in_the_settings_file_is_a_login(home):
    write_settings(home / ".config" / "wandb", api_key="k" * 40)
    assert tracking.wandb_mode("auto", {"HOME": str(home)}) == "online"


def test_unreadable_netrc_is_no_login(home):
    (home / ".netrc").write_text("machine api.wandb.ai password\n")  # a token missing
    assert tracking.wandb_mode("auto", {"HOME": str(home)}) == "offline"


def test_explicit_modes_and_wandb_mode_variable_win(home, monkeypatch):
    environ = {"HOME": str(home), "WANDB_API_KEY": "x" * 40}
    assert tracking.wandb_mode("offline", environ) == "offline"
    assert tracking.wandb_mode("auto", {**environ, "WANDB_MODE": "disabled"}) == "disabled"
    monkeypatch.setenv("HOME", str(home))  # the default reads the process environment
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_CONFIG_DIR", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    assert tracking.wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_mode("auto") == "online"


# ---------------------------------------------------------------------------------------------
# Step axes, with a fake run


class FakeRun:
    id = "abc123"

    def __init__(self):
        self.definitions, self.rows = [], []

    def define_metric(self, name, step_metric=None):
        self.definitions.append((name, step_metric))

    def log(self, row, **kwargs):
        assert not kwargs, "wandb's own step is never passed (a resume would log below the run's step)"
        self.rows.append(dict(row))


class FakeAccelerator:
    def __init__(self, is_main_process=True, num_processes=4):
        self.is_main_process, self.num_processes = is_main_process, num_processes
        self.run, self.config = FakeRun(), None

    def init_trackers(self, project, config, init_kwargs):
        self.config = config

    def get_tracker(self, name, unwrap=False):
        assert name == "wandb" and unwrap
        return self.run


def wandb_config(*overrides):
    return load_config(None, ["run.tracker=wandb", "run.wandb_mode=offline", *overrides])


def test_stream_step_continues_over_tasks():
    assert [tracking.stream_step(t, s, 60) for t, s in [(0, 10), (0, 60), (1, 10), (2, 5)]] == [10, 60, 70, 125]


def test_each_stream_has_its_own_axis_and_a_resumed_tracker_continues_it(tmp_path):
    first = FakeAccelerator()
    tracker = tracking.Tracker(first, wandb_config(), tmp_path)
    for step in (10, 20):
        tracker.log_stream("class_incremental/kvb", {"class_incremental/kvb/loss": 1.0}, 0, step, 60)
    tracker.log_stream("iid/mlp", {"iid/mlp/loss": 2.0}, 0, 10, 100)
    assert first.run.definitions == [
        ("class_incremental/kvb/step", None), ("class_incremental/kvb/*", "class_incremental/kvb/step"),
        ("iid/mlp/step", None), ("iid/mlp/*", "iid/mlp/step"),
    ]
    assert [row.get("class_incremental/kvb/step") for row in first.run.rows] == [10, 20, None]
    assert first.run.rows[2] == {"iid/mlp/loss": 2.0, "iid/mlp/step": 10}

    # A new process resumes from the checkpoint of task 1, step 20: the axis goes on from 80.
    resumed = FakeAccelerator()
    tracker = tracking.Tracker(resumed, wandb_config(), tmp_path)
    tracker.log_stream("class_incremental/kvb", {"class_incremental/kvb/loss": 0.5}, 1, 30, 60)
    assert resumed.run.definitions[-1] == ("class_incremental/kvb/*", "class_incremental/kvb/step")
    assert resumed.run.rows == [{"class_incremental/kvb/loss": 0.5, "class_incremental/kvb/step": 90}]


def test_init_metrics_get_their_own_axis_and_other_metrics_none(tmp_path):
    accelerator = FakeAccelerator()
    tracker = tracking.Tracker(accelerator, wandb_config(), tmp_path)
    for iteration in range(3):
        tracker.log({"init/kmeans_sse": 1.0 / (iteration + 1), "init/kmeans_iteration": iteration})
    tracker.log({"final/class_incremental/kvb/average_accuracy": 0.9})
    assert accelerator.run.definitions == [("init/kmeans_iteration", None), ("init/kmeans_sse", "init/kmeans_iteration")]
    assert len(accelerator.run.rows) == 4


def test_other_ranks_log_nothing_and_never_touch_the_run(tmp_path):
    accelerator = FakeAccelerator(is_main_process=False)
    tracker = tracking.Tracker(accelerator, wandb_config(), tmp_path)
    tracker.log_stream("class_incremental/kvb", {"class_incremental/kvb/loss": 1.0}, 0, 10, 60)
    tracker.log({"init/kmeans_sse": 1.0, "init/kmeans_iteration": 0})
    tracker.log_table("t", ["a"], [[1]])
    tracker.log_artifact("results", "results", {"x": tmp_path / "x"})
    assert accelerator.config is None and not accelerator.run.rows and not accelerator.run.definitions


def test_run_config_has_world_size_layout_and_versions(tmp_path):
    accelerator = FakeAccelerator(num_processes=4)
    tracking.Tracker(accelerator, wandb_config("parallel.num_shards=2"), tmp_path)
    assert accelerator.config["launch"] == {"world_size": 4, "replicas": 2, "shards": 2, "layout": "2x2"}
    assert set(accelerator.config["versions"]) == {"kvb_dist", "torch", "python", "accelerate", "wandb"}
    assert accelerator.config["bottleneck"]["num_codebooks"] == wandb_config().bottleneck.num_codebooks
    tracking.Tracker(other := FakeAccelerator(num_processes=3), wandb_config(), tmp_path / "b")
    assert other.config["launch"]["layout"] == "1x3"  # num_shards 0: every rank a shard


def test_final_table_has_accuracy_and_forgetting():
    table = evaluate.format_table({
        "kvb": {"class_incremental": {"average_accuracy": 0.95, "forgetting": 0.012}, "iid": {"average_accuracy": 0.97}},
        "linear_probe": {"class_incremental": {"average_accuracy": 0.2, "forgetting": 0.8}},
    })
    lines = table.splitlines()
    assert lines[0].split() == ["learner", "setting", "accuracy", "forgetting"]
    assert lines[1].split() == ["kvb", "class_incremental", "0.950", "0.012"]
    assert lines[2].split() == ["kvb", "iid", "0.970", "-"]
    assert lines[3].split() == ["linear_probe", "class_incremental", "0.200", "0.800"]
    assert len({len(line) for line in lines}) == 1  # aligned columns


# ---------------------------------------------------------------------------------------------
# End to end: 2 gloo ranks, wandb offline, SIGTERM during training, the same command again


def records(wandb_file: Path):
    """The records of an offline run's transaction log, as `wandb leet inspect --json` prints them."""
    inspected = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(wandb_file)],
        capture_output=True, text=True, timeout=60, check=True, env=environment(),
    )
    return [json.loads(line) for line in inspected.stdout.splitlines() if line.strip()]


def stream_steps(log, stream: str, metric: str):
    """The stream's step of every row that logged <stream>/<metric>."""
    axis, name = f"{stream}/step", f"{stream}/{metric}"
    return [r["history"]["item"][axis] for r in log if r["type"] == "history" and name in r["history"]["item"]]


@pytest.mark.timeout(150)
def test_sigterm_then_rerun_logs_to_one_offline_run_whose_stream_steps_continue(tmp_path):
    wandb_args = ("run.tracker=wandb", "run.wandb_mode=offline")
    env = dict(environment(), WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
               WANDB_DATA_DIR=str(tmp_path / "wandb_data"))
    stderr = sigterm_one_rank_mid_training(command("torchrun", tmp_path, *wandb_args), tmp_path, env)
    setting, learner, task, step = re.search(r"stopped by signal 15 (\w+)/(\w+) task (\d+) step (\d+)", stderr).groups()
    stopped_at = tracking.stream_step(int(task), int(step), 60)  # SMALL_TOY: train.steps_per_task=60
    rerun = subprocess.run(command("torchrun", tmp_path, *wandb_args), cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "resumes at task" in rerun.stderr

    run_folder = tmp_path / "toy"
    run_id = (run_folder / "wandb_run_id").read_text()
    assert re.fullmatch(r"[0-9a-f]{12}", run_id) and not list(run_folder.glob(".wandb_run_id.tmp-*"))
    # One offline run folder per attempt (rank 0 only), both of the one run id.
    attempts = sorted((run_folder / "wandb").glob("offline-run-*"))
    assert [a.name.rsplit("-", 1)[1] for a in attempts] == [run_id, run_id], attempts
    before, after = (records(next(a.glob("run-*.wandb"))) for a in attempts)
    assert [r["run"]["run_id"] for r in before + after if r["type"] == "run"] == [run_id, run_id]

    stream = f"{setting}/{learner}"
    # The loss is logged every 10 steps, over 4 tasks of 60: the rerun goes on after the stop.
    assert stream_steps(before, stream, "loss") == list(range(10, stopped_at + 1, 10))
    assert stream_steps(after, stream, "loss") == list(range(stopped_at + 10, 4 * 60 + 1, 10))
    accuracy_steps = stream_steps(before, stream, "accuracy_seen") + stream_steps(after, stream, "accuracy_seen")
    assert accuracy_steps == [60, 120, 180, 240]  # after each task, once
    axes = {r["metric"].get("glob_name"): r["metric"].get("step_metric") for r in after if r["type"] == "metric"}
    assert axes[f"{stream}/*"] == f"{stream}/step"

    # The rerun's evaluate phase: the accuracy matrix as a table, results and plots as an artifact.
    artifacts = {r["artifact"]["type"]: r["artifact"] for r in after if r["type"] == "artifact"}
    assert artifacts["results"]["name"] == f"results-{run_id}"
    contents = {c["path"] for c in artifacts["results"]["manifest"]["contents"]}
    assert "results.json" in contents and "plots/accuracy_class_incremental_kvb.png" in contents
    assert "run_table" in artifacts
    config = next(r["config"]["update"] for r in after if r["type"] == "config")
    assert config["launch"] == {"world_size": 2, "replicas": 1, "shards": 2, "layout": "1x2"}
    assert "forgetting" in rerun.stdout
