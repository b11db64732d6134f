"""Sharded checkpoints: save on W gloo ranks, load on another layout, against torch.save of the same shard.

    python -m kvb_dist.bench.checkpoint                  # 64 x 32768 pairs, k = v = 32, with Adam: 1.27 GiB
    python -m kvb_dist.bench.checkpoint --pairs 4096     # quicker

Each rank holds its shard of the bottleneck's state (keys, keys_avg, cluster_size,
cluster_size_counter, values) and of the values' Adam moments, filled per codebook from a seed
so that every layout holds the same numbers. Measured per rank: the time to save it through
kvb_dist.distributed.checkpoint (DCP) and to load it into another layout, the same shard with
torch.save / torch.load into one file, the peak RSS above the state already held (sampled every
2 ms), and the bytes each rank wrote. Every loaded tensor is compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict

import psutil
import torch

from kvb_dist.distributed import checkpoint
from kvb_dist.distributed.layout import ParallelLayout
from kvb_dist.distributed.spawn import run_ranks

MiB = 1 << 20


def shard_state(layout: ParallelLayout, num_codebooks: int, num_pairs: int, dim: int, seed: int) -> Dict[str, torch.Tensor]:
    """This rank's codebooks of every per-codebook tensor (as the launcher checkpoints them), as DTensors."""
    start, stop = layout.codebook_range(num_codebooks)
    shapes = {"keys": (dim,), "keys_avg": (dim,), "cluster_size": (), "cluster_size_counter": (), "values": (dim,),
              "optimizer.values.exp_avg": (dim,), "optimizer.values.exp_avg_sq": (dim,)}
    state = {}
    for index, (name, rest) in enumerate(shapes.items()):
        local = torch.empty(stop - start, num_pairs, *rest)
        for row, c in enumerate(range(start, stop)):
            local[row] = torch.randn(num_pairs, *rest, generator=torch.Generator().manual_seed(seed * 1000 + c * 10 + index))
        state[name] = layout.global_view(local, num_codebooks)
    state["optimizer.values.step"] = torch.tensor(float(seed))
    return state


def local_of(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class PeakRSS:
    """Peak resident memory of this process while the block runs, above what it held at the start."""

    def __enter__(self):
        self.process, self.start, self.peak, self.running = psutil.Process(), psutil.Process().memory_info().rss, 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.above = max(0, max(self.peak, self.process.memory_info().rss) - self.start)


def timed(fn):
    with PeakRSS() as peak:
        started = time.perf_counter()
        fn()
        seconds = time.perf_counter() - started
    return seconds, peak.above


def save_worker(rank: int, world_size: int, folder: str, scratch: str, size: Dict) -> Dict:
    layout = ParallelLayout.build(num_shards=world_size)
    state = shard_state(layout, seed=1, **size)
    shard_bytes = sum(local_of(t).numel() * local_of(t).element_size() for t in state.values())
    plain = {name: local_of(t) for name, t in state.items()}  # the same memory, as plain tensors
    own_file = Path(scratch) / f"rank{rank}.pt"
    torch_save_s, torch_save_peak = timed(lambda: torch.save(plain, own_file))
    layout.barrier()
    save_s, save_peak = timed(lambda: checkpoint.save(state, folder, layout))
    torch_load_s, _ = timed(lambda: torch.load(own_file, weights_only=True))
    own_file.unlink()
    written = sum(f.stat().st_size for f in Path(folder).glob(f"__{rank}_*.distcp"))
    return dict(shard_mib=shard_bytes / MiB, save_s=save_s, save_peak_mib=save_peak / MiB, torch_save_s=torch_save_s,
                torch_save_peak_mib=torch_save_peak / MiB, torch_load_s=torch_load_s, written_mib=written / MiB)


def load_worker(rank: int, world_size: int, num_shards: int, folder: str, size: Dict) -> Dict:
    layout = ParallelLayout.build(num_shards=num_shards)
    target = shard_state(layout, seed=2, **size)  # other numbers: the load must overwrite all of them
    shard_bytes = sum(local_of(t).numel() * local_of(t).element_size() for t in target.values())
    load_s, load_peak = timed(lambda: checkpoint.load_(target, folder, layout))
    expected = shard_state(layout, seed=1, **size)
    identical = all(torch.equal(local_of(target[name]), local_of(expected[name])) for name in expected)
    return dict(shard_mib=shard_bytes / MiB, load_s=load_s, load_peak_mib=load_peak / MiB, identical=identical)


def measure(save_world: int, load_world: int, load_shards: int, size: Dict) -> Dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder, scratch = os.path.join(tmp, "checkpoint"), os.path.join(tmp, "scratch")
        os.makedirs(scratch)
        saves = run_ranks(save_world, save_worker, folder, scratch, size, timeout=900)
        loads = run_ranks(load_world, load_worker, load_shards, folder, size, timeout=900)
    return {"save_world": save_world, "load": f"{load_world // load_shards} x {load_shards}", "saves": saves, "loads": loads}


def report(result: Dict) -> str:
    """One table row: slowest rank's times, largest peaks, written bytes per rank over its shard."""
    saves, loads = result["saves"], result["loads"]

    def slowest(rows, key):
        return max(r[key] for r in rows)

    save_s, torch_save_s = slowest(saves, "save_s"), slowest(saves, "torch_save_s")
    load_s, torch_load_s = slowest(loads, "load_s"), slowest(saves, "torch_load_s")
    written = [r["written_mib"] / r["shard_mib"] for r in saves]
    return (
        f"| 1 x {result['save_world']} -> {result['load']} | {slowest(saves, 'shard_mib'):.0f} MiB "
        f"| {save_s:.2f} s ({torch_save_s:.2f} s, {save_s / torch_save_s:.2f}x) "
        f"| +{max(r['save_peak_mib'] / r['shard_mib'] for r in saves):.2f} | {min(written):.2f}-{max(written):.2f} "
        f"| {load_s:.2f} s ({torch_load_s:.2f} s, {load_s / torch_load_s:.2f}x) "
        f"| +{max(r['load_peak_mib'] / r['shard_mib'] for r in loads if r['shard_mib'] > 0):.2f} "
        f"| {'yes' if all(r['identical'] for r in loads) else 'NO'} |"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvb_dist.bench.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codebooks", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=32, help="key and value dim")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    size = dict(num_codebooks=args.codebooks, num_pairs=args.pairs, dim=args.dim)
    print(f"full state {args.codebooks * args.pairs * (5 * args.dim + 2) * 4 / MiB:.0f} MiB")
    results = [measure(2, 1, 1, size), measure(2, 4, 2, size), measure(4, 2, 2, size), measure(4, 3, 3, size)]
    print("| save -> load | shard per rank (save) | save (torch.save) | save peak above state / shard | written / shard "
          "| load (torch.load) | load peak above state / shard | bit-identical |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
