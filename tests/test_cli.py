"""The command line: subcommands, shipped configs from an installed wheel, one-line config errors,
use_cpu on a GPU host, thread choice, and the final table printed last."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from kvb_dist.__main__ import main as cli
from kvb_dist.run import launcher
from kvb_dist.run.config import load_config

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(path.stem for path in (REPO / "configs").glob("*.yaml"))


def environment(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "ACCELERATE_USE_CPU", "WANDB_API_KEY"):
        env.pop(name, None)
    env.update(extra)
    return env


@pytest.mark.timeout(120)
def test_an_installed_wheel_ships_the_configs_and_no_launch_package(tmp_path):
    # Build from a copy: a build in the checkout writes build/ and egg-info there while others work in it.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("kvb_dist", "configs", "launch"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
        check=True, capture_output=True, timeout=100,
    )
    (wheel,) = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"kvb_dist"}
    assert {f"kvb_dist/configs/{stem}.yaml" for stem in SHIPPED} <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "kvb-dist = kvb_dist.__main__:main" in entry_points

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=100,
    )
    cwd = tmp_path / "elsewhere"  # no configs/ here, and not the checkout
    cwd.mkdir()
    env = environment(PYTHONPATH=str(target))
    where = subprocess.run(
        [sys.executable, "-c", "import kvb_dist.run.launcher as l; print(l.shipped_configs()['digits'])"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()) == target / "kvb_dist" / "configs" / "digits.yaml"  # the wheel's, not the checkout's
    printed = subprocess.run(
        [sys.executable, "-m", "kvb_dist", "run", "--config", "digits", "--print-config"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout) == load_config(REPO / "configs" / "digits.yaml").to_dict()


def test_run_prints_the_config_with_or_without_the_subcommand(capsys):
    assert cli(["run", "--config", "toy", "--print-config", "train.lr=0.25"]) == 0
    with_subcommand = capsys.readouterr().out
    assert cli(["--config", "toy.yaml", "--print-config", "train.lr=0.25"]) == 0  # no subcommand: run
    assert capsys.readouterr().out == with_subcommand
    assert yaml.safe_load(with_subcommand) == load_config(REPO / "configs" / "toy.yaml", ["train.lr=0.25"]).to_dict()
    assert cli(["train.lr=0.5", "--print-config"]) == 0  # an override first: run, on the defaults
    assert yaml.safe_load(capsys.readouterr().out)["train"]["lr"] == 0.5


@pytest.mark.parametrize("argv, expected", [
    (["--help"], "{run,data,bench,export,import}"),
    (["run", "--help"], "--num_machines"),  # the launcher's docstring, with the multi-node overrides
    (["data", "--help"], "write-digits"),
    (["bench", "--help"], "{checkpoint,core,kmeans,scale,sharded,step}"),
])
def test_subcommand_help(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit:
        cli(argv)
    assert exit.value.code == 0
    assert expected in capsys.readouterr().out


def test_bench_dispatches_to_the_named_benchmark(monkeypatch):
    import kvb_dist.bench.step

    seen = []
    monkeypatch.setattr(kvb_dist.bench.step, "main", lambda argv: seen.append(argv) or 0)
    assert cli(["bench", "step", "--pairs", "4096"]) == 0
    assert seen == [["--pairs", "4096"]]
    with pytest.raises(SystemExit) as exit:
        cli(["bench", "nope"])
    assert exit.value.code == 2


def test_import_then_export_round_trips_a_tiny_checkpoint(tmp_path):
    state = {"keys": torch.randn(2, 4, 3), "values": torch.randn(2, 4, 5)}
    torch.save({"bottleneck": {**state, "step": 3}}, tmp_path / "in.pt")
    assert cli(["import", str(tmp_path / "in.pt"), str(tmp_path / "ck"), "--entry", "bottleneck", "--prefix", "bottleneck."]) == 0
    assert cli(["export", str(tmp_path / "ck"), str(tmp_path / "out.pt"), "--prefix", "bottleneck."]) == 0
    exported = torch.load(tmp_path / "out.pt", weights_only=True)
    assert exported.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(exported[name], tensor)


def test_shipped_config_names_resolve_and_unknown_names_list_them(tmp_path):
    assert sorted(launcher.shipped_configs()) == SHIPPED
    assert launcher.resolve_config("digits") == launcher.resolve_config("digits.yaml") == launcher.shipped_configs()["digits"]
    mine = tmp_path / "digits"  # an existing file wins over the shipped name
    mine.write_text("run:\n  name: mine\n")
    assert launcher.resolve_config(str(mine)) == mine
    with pytest.raises(ValueError, match=r"--config 'digit' is neither a file nor a shipped config; shipped configs: \['cifar10_dino', 'digits', 'toy'\]"):
        launcher.resolve_config("digit")


def test_a_config_error_is_one_line_with_status_2_and_a_traceback_with_debug():
    command = [sys.executable, "-m", "kvb_dist", "--config", "toy", "train.lr=-1"]
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", "kvb-dist: error: train.lr must be > 0, got -1.0\n")
    debug = subprocess.run([*command, "--debug"], cwd=REPO, env=environment(), capture_output=True, text=True, timeout=60)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and debug.stderr.rstrip().endswith("ValueError: train.lr must be > 0, got -1.0")


def test_a_config_error_is_printed_by_rank_0_only(monkeypatch, capsys):
    for rank, expected in (("0", "kvb-dist: error: run.threads must be >= 0, got -2\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert launcher.main(["--config", "toy", "run.threads=-2"]) == 2
        assert capsys.readouterr().err == expected
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert launcher.main(["--config", "nope"]) == 2  # a name that is not shipped is a config error too
    assert "shipped configs: ['cifar10_dino', 'digits', 'toy']" in capsys.readouterr().err


def test_use_cpu_is_honoured_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launcher.use_cpu(torch.cuda.is_available(), {"ACCELERATE_USE_CPU": "True"})
    assert not launcher.use_cpu(torch.cuda.is_available(), {"ACCELERATE_USE_CPU": "False"})
    assert not launcher.use_cpu(torch.cuda.is_available(), {})
    assert launcher.use_cpu(False, {})  # no GPU: CPU whatever the config says


@pytest.mark.timeout(120)
def test_accelerate_cpu_config_runs_gloo_ranks_on_a_gpu_host(tmp_path):
    # A GPU host as the ranks see it: CUDA devices unless CUDA_VISIBLE_DEVICES hides them (CUDA
    # lists the devices before the first invalid index). Before, the ranks asked for NCCL and crashed.
    entry = tmp_path / "run_on_a_gpu_host.py"
    entry.write_text(
        "import os, sys\nimport torch\n"
        "visible = os.environ.get('CUDA_VISIBLE_DEVICES')\n"
        "torch.cuda.is_available = lambda: visible is None or visible.split(',')[0] not in ('', '-1')\n"
        f"sys.path.insert(0, {str(REPO)!r})\nfrom kvb_dist.run.launcher import main\nsys.exit(main())\n"
    )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # accelerate launch as on a GPU host too: since 1.16 it sets CUDA_VISIBLE_DEVICES from gpu_ids
    # only where it detects a CUDA accelerator.
    accelerate_on_a_gpu_host = (
        "import sys, accelerate.utils.launch as launch\n"
        "if hasattr(launch, 'get_torch_accelerator_backend'):\n"
        "    launch.get_torch_accelerator_backend = lambda check_available=True: ('cuda', None)\n"
        "from accelerate.commands.launch import main\nsys.argv[0] = 'accelerate'\nmain()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", accelerate_on_a_gpu_host, "--config_file", str(REPO / "launch" / "accelerate_cpu.yaml"),
         "--main_process_port", str(port), str(entry), "--config", "toy", "--phases", "freeze", "--timeout", "60",
         f"run.out_dir={tmp_path}", "run.tracker=none", "data.toy_samples_per_class=100", "data.samples_per_shard=100"],
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=100,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"waiting for 2 ranks at 127.0.0.1:{port} (gloo)" in result.stderr
    assert "2 rank(s) = 1 replica(s) x 2 shard(s), device cpu" in result.stderr


def test_threads_share_this_nodes_idle_cpus_unless_omp_num_threads_decides(monkeypatch):
    monkeypatch.setattr(launcher, "usable_cpus", lambda: 8)
    monkeypatch.setattr(launcher, "busy_cpus_elsewhere", lambda cpus: 0)
    assert launcher.default_num_threads({}) == 8
    assert launcher.default_num_threads({"LOCAL_WORLD_SIZE": "2"}) == 4
    assert launcher.default_num_threads({"LOCAL_WORLD_SIZE": "16"}) == 1  # at least one
    assert launcher.default_num_threads({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}) is None
    monkeypatch.setattr(launcher, "busy_cpus_elsewhere", lambda cpus: 7)  # a loaded machine
    assert launcher.default_num_threads({}) == 1
    monkeypatch.setattr(launcher, "busy_cpus_elsewhere", lambda cpus: cpus)
    assert launcher.default_num_threads({}) == 1
    monkeypatch.undo()
    assert 1 <= launcher.usable_cpus() <= (os.cpu_count() or 1)
    assert 0 <= launcher.busy_cpus_elsewhere(launcher.usable_cpus()) <= launcher.usable_cpus()
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # our CPUs are a part of the machine: its load is not theirs
    assert launcher.busy_cpus_elsewhere(2) == 0


def test_the_final_table_is_the_last_thing_printed(tmp_path, monkeypatch, capsys):
    from accelerate.state import AcceleratorState

    summary = {"table": "| learner | class-incremental |\n|---|---|\n| kvb | 0.9 |", "plots": str(tmp_path / "plots")}
    monkeypatch.setattr(launcher, "run_phases", lambda ctx, phases: summary)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert launcher.main(["--config", "toy", f"run.out_dir={tmp_path}", "run.tracker=none"]) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        AcceleratorState._reset_state(True)  # the Accelerator is a process-wide singleton
    out = capsys.readouterr().out
    assert out.index("results: ") < out.index("final average accuracy")
    assert out.rstrip().endswith(summary["table"])
