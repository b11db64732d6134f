"""The launcher end to end on a small toy config: python, torchrun and accelerate launch; killed
ranks and resumes (also on another world size); wandb offline; bad configs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from kvb_dist.distributed.checkpoint import load_full

REPO = Path(__file__).resolve().parent.parent
ENTRY = str(REPO / "launch" / "run.py")
SMALL_TOY = [
    "data.toy_samples_per_class=100", "data.samples_per_shard=100",
    # k-means passes are order-free, so every world size fits the same keys (EMA epochs over
    # shards split by rank are not: test_ema_initialization_on_two_ranks checks those apart).
    "init.method=kmeans", "init.kmeans_iters=5", "init.ema_epochs=4", "init.batch_size=64",
    "train.steps_per_task=60", "train.settings=class_incremental", "train.learners=kvb,linear_probe",
    "run.checkpoint_every=10", "run.tracker=none",
]
LAUNCH_TIMEOUT = 240


def environment():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(form: str, out_dir: Path, *extra: str):
    args = ["--config", str(REPO / "configs" / "toy.yaml"), "--timeout", "60", f"run.out_dir={out_dir}", *SMALL_TOY, *extra]
    if form == "python":
        return [sys.executable, ENTRY, *args]
    if form == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", ENTRY, *args]
    assert form == "accelerate"
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "accelerate_cpu.yaml"),
        "--main_process_port", str(free_port()), ENTRY, *args,
    ]


def launch(form: str, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command(form, out_dir, *extra), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )
    assert result.returncode == 0, f"{form} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def launch_and_kill(form: str, out_dir: Path) -> None:
    """Starts a run and SIGKILLs one rank as soon as a mid-training checkpoint exists."""
    checkpoint = out_dir / "toy" / "checkpoints" / "train-class_incremental-kvb.pt"
    process = subprocess.Popen(command(form, out_dir), cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while not checkpoint.exists():
            assert process.poll() is None, f"{form} ended before training was checkpointed:\n{process.stderr.read()[-4000:]}"
            assert time.monotonic() < deadline, "no training checkpoint appeared"
            time.sleep(0.05)
        ranks = [p for p in psutil.Process(process.pid).children(recursive=True) if ENTRY in " ".join(p.cmdline())]
        victim = ranks[-1] if ranks else psutil.Process(process.pid)
        victim.send_signal(signal.SIGKILL)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0
    state = torch.load(checkpoint, weights_only=True)
    assert not state["done"], "the run finished before it was killed; nothing was resumed"


def outcome(out_dir: Path):
    results = json.loads((out_dir / "toy" / "results.json").read_text())["results"]
    checkpoints = out_dir / "toy" / "checkpoints"
    record = torch.load(checkpoints / "train-class_incremental-kvb.pt", weights_only=True)
    return results, load_full(checkpoints / record["tensors"], prefix="bottleneck.")["values"]


def assert_same_outcome(got, expected, atol=1e-6):
    results, values = got
    expected_results, expected_values = expected
    torch.testing.assert_close(values, expected_values, atol=atol, rtol=1e-5)
    for learner, by_setting in expected_results.items():
        for setting, metrics in by_setting.items():
            assert results[learner][setting]["average_accuracy"] == pytest.approx(metrics["average_accuracy"], abs=1e-9)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run, with wandb logging offline."""
    out = tmp_path_factory.mktemp("reference")
    result = launch("python", out, "run.tracker=wandb", "run.wandb_mode=offline")
    assert "final average accuracy" in result.stdout
    return out


@pytest.mark.timeout(300)
def test_python_run_learns_the_toy_and_logs_to_wandb_offline(reference):
    results, _ = outcome(reference)
    assert results["kvb"]["class_incremental"]["average_accuracy"] >= 0.9
    assert results["linear_probe"]["class_incremental"]["average_accuracy"] <= 0.35
    assert (reference / "toy" / "plots" / "accuracy_class_incremental_kvb.png").is_file()
    logs = list((reference / "toy" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, list((reference / "toy").rglob("*"))
    inspected = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json", str(logs[0])],
        capture_output=True, text=True, timeout=120, env=environment(),
    )
    record = json.loads(inspected.stdout)
    assert record["state"] == "finished" and record["config"]["bottleneck"]["num_codebooks"] == 1
    summary = record["summary"]
    for key in ("class_incremental/kvb/loss", "class_incremental/kvb/accuracy_seen", "class_incremental/kvb/unused_keys",
                "final/class_incremental/kvb/average_accuracy", "init/kmeans_sse", "class_incremental/kvb/samples_per_s"):
        assert key in summary, sorted(summary)


@pytest.mark.timeout(300)
def test_torchrun_two_ranks_compute_what_one_rank_computes(reference, tmp_path):
    result = launch("torchrun", tmp_path)
    assert "2 rank(s) = 1 replica(s) x 2 shard(s)" in result.stderr
    assert_same_outcome(outcome(tmp_path), outcome(reference), atol=1e-5)


@pytest.mark.timeout(300)
def test_accelerate_launch_two_ranks_with_ema_initialization(tmp_path):
    result = launch("accelerate", tmp_path, "init.method=ema", "parallel.num_shards=1")
    assert "2 rank(s) = 2 replica(s) x 1 shard(s)" in result.stderr
    results, _ = outcome(tmp_path)
    assert results["kvb"]["class_incremental"]["average_accuracy"] >= 0.9
    assert results["linear_probe"]["class_incremental"]["average_accuracy"] <= 0.35


@pytest.mark.timeout(600)
@pytest.mark.parametrize("killed, resumed", [("torchrun", "torchrun"), ("torchrun", "python"), ("python", "torchrun")])
def test_killed_rank_then_resume(killed, resumed, reference, tmp_path):
    launch_and_kill(killed, tmp_path)
    result = launch(resumed, tmp_path)
    assert "resumes at task" in result.stderr
    assert_same_outcome(outcome(tmp_path), outcome(reference), atol=1e-6 if killed == resumed == "python" else 1e-5)


def test_bad_config_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, ENTRY, "--config", str(REPO / "configs" / "toy.yaml"), f"run.out_dir={tmp_path}", "train.optimizer=lbfgs"],
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "train.optimizer='lbfgs' is not valid; choose from ['adam', 'sgd', 'adagrad']" in result.stderr


