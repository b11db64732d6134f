"""kvb_dist's command line (installed as `kvb-dist`; `python -m kvb_dist` is the same).

    kvb-dist run --config digits [section.key=value ...]   the launcher (kvb_dist.run.launcher)
    kvb-dist --config digits                               the same: without a subcommand, run
    kvb-dist data write-digits shards/digits               shard sets (python -m kvb_dist.data)
    kvb-dist export CHECKPOINT OUT.pt [--prefix bottleneck.] [--original]
    kvb-dist import IN.pt CHECKPOINT [--entry bottleneck] [--prefix bottleneck.]
    kvb-dist bench NAME [args]                             a benchmark (kvb_dist.bench.NAME)

export turns a sharded checkpoint (a folder, or the record .pt that names one) into one
state-dict file that `KeyValueBottleneck.load_state_dict` loads (`--original`: exactly the
original code's names). It holds the whole model in one process: for models that fit.
import writes one file's tensors as a sharded checkpoint that any layout loads its slices from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch


def _checkpoint_folder(path: Path) -> Path:
    """A checkpoint folder, or the folder a launcher record (`<name>.pt`) names."""
    if path.is_file():
        record = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(record, dict) or "tensors" not in record:
            raise ValueError(f"{path} is neither a checkpoint folder nor a record naming one")
        return path.parent / record["tensors"]
    return path


def export(args) -> int:
    from kvb_dist.core import ORIGINAL_STATE_NAMES
    from kvb_dist.distributed.checkpoint import load_full

    state = load_full(_checkpoint_folder(Path(args.checkpoint)), prefix=args.prefix)
    if args.original:
        missing = [name for name in ORIGINAL_STATE_NAMES if name not in state]
        if missing:
            raise ValueError(f"--original: the checkpoint has no {missing} under prefix {args.prefix!r}; it has {sorted(state)}")
        state = {name: state[name] for name in ORIGINAL_STATE_NAMES}
    torch.save(state, args.out)
    print(f"wrote {len(state)} tensors ({sum(t.numel() * t.element_size() for t in state.values()) / 2**20:.1f} MiB) to {args.out}")
    return 0


def import_(args) -> int:
    from kvb_dist.distributed.checkpoint import save_full

    if Path(args.checkpoint).exists():
        raise ValueError(f"{args.checkpoint} exists; give a new folder")
    state = torch.load(args.state_dict, map_location="cpu", weights_only=True)
    if args.entry:
        state = state[args.entry]
    tensors = {name: t for name, t in state.items() if isinstance(t, torch.Tensor)}
    save_full(tensors, args.checkpoint, prefix=args.prefix)
    print(f"wrote {len(tensors)} tensors to the sharded checkpoint {args.checkpoint}")
    return 0


def bench_names() -> List[str]:
    """The benchmark modules of kvb_dist.bench, listed without importing them (they import the bench extra)."""
    import pkgutil

    import kvb_dist.bench

    return sorted(module.name for module in pkgutil.iter_modules(kvb_dist.bench.__path__))


def bench(argv: List[str]) -> int:
    import importlib

    names = bench_names()
    parser = argparse.ArgumentParser(
        prog="kvb-dist bench", description="Runs one benchmark; `kvb-dist bench NAME --help` shows its options.",
    )
    parser.add_argument("name", choices=names, help="the benchmark (kvb_dist.bench.NAME)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv[:1])  # only the name: everything after it is the benchmark's
    result = importlib.import_module(f"kvb_dist.bench.{args.name}").main(argv[1:])
    return result if isinstance(result, int) else 0  # some benchmarks return their measurements


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # No subcommand but launcher arguments (`kvb-dist --config digits`, `kvb-dist train.lr=0.1`): run.
    if argv and (argv[0] == "run" or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")) or "=" in argv[0]):
        from kvb_dist.run.launcher import main as run_main

        return run_main(argv[1:] if argv[0] == "run" else argv)
    if argv and argv[0] == "data":
        from kvb_dist.data.__main__ import main as data_main

        return data_main(argv[1:])
    if argv and argv[0] == "bench":
        return bench(argv[1:])
    parser = argparse.ArgumentParser(prog="kvb-dist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="the launcher: kvb-dist run --help")
    commands.add_parser("data", help="shard sets: kvb-dist data --help")
    commands.add_parser("bench", help="benchmarks: kvb-dist bench --help")
    out = commands.add_parser("export", help="sharded checkpoint -> one state-dict file")
    out.add_argument("checkpoint", help="a checkpoint folder or the record .pt naming one")
    out.add_argument("out", help="the .pt file to write")
    out.add_argument("--prefix", default="", help="keep tensors named PREFIX* and drop the prefix (launcher: 'bottleneck.')")
    out.add_argument("--original", action="store_true", help="exactly the original code's KeyValueBottleneck names")
    into = commands.add_parser("import", help="one state-dict file -> a sharded checkpoint")
    into.add_argument("state_dict", help="a .pt file of tensors (loaded with weights_only=True)")
    into.add_argument("checkpoint", help="the checkpoint folder to create")
    into.add_argument("--entry", default=None, help="take the tensors from this entry (BottleneckedEncoder.save: 'bottleneck')")
    into.add_argument("--prefix", default="", help="prepend PREFIX to every name (launcher: 'bottleneck.')")
    args = parser.parse_args(argv)
    return export(args) if args.command == "export" else import_(args)


if __name__ == "__main__":
    sys.exit(main())
