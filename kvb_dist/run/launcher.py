"""kvb_dist launcher: freeze -> initialize -> train -> evaluate, from a config.

`--config NAME` takes a YAML file, or the name of a shipped config (digits, toy, cifar10_dino;
installed with the package, so `kvb-dist --config digits` works outside a checkout). The same
entry runs as `kvb-dist`, `python -m kvb_dist run` and, from a checkout, `launch/run.py` (the
file torchrun and accelerate launch take).

One process:
    kvb-dist --config digits                     (or: python launch/run.py --config configs/digits.yaml)
One node, N ranks (torchrun):
    torchrun --standalone --nproc_per_node 2 launch/run.py --config digits
One node on CPU with Accelerate (N processes, gloo; also on a host with GPUs, which the config
hides from the ranks; ACCELERATE_USE_CPU=1 in the environment forces CPU too):
    accelerate launch --config_file launch/accelerate_cpu.yaml --num_processes 2 launch/run.py --config digits
One node with several GPUs (--num_processes = the number of GPUs if not 8):
    accelerate launch --config_file launch/accelerate_multi_gpu.yaml --num_processes 4 launch/run.py --config cifar10_dino
Several nodes: run on every node with the same --num_machines and --num_processes (ALL
processes of all nodes; the file says 4 machines x 8 GPUs = 32), its own --machine_rank
(0 .. N-1) and --main_process_ip = the address of node 0. With a count that does not match
the nodes that start, the launchers wait (silently, up to 15 minutes; LOGLEVEL=INFO shows
torch's rendezvous):
    accelerate launch --config_file launch/accelerate_multi_node.yaml --num_machines 2 --num_processes 16 \\
        --machine_rank $NODE_RANK --main_process_ip $HEAD launch/run.py --config cifar10_dino

Overrides follow the config: `train.lr=0.1 run.name=try2`. `--phases train evaluate` runs only
those phases; `--print-config` prints the resolved config as YAML and exits. A config error
(or a run folder in use, or made with another config) is one line and exit status 2 (`--debug`:
the traceback). Running the same command again after a
crash resumes from the run folder; a SIGTERM (a scheduler's preemption) checkpoints after the
current step and exits with code 75. One run at a time uses a run folder, and only with the
config it was made with: changes that alter results are refused unless `--redo PHASE` redoes
that phase and the later ones. run.threads=0 picks torch threads per rank at the start: the
CPUs this process may use that other processes do not keep busy, shared by the ranks on this
node (OMP_NUM_THREADS, when set, decides instead; run.threads=N fixes it).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch

import kvb_dist
from kvb_dist.run.config import load_config
from kvb_dist.run.folder import RunFolder, RunFolderError
from kvb_dist.run.phases import PHASES, RunContext, run_phases
from kvb_dist.run.stop import EXIT_PREEMPTED, Preempted, StopRequest

logger = logging.getLogger("kvb_dist")

PROG = "kvb-dist"
EXIT_CONFIG_ERROR = 2  # argparse's status for a usage error; a bad config is one


def shipped_configs() -> Dict[str, Path]:
    """The experiment configs that come with kvb_dist, by name.

    Installed, they are package data in kvb_dist/configs/ (pyproject maps the checkout's
    configs/ there); in a checkout on sys.path, the checkout's configs/ beside the package.
    """
    package = Path(kvb_dist.__file__).resolve().parent
    folder = package / "configs"
    if not folder.is_dir() and (package.parent / "pyproject.toml").is_file():
        folder = package.parent / "configs"
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def resolve_config(name: Optional[str]) -> Optional[Path]:
    """--config's value as a file: an existing path, else a shipped config's name (with or without .yaml)."""
    if name is None or Path(name).is_file():
        return None if name is None else Path(name)
    shipped = shipped_configs()
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if stem in shipped and os.sep not in stem:
        return shipped[stem]
    raise ValueError(f"--config {name!r} is neither a file nor a shipped config; shipped configs: {sorted(shipped)}")


def parse_args(argv: Optional[List[str]]):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", default=None,
        help="a YAML file or a shipped config's name (default: the built-in defaults = the digits demo)",
    )
    parser.add_argument("--phases", nargs="+", default=list(PHASES), metavar="PHASE", help=f"some of {list(PHASES)}")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a stuck collective fails")
    parser.add_argument(
        "--redo", default=None, choices=PHASES,
        help="delete what this phase and the later ones wrote, then run them with the current config",
    )
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config (defaults, then the file, then the overrides) as YAML and exit",
    )
    parser.add_argument("--debug", action="store_true", help="a config error raises with its traceback")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    # `--phases train run.name=x`: argparse hands the overrides after --phases to it; they are overrides.
    args.overrides = [*(word for word in args.phases if "=" in word), *args.overrides]
    args.phases = [word for word in args.phases if "=" not in word]
    unknown = [phase for phase in args.phases if phase not in PHASES]
    if unknown or not args.phases:
        parser.error(f"--phases takes some of {list(PHASES)}, got {unknown or 'none'}")
    return args


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota.

    A container limited with --cpus keeps every host CPU in its affinity mask; only the quota
    (cpu.max) says how much of them it gets.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit visible
    return cpus


def busy_cpus_elsewhere(cpus: int) -> int:
    """CPUs other processes keep busy (the 1-minute load average), when the load is about our CPUs.

    The load average counts the whole machine: it says how busy this process's CPUs are only
    when they are all of the machine's (no affinity mask, no quota, as on a shared 2-core box).
    """
    if cpus != os.cpu_count() or not hasattr(os, "getloadavg"):
        return 0
    return min(cpus, round(os.getloadavg()[0]))


def default_num_threads(environ: Mapping[str, str] = os.environ) -> Optional[int]:
    """Torch threads per rank for run.threads=0: this node's idle CPUs shared by its ranks, at least 1.

    Idle, not all: an OpenMP thread that waits for a descheduled sibling spins, so threads beyond
    the idle CPUs cost far more than they give. Toy config, one process, 2 cores (18 s unloaded
    with 1 or 2 threads): with one busy process beside it 177 s at 2 threads, 18 s at 1; with two,
    103 s and 29 s. None when OMP_NUM_THREADS is set: torch already follows it (torchrun sets 1
    for several ranks, accelerate launch its --num_cpu_threads_per_process), and it wins.
    """
    if environ.get("OMP_NUM_THREADS"):
        return None
    cpus = usable_cpus()
    ranks_here = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(cpus // ranks_here, cpus - busy_cpus_elsewhere(cpus)))


def use_cpu(cuda_available: bool, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the ranks run on CPU with gloo: no GPU visible, or ACCELERATE_USE_CPU says so.

    ACCELERATE_USE_CPU=True/False comes from `accelerate launch --cpu` (one process), or from the
    user (`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...`, torchrun). For MULTI_GPU
    configs accelerate launch does not pass `use_cpu` on: launch/accelerate_cpu.yaml hides the
    GPUs from the ranks (gpu_ids) instead, so they see none.
    """
    from accelerate.utils import str_to_bool

    return not cuda_available or bool(str_to_bool(environ.get("ACCELERATE_USE_CPU", "false")))


