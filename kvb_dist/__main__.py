"""kvb_dist's command line.

    python -m kvb_dist run --config configs/digits.yaml        the launcher (as launch/run.py)
    python -m kvb_dist data write-digits shards/digits          shard sets (python -m kvb_dist.data)
    python -m kvb_dist export CHECKPOINT OUT.pt [--prefix bottleneck.] [--original]
    python -m kvb_dist import IN.pt CHECKPOINT [--entry bottleneck] [--prefix bottleneck.]

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


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        from launch.run import main as run_main

        return run_main(argv[1:])
    if argv and argv[0] == "data":
        from kvb_dist.data.__main__ import main as data_main

        return data_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m kvb_dist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="the launcher: python -m kvb_dist run --help")
    commands.add_parser("data", help="shard sets: python -m kvb_dist data --help")
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
