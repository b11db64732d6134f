"""What sharding the codebooks costs and saves, per rank, at the paper size.

    python -m kvb_dist.bench.sharded                 # about 2 minutes on 2 cores
    python -m kvb_dist.bench.sharded --json out.json

1. memory: bytes of codebook state (keys, keys_avg, values, cluster sizes, counters) each rank
   holds, for S = 1, 2, 4 shards, against the ideal full / S;
2. traffic: bytes each rank sends per EMA step and per frozen forward + backward, counted on the
   real collectives (all_to_all_single, all_reduce, all_gather) in every layout, against the
   replicated scheme that all-reduces the C x J x (k + 1) EMA statistics every step (a ring
   all-reduce sends 2 (W - 1) / W of the payload per rank);
3. time: one EMA step and one frozen forward + backward of the global batch (median of
   --repeats) in every layout, the machine's cores split evenly over its ranks: on one machine
   more ranks add communication and gain no compute, so read the ratio as overhead, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from kvb_dist.distributed.layout import ParallelLayout
from kvb_dist.distributed.sharded import ShardedKeyValueBottleneck
from kvb_dist.distributed.spawn import run_ranks

PAPER = dict(num_codebooks=256, num_pairs=4096, dim_keys=14, dim_values=10, batch=256)
MiB = 1 << 20


class CountingCollectives:
    """Wraps the torch.distributed calls kvb_dist.distributed.layout makes and adds up what this rank sends."""

    def __init__(self):
        self.sent = 0
        self._originals = {}

    def __enter__(self):
        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
            me = dist.get_rank(group)
            splits = input_split_sizes or [input.numel() // dist.get_world_size(group)] * dist.get_world_size(group)
            self.sent += (sum(splits) - splits[me]) * input.element_size()  # the own block stays local
            return self._originals["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, group=group, **kw)

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, **kw):
            size = dist.get_world_size(group)
            self.sent += 2 * (size - 1) / size * tensor.numel() * tensor.element_size()  # ring all-reduce
            return self._originals["all_reduce"](tensor, op=op, group=group, **kw)

        def all_gather(tensors, tensor, group=None, **kw):
            self.sent += (dist.get_world_size(group) - 1) * tensor.numel() * tensor.element_size()
            return self._originals["all_gather"](tensors, tensor, group=group, **kw)

        for name, fn in (("all_to_all_single", all_to_all_single), ("all_reduce", all_reduce), ("all_gather", all_gather)):
            self._originals[name] = getattr(dist, name)
            setattr(dist, name, fn)
        return self

    def __exit__(self, *exc):
        for name, fn in self._originals.items():
            setattr(dist, name, fn)


def state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rank_worker(rank: int, world_size: int, num_shards: int, size: Dict, repeats: int) -> Dict:
    layout = ParallelLayout.build(num_shards)
    module = ShardedKeyValueBottleneck(
        size["num_codebooks"], size["num_pairs"], size["dim_keys"], size["dim_values"], layout=layout, seed=0
    )
    local = size["batch"] // world_size
    heads = torch.randn(local, size["num_codebooks"], size["dim_keys"], generator=torch.Generator().manual_seed(rank))

    @torch.no_grad()
    def ema_step():
        module(heads)

    def frozen_step():
        module.values.grad = None
        module(heads)[0].mean().backward()

    report = {"state_bytes": state_bytes(module)}
    with CountingCollectives() as counter:
        ema_step()
    report["ema_sent"] = counter.sent
    report["ema_seconds"] = _median_seconds(ema_step, repeats)
    module.freeze_keys()
    with CountingCollectives() as counter:
        frozen_step()
    report["frozen_sent"] = counter.sent
    report["frozen_seconds"] = _median_seconds(frozen_step, repeats)
    return report


def replicated_bytes_per_rank(size: Dict, world_size: int) -> float:
    """The replicated scheme: every rank all-reduces counts and sums, C x J x (k + 1) floats."""
    payload = size["num_codebooks"] * size["num_pairs"] * (size["dim_keys"] + 1) * 4
    return 2 * (world_size - 1) / world_size * payload


def measure(size: Dict, layouts: List[tuple], repeats: int) -> List[Dict]:
    rows = []
    for num_replicas, num_shards in layouts:
        world = num_replicas * num_shards
        # Every layout gets the whole machine: the cores are split evenly between its ranks.
        threads = max(1, (os.cpu_count() or 1) // world)
        reports = run_ranks(world, rank_worker, num_shards, size, repeats, timeout=900, threads=threads)
        rows.append(
            dict(
                layout=f"{num_replicas}x{num_shards}",
                world_size=world,
                max_state_mib=max(r["state_bytes"] for r in reports) / MiB,
                ema_sent_mib=max(r["ema_sent"] for r in reports) / MiB,
                frozen_sent_mib=max(r["frozen_sent"] for r in reports) / MiB,
                replicated_sent_mib=replicated_bytes_per_rank(size, world) / MiB,
                ema_seconds=max(r["ema_seconds"] for r in reports),
                frozen_seconds=max(r["frozen_seconds"] for r in reports),
            )
        )
    base = rows[0]  # 1 x 1: the whole state on one rank
    full_mib = base["max_state_mib"]
    for row in rows:
        shards = int(row["layout"].split("x")[1])
        row["state_vs_ideal"] = row["max_state_mib"] / (full_mib / shards)
        row["ema_time_vs_1_rank"] = row["ema_seconds"] / base["ema_seconds"]
        row["frozen_time_vs_1_rank"] = row["frozen_seconds"] / base["frozen_seconds"]
    return rows


def format_rows(rows: List[Dict]) -> str:
    header = (
        f"{'R x S':>6} {'state/rank MiB':>15} {'vs full/S':>10} {'EMA step sends':>15} {'replicated':>11} "
        f"{'frozen f+b sends':>17} {'EMA step s':>11} {'frozen f+b s':>13} {'time vs 1 rank':>15}"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['layout']:>6} {r['max_state_mib']:>15.1f} {r['state_vs_ideal']:>10.3f} {r['ema_sent_mib']:>12.2f} MiB "
            f"{r['replicated_sent_mib']:>7.1f} MiB {r['frozen_sent_mib']:>13.2f} MiB {r['ema_seconds']:>11.3f} "
            f"{r['frozen_seconds']:>13.3f} {r['ema_time_vs_1_rank']:>7.2f} / {r['frozen_time_vs_1_rank']:.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", default="1x1,1x2,2x1,1x4,2x2", help="R x S layouts, comma separated")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    layouts = [tuple(int(v) for v in item.split("x")) for item in args.layouts.split(",")]
    if layouts[0] != (1, 1):
        layouts.insert(0, (1, 1))
    rows = measure(PAPER, layouts, args.repeats)
    print(f"paper size: {PAPER}, fp32, global batch split evenly over ranks, {os.cpu_count()} cores split over ranks")
    print(format_rows(rows))
    result = {"size": PAPER, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