def init_process_group_per_attempt(timeout: timedelta, backend: Optional[str]) -> None:
    """Under a one-node torchrun, the default process group in a store namespace of its own per restart.

    torchrun's agent hosts one TCPStore for the whole job and gives every restart the same
    MASTER_ADDR/PORT (TORCHELASTIC_USE_AGENT_STORE=True), and env:// joins it without a per-attempt
    prefix. gloo's address exchange and store barriers of the failed attempt are still there
    when the restart begins: a restarted rank reads the dead rank's old address (connection
    refused) or waits forever. Measured with --max-restarts 1 and a SIGKILLed rank: 0 of 3 runs
    recovered before, 10 of 10 with the prefix. On several nodes the restart count may differ
    between agents, so there the agents must run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 instead
    (README). Accelerator reuses a process group that exists.
    """
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    one_node = os.environ.get("LOCAL_WORLD_SIZE") == str(world_size)
    if dist.is_initialized() or world_size < 2 or not one_node or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout)
    store = dist.PrefixStore(f"kvb_dist/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    dist.init_process_group(backend or "gloo", store=store, rank=int(os.environ["RANK"]), world_size=world_size, timeout=timeout)


def config_error(problem: BaseException, debug: bool, is_main: bool) -> int:
    """A config or run-folder error, which every rank finds alike: one line on the main process
    and exit status 2, or the traceback with --debug."""
    if debug:
        raise problem
    if is_main:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
    return EXIT_CONFIG_ERROR


def main(argv: Optional[List[str]] = None) -> int:
    import yaml

    args = parse_args(argv)
    # Before the process group exists RANK is all a rank knows; every rank loads the same config.
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config = load_config(resolve_config(args.config), args.overrides, world_size=world_size)
    except (ValueError, yaml.YAMLError) as problem:  # a file that is not YAML raises YAMLError
        return config_error(problem, args.debug, is_main=rank == 0)
    if args.print_config:  # a file that --config reads back as the same config
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    # Before the process group exists: a SIGTERM from here on checkpoints instead of killing.
    stop = StopRequest().install()
    threads = config.run.threads or default_num_threads()
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
    )

    from accelerate import Accelerator, InitProcessGroupKwargs

    from kvb_dist.distributed.layout import ParallelLayout
    from kvb_dist.run.tracking import Tracker

    # Without a GPU (or with use_cpu), Accelerator(cpu=True) is what makes torchrun / accelerate
    # launch start a gloo process group; a plain Accelerator() would report one process on every
    # rank. With GPUs, small bookkeeping collectives (sizes, flags, seeds) run on CPU tensors:
    # NCCL for CUDA tensors, gloo for CPU ones.
    cpu = use_cpu(torch.cuda.is_available())
    process_group = InitProcessGroupKwargs(
        timeout=timedelta(seconds=args.timeout), backend=None if cpu else "cuda:nccl,cpu:gloo"
    )
    if world_size > 1:  # the rendezvous below blocks until every rank has joined
        logger.info(
            "waiting for %d ranks at %s:%s (%s)", world_size, os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"),
            "gloo" if cpu else "nccl + gloo",
        )
    init_process_group_per_attempt(process_group.timeout, process_group.backend)
    accelerator = Accelerator(
        cpu=cpu,
        log_with="wandb" if config.run.tracker == "wandb" else None,
        project_dir=str(config.run_dir),
        kwargs_handlers=[process_group],
    )
    tracker = folder = summary = None
    try:
        try:
            layout = ParallelLayout.build(config.parallel.num_shards or None)
        except ValueError as problem:  # parallel.num_shards against the world size: the same on every rank
            return config_error(problem, args.debug, is_main=accelerator.is_main_process)
        logger.info(
            "run %s: %d rank(s) = %d replica(s) x %d shard(s), device %s, %d thread(s)",
            config.run_dir, layout.world_size, layout.num_replicas, layout.num_shards, accelerator.device,
            torch.get_num_threads(),
        )
        try:
            folder = RunFolder.claim(config, layout, redo=args.redo)
        except RunFolderError as problem:  # in use, or made with another config: raised on every rank
            return config_error(problem, args.debug, is_main=accelerator.is_main_process)
        tracker = Tracker(accelerator, config, config.run_dir)
        ctx = RunContext(
            config=config, layout=layout, tracker=tracker, device=accelerator.device, stop=stop,
            mixed_precision=str(accelerator.mixed_precision),
        )
        summary = run_phases(ctx, args.phases)
    except Preempted as where:
        logger.warning("stopped by signal %s %s, checkpoint written: run the same command to resume", stop.signal_number, where)
        return EXIT_PREEMPTED
    finally:
        if tracker is not None:
            tracker.finish()
        if folder is not None:
            folder.release()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    # After the tracker has finished (wandb prints its own lines then): the table is the last thing printed.
    if accelerator.is_main_process and summary:
        print(f"\nresults: {config.run_dir / 'results.json'}\nplots:   {summary['plots']}")
        print("\nfinal average accuracy (all classes, after the last task)")
        print(summary["table"], flush=True)
    return 0
