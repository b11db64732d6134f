"""The run folder: one run at a time, the config it was made with, no leftovers (one process;
the launcher tests run the same on several ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvb_dist.distributed.layout import ParallelLayout
from kvb_dist.run.config import load_config
from kvb_dist.run.folder import CONFIG_NAME, LOCK_NAME, RANKS_LOCK_NAME, RunFolder, RunFolderError, first_phase_changed

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == "shared" else fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def config(tmp_path, *overrides):
    return load_config(None, [f"run.out_dir={tmp_path}", "run.name=r", *overrides])


def hold_lock(path, mode):
    """A process of another run holding `path` (its rank 0: exclusive; any of its ranks: shared)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path), mode], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tmp_path):
    layout = ParallelLayout.single()
    first = RunFolder.claim(config(tmp_path), layout)
    holder = json.loads((tmp_path / "r" / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid()
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.test_run_folder import claim_in_a_new_process as c; c(sys.argv[1])", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert other.returncode == 3, other.stderr[-2000:]
    assert f"in use by another run (pid {os.getpid()} on" in other.stdout and "fuser -v" in other.stdout
    first.release()
    assert (tmp_path / "r" / LOCK_NAME).read_text() == ""  # a clean end leaves no holder behind
    RunFolder.claim(config(tmp_path), layout).release()  # free again


def claim_in_a_new_process(out_dir):
    try:
        RunFolder.claim(config(out_dir), ParallelLayout.single())
    except RunFolderError as error:
        print(error)
        sys.exit(3)


def test_workers_of_an_earlier_run_that_still_run_are_detected(tmp_path):
    (tmp_path / "r").mkdir()
    orphan = hold_lock(tmp_path / "r" / RANKS_LOCK_NAME, "shared")
    try:
        with pytest.raises(RunFolderError, match="processes of an earlier run still use run folder"):
            RunFolder.claim(config(tmp_path), ParallelLayout.single())
    finally:
        orphan.kill()
        orphan.wait()
    RunFolder.claim(config(tmp_path), ParallelLayout.single()).release()  # the orphan's lock died with it


def test_a_dead_runs_lock_and_temporary_files_are_cleaned(tmp_path, caplog):
    run_dir = tmp_path / "r"
    RunFolder.claim(config(tmp_path), ParallelLayout.single()).release()
    # A killed run: its details stay in the lock file (its flock died with it), and partial writes stay.
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "elsewhere"}))
    leftovers = [run_dir / "checkpoints" / ".train-iid-kvb.pt.tmp-4242", run_dir / "embeddings" / "train" / "rank00000-000003.tar.tmp",
                 run_dir / "embeddings" / "train" / "index.json.tmp"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    kept = run_dir / "embeddings" / "train" / "rank00000-000002.tar"
    kept.write_bytes(b"finished")
    with caplog.at_level("INFO"):
        RunFolder.claim(config(tmp_path), ParallelLayout.single()).release()
    assert "did not end cleanly" in caplog.text and "999999" in caplog.text
    assert not any(path.exists() for path in leftovers) and kept.exists()


def test_a_changed_config_is_refused_naming_the_keys_unless_its_phases_are_redone(tmp_path):
    layout = ParallelLayout.single()
    RunFolder.claim(config(tmp_path), layout).release()
    run_dir = tmp_path / "r"
    for phase_output in ("embeddings/train", "checkpoints/initialize-000000", "checkpoints/train-iid-kvb-000001"):
        (run_dir / phase_output).mkdir(parents=True)
    (run_dir / "checkpoints" / "initialize.pt").write_bytes(b"")
    (run_dir / "results.json").write_text("{}")
    # Safe to continue with: no result changes.
    RunFolder.claim(config(tmp_path, "run.threads=3", "run.tracker=none", "parallel.num_shards=1"), layout).release()
    with pytest.raises(RunFolderError) as refused:
        RunFolder.claim(config(tmp_path, "bottleneck.num_codebooks=32", "train.lr=0.5"), layout)
    message = str(refused.value)
    assert "bottleneck.num_codebooks: 64 (saved) vs 32 (now)" in message and "train.lr: 0.01 (saved) vs 0.5 (now)" in message
    assert "--redo initialize" in message
    with pytest.raises(RunFolderError, match="--redo initialize"):  # redoing too late a phase is not enough
        RunFolder.claim(config(tmp_path, "bottleneck.num_codebooks=32"), layout, redo="train")
    RunFolder.claim(config(tmp_path, "bottleneck.num_codebooks=32"), layout, redo="initialize").release()
    assert (run_dir / "embeddings" / "train").is_dir()  # freeze's output kept
    assert not any((run_dir / "checkpoints").iterdir()) and not (run_dir / "results.json").exists()
    saved = (run_dir / CONFIG_NAME).read_text()
    assert "num_codebooks: 32" in saved
    RunFolder.claim(config(tmp_path, "bottleneck.num_codebooks=32"), layout).release()  # the new config is the folder's now


def test_which_phase_a_key_changes():
    assert first_phase_changed("run.seed") == "freeze"
    assert first_phase_changed("encoder.name") == "freeze"
    assert first_phase_changed("init.kmeans_iters") == "initialize"
    assert first_phase_changed("data.num_tasks") == "train"
    assert first_phase_changed("run.wandb_mode") is None
