"""Write and inspect shard sets.

    python -m kvb_dist.data write-digits OUT [--samples-per-shard 256]
    python -m kvb_dist.data write-numpy OUT --features x.npy [--labels y.npy]
    python -m kvb_dist.data write-toy OUT [--num-points 10000] [--classes 0 1] [--uniform] [--seed 0]
    python -m kvb_dist.data write-images IMAGE_ROOT OUT      (IMAGE_ROOT/<class name>/<image>)
    python -m kvb_dist.data info DIR [--verify]              (the index; --verify reads every shard)
    python -m kvb_dist.data index PATTERN [--out FILE] [--label-key cls]
                                                             (samples and labels per shard of a WebDataset
                                                             pattern, e.g. 'train-{000000..001281}.tar')
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

import numpy as np

from kvb_dist.data.shards import (
    DEFAULT_SAMPLES_PER_SHARD,
    ShardIndex,
    write_arrays,
    write_digits,
    write_image_folder,
    write_toy,
)


def _writer_args(args) -> dict:
    return dict(samples_per_shard=args.samples_per_shard, shard_prefix=args.shard_prefix,
                key_prefix=args.key_prefix, overwrite=args.overwrite)


def _verify(index: ShardIndex) -> int:
    """Reads every shard against the index; returns the number of bad shards."""
    from kvb_dist.data.stream import NonFiniteFeatures, ShardProblem, read_shard

    bad = 0
    for shard in index.shards:
        try:
            read_shard(index.url_of(shard), shard, index)
        except (ShardProblem, NonFiniteFeatures) as problem:
            bad += 1
            print(f"BAD {shard.name}: {problem}")
    empty = sum(1 for shard in index.shards if shard.num_samples == 0)  # valid, but worth knowing
    print(f"verified {index.num_shards} shards: {bad} bad" + (f", {empty} empty" if empty else ""))
    return bad


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvb_dist.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def writer(name, help_text):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("out", help="output folder (shards + index.json)")
        sub.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
        sub.add_argument("--shard-prefix", default="shard")
        sub.add_argument("--key-prefix", default="")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing shard set")
        return sub

    sub = writer("write-digits", "scikit-learn's digits (64 features in [0, 1], 10 classes)")
    sub.add_argument("--classes", type=int, nargs="+")
    sub = writer("write-numpy", "features [n, ...] (and labels [n]) from .npy files")
    sub.add_argument("--features", required=True)
    sub.add_argument("--labels")
    sub = writer("write-toy", "points of the paper's Fig. 2 toy")
    sub.add_argument("--num-points", type=int, default=10000)
    sub.add_argument("--classes", type=int, nargs="+")
    sub.add_argument("--uniform", action="store_true", help="unlabelled uniform points over the square")
    sub.add_argument("--seed", type=int, default=0)
    sub = commands.add_parser("write-images", help="an image folder (ROOT/<class>/<image>) as image shards")
    sub.add_argument("root")
    sub.add_argument("out")
    sub.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    sub.add_argument("--shard-prefix", default="shard")
    sub.add_argument("--key-prefix", default="")
    sub.add_argument("--overwrite", action="store_true")
    sub = commands.add_parser("info", help="print a shard set's index")
    sub.add_argument("folder")
    sub.add_argument("--verify", action="store_true", help="read every shard and check it against the index")

    sub = commands.add_parser("index", help="count the samples and labels of a WebDataset pattern's shards")
    sub.add_argument("pattern", help="WebDataset URL pattern: braces, '::' between patterns, local paths, pipe:")
    sub.add_argument("--out", help="write the counts as JSON here (default: print a summary only)")
    sub.add_argument("--label-key", default="cls")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "write-digits":
            index = write_digits(args.out, classes=args.classes, **_writer_args(args))
        elif args.command == "write-numpy":
            labels = None if args.labels is None else np.load(args.labels, allow_pickle=False)
            index = write_arrays(args.out, np.load(args.features, allow_pickle=False), labels, **_writer_args(args))
        elif args.command == "write-toy":
            index = write_toy(args.out, num_points=args.num_points, classes=args.classes, uniform=args.uniform,
                              seed=args.seed, **_writer_args(args))
        elif args.command == "write-images":
            index = write_image_folder(args.root, args.out, **_writer_args(args))
        elif args.command == "index":
            from kvb_dist.data.sources import count_pattern

            counts = count_pattern(args.pattern, args.label_key)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(counts, f, indent=1)
            print(f"{counts['num_samples']} samples in {counts['num_shards']} shards; classes ({len(counts['class_histogram'])}): "
                  f"{counts['class_histogram']}" + (f"\nwrote {args.out}" if args.out else ""))
            return 0
        else:
            index = ShardIndex.load(args.folder)
            print(index.summary())
            return 1 if args.verify and _verify(index) else 0
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(index.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