def wait_for_training_checkpoint(process, out_dir: Path) -> None:
    checkpoint = out_dir / "toy" / "checkpoints" / "train-class_incremental-kvb.pt"
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not checkpoint.exists():
        assert process.poll() is None, f"the run ended before training was checkpointed:\n{process.stderr.read()[-4000:]}"
        assert time.monotonic() < deadline, "no training checkpoint appeared"
        time.sleep(0.05)


def sigterm_one_rank_mid_training(cmd, out_dir: Path, env) -> str:
    """Starts a 2-rank torchrun, sends SIGTERM to one worker once training is checkpointed; its stderr."""
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_training_checkpoint(process, out_dir)
        ranks = [p for p in psutil.Process(process.pid).children(recursive=True) if ENTRY in " ".join(p.cmdline())]
        assert len(ranks) == 2
        ranks[-1].send_signal(signal.SIGTERM)
        return process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.timeout(600)
def test_one_run_per_folder_and_only_with_its_config(reference, tmp_path):
    # A long iid stream after the class-incremental one keeps the first run busy while the second starts.
    longer = ("train.settings=class_incremental,iid", "train.iid_steps=2000")
    first = subprocess.Popen(command("python", tmp_path, *longer), cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_training_checkpoint(first, tmp_path)
        started = time.monotonic()
        second = subprocess.run(command("torchrun", tmp_path), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        refused_after = time.monotonic() - started
        assert first.poll() is None, "the first run should still be training"
        _, first_stderr = first.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, first_stderr[-4000:]
    assert second.returncode != 0 and refused_after < 60
    # Both ranks refuse; rank 0 says why, in one line, with no traceback of ours (torchrun prints its own).
    assert second.stderr.count(f"kvb-dist: error: run folder {tmp_path / 'toy'} is in use by another run (pid {first.pid}") == 1
    assert "RunFolderError" not in second.stderr
    assert_same_outcome(outcome(tmp_path), outcome(reference))  # the first run's results are intact

    changed = subprocess.run(command("python", tmp_path, *longer, "train.lr=0.5"), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "train.lr: 0.01 (saved) vs 0.5 (now)" in changed.stderr and "--redo train" in changed.stderr
    launch("python", tmp_path, *longer, "run.checkpoint_every=7")  # changes no result: continues (here: finds all done)
    assert_same_outcome(outcome(tmp_path), outcome(reference))


@pytest.mark.timeout(600)
def test_sigterm_checkpoints_then_resumes_exactly(reference, tmp_path):
    """SIGTERM to one rank: every rank stops after the same step with a checkpoint, exits 75."""
    stderr = sigterm_one_rank_mid_training(command("torchrun", tmp_path), tmp_path, environment())
    assert stderr.count("checkpoint written: run the same command to resume") == 2, stderr[-4000:]
    assert "exitcode  : 75" in stderr
    # The checkpoint is the one of the step where the ranks stopped.
    setting, learner, task, step = re.search(r"stopped by signal 15 (\w+)/(\w+) task (\d+) step (\d+)", stderr).groups()
    state = torch.load(tmp_path / "toy" / "checkpoints" / f"train-{setting}-{learner}.pt", weights_only=True)
    assert (state["done"], state["task"], state["step"]) == (False, int(task), int(step))
    result = launch("python", tmp_path)
    assert "resumes at task" in result.stderr
    assert_same_outcome(outcome(tmp_path), outcome(reference), atol=1e-5)


@pytest.mark.timeout(600)
def test_torchrun_max_restarts_recovers_from_a_killed_rank_by_itself(reference, tmp_path):
    restarting = command("torchrun", tmp_path)
    restarting.insert(restarting.index("--standalone"), "--max-restarts=1")
    process = subprocess.Popen(restarting, cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_training_checkpoint(process, tmp_path)
        ranks = [p for p in psutil.Process(process.pid).children(recursive=True) if ENTRY in " ".join(p.cmdline())]
        ranks[-1].send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        if process.poll() is None:
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
    assert process.returncode == 0, stderr[-4000:]
    assert "resumes at task" in stderr  # the restarted workers continued from the checkpoint
    assert_same_outcome(outcome(tmp_path), outcome(reference), atol=1e-5)
