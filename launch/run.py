"""kvb_dist launcher: freeze -> initialize -> train -> evaluate, from a config in configs/.

One process:
    python launch/run.py --config configs/digits.yaml
One node, N ranks (torchrun):
    torchrun --standalone --nproc_per_node 2 launch/run.py --config configs/digits.yaml
One node on CPU with Accelerate (N processes, gloo):
    accelerate launch --config_file launch/accelerate_cpu.yaml launch/run.py --config configs/digits.yaml
One node with several GPUs:
    accelerate launch --config_file launch/accelerate_multi_gpu.yaml launch/run.py --config configs/cifar10_dino.yaml
Several nodes (run on every node, NODE_RANK = 0 .. N-1, HEAD = the IP of node 0):
    accelerate launch --config_file launch/accelerate_multi_node.yaml --machine_rank $NODE_RANK \\
        --main_process_ip $HEAD launch/run.py --config configs/cifar10_dino.yaml

Overrides follow the config: `train.lr=0.1 run.name=try2`. `--phases train evaluate` runs only
those phases; `--print-config` prints the resolved config as YAML and exits. Running the same command again after a crash resumes from the run folder; a
SIGTERM (a scheduler's preemption) checkpoints after the current step and exits with code 75.
One run at a time uses a run folder, and only with the config it was made with: changes that
alter results are refused unless `--redo PHASE` redoes that phase and the later ones.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import List, Optional

# Allow `python launch/run.py` from a checkout without installing.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kvb_dist.run.config import load_config  # noqa: E402
from kvb_dist.run.folder import RunFolder  # noqa: E402
from kvb_dist.run.phases import PHASES, RunContext, run_phases  # noqa: E402
from kvb_dist.run.stop import EXIT_PREEMPTED, Preempted, StopRequest  # noqa: E402

logger = logging.getLogger("kvb_dist")


def parse_args(argv: Optional[List[str]]):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: the built-in defaults = the digits demo)")
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
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    # `--phases train run.name=x`: argparse hands the overrides after --phases to it; they are overrides.
    args.overrides = [*(word for word in args.phases if "=" in word), *args.overrides]
    args.phases = [word for word in args.phases if "=" not in word]
    unknown = [phase for phase in args.phases if phase not in PHASES]
    if unknown or not args.phases:
        parser.error(f"--phases takes some of {list(PHASES)}, got {unknown or 'none'}")
    return args


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


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if args.print_config:  # a file that --config reads back as the same config
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    # Before the process group exists: a SIGTERM from here on checkpoints instead of killing.
    stop = StopRequest().install()
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)

    from accelerate import Accelerator, InitProcessGroupKwargs

    from kvb_dist.distributed.layout import ParallelLayout
    from kvb_dist.run.tracking import Tracker

    # Without a GPU, Accelerator(cpu=True) is what makes torchrun / accelerate launch start a
    # gloo process group; a plain Accelerator() would report one process on every rank. With
    # GPUs, small bookkeeping collectives (sizes, flags, seeds) run on CPU tensors: NCCL for
    # CUDA tensors, gloo for CPU ones.
    cuda = torch.cuda.is_available()
    process_group = InitProcessGroupKwargs(
        timeout=timedelta(seconds=args.timeout), backend="cuda:nccl,cpu:gloo" if cuda else None
    )
    init_process_group_per_attempt(process_group.timeout, process_group.backend)
    accelerator = Accelerator(
        cpu=not cuda,
        log_with="wandb" if config.run.tracker == "wandb" else None,
        project_dir=str(config.run_dir),
        kwargs_handlers=[process_group],
    )
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format=f"%(asctime)s [rank {accelerator.process_index}] %(name)s: %(message)s",
    )
    layout = ParallelLayout.build(config.parallel.num_shards or None)
    logger.info(
        "run %s: %d rank(s) = %d replica(s) x %d shard(s), device %s",
        config.run_dir, layout.world_size, layout.num_replicas, layout.num_shards, accelerator.device,
    )
    tracker = folder = None
    try:
        folder = RunFolder.claim(config, layout, redo=args.redo)
        tracker = Tracker(accelerator, config, config.run_dir)
        ctx = RunContext(
            config=config, layout=layout, tracker=tracker, device=accelerator.device, stop=stop,
            mixed_precision=str(accelerator.mixed_precision),
        )
        summary = run_phases(ctx, args.phases)
        if accelerator.is_main_process and summary:
            print("\nfinal average accuracy (all classes, after the last task)")
            print(summary["table"])
            print(f"\nresults: {config.run_dir / 'results.json'}\nplots:   {summary['plots']}")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
