"""A training step's cost against the number of pairs J: sparse values with lazy Adam vs dense values with Adam.

    python -m kvb_dist.bench.step                      # C 256, k 14, v 10, batch 256; J 4096, 16384, 65536
    python -m kvb_dist.bench.step --pairs 4096 16384   # quicker

The frozen-key step of the launcher: cached indices (owned by the codebooks' ranks) -> values
(`values_at_rows`) -> voting loss -> backward -> optimizer step, on 1 process and on 1 x 2 and
2 x 1 gloo ranks (one core each). Per rank: the median step time, the bytes sent (counted on the
real collectives), and the peak RSS of a step above the state held before it (module and
optimizer moments). Also the bytes of an EMA step (keys learning) for the same sizes, and the
sparse step of every J interleaved in one process (the fair comparison of times).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch

from kvb_dist.bench.checkpoint import PeakRSS
from kvb_dist.bench.sharded import CountingCollectives
from kvb_dist.distributed.layout import ParallelLayout
from kvb_dist.distributed.sharded import ShardedKeyValueBottleneck
from kvb_dist.distributed.spawn import run_ranks

MiB = 1 << 20
NUM_SAMPLES = 4096  # cached training samples


def step_worker(rank: int, world_size: int, num_shards: int, size: Dict, repeats: int) -> Dict:
    layout = ParallelLayout.build(num_shards)
    # One mode at a time, so that only one module and its moments are alive.
    return {mode: measure_mode(mode, layout, rank, world_size, size, repeats) for mode in ("sparse", "dense")}


def measure_mode(mode: str, layout: ParallelLayout, rank: int, world_size: int, size: Dict, repeats: int) -> Dict:
    local = size["batch"] // world_size
    module = ShardedKeyValueBottleneck(
        size["num_codebooks"], size["num_pairs"], size["dim_keys"], size["dim_values"],
        layout=layout, seed=0, sparse_values=mode == "sparse",
    )
    # EMA step first (keys learning): heads route to the owners, statistics sum over replicas.
    heads = torch.randn(local, size["num_codebooks"], size["dim_keys"], generator=torch.Generator().manual_seed(rank))
    with torch.no_grad(), CountingCollectives() as counter:
        module(heads)
    ema_sent = counter.sent
    module.freeze_keys()
    generator = torch.Generator().manual_seed(0)
    owned = torch.randint(0, size["num_pairs"], (NUM_SAMPLES, module.values.shape[0], 1), generator=generator).to(torch.int32)
    optimizer = (torch.optim.SparseAdam if mode == "sparse" else torch.optim.Adam)([module.values], lr=0.01)

    def step(seed: int):
        rows = torch.randint(0, NUM_SAMPLES, (size["batch"],), generator=torch.Generator().manual_seed(seed))
        optimizer.zero_grad(set_to_none=True)
        logits = module.values_at_rows(owned, rows[rank * local : (rank + 1) * local]).mean(dim=(1, 2))
        torch.nn.functional.cross_entropy(logits, rows[rank * local : (rank + 1) * local] % size["dim_values"]).backward()
        optimizer.step()

    step(0)  # allocates the optimizer moments
    with CountingCollectives() as counter:
        step(1)
    with PeakRSS() as peak:
        step(2)
    times = []
    for seed in range(3, 3 + repeats):
        started = time.perf_counter()
        step(seed)
        times.append(time.perf_counter() - started)
    return dict(seconds=statistics.median(times), sent=counter.sent, peak_above=peak.above, ema_sent=ema_sent)


LAYOUTS = [(1, 1), (2, 2), (2, 1)]  # (world size, shards): 1 process, 1 x 2, 2 x 1


def interleaved_scaling(pairs: List[int], repeats: int) -> Dict[int, float]:
    """Median sparse step (one process, one thread) per J, the sizes' steps interleaved.

    Interleaving puts every size under the same machine load: the separate runs above spread by
    about 30 % between runs here, more than the effect of J being measured.
    """
    steps = {}
    for num_pairs in pairs:
        module = ShardedKeyValueBottleneck(256, num_pairs, 14, 10, layout=ParallelLayout.single(), seed=0, sparse_values=True)
        module.freeze_keys()
        owned = torch.randint(0, num_pairs, (NUM_SAMPLES, 256, 1), generator=torch.Generator().manual_seed(0)).to(torch.int32)
        optimizer = torch.optim.SparseAdam([module.values], lr=0.01)

        def step(seed, module=module, owned=owned, optimizer=optimizer):
            rows = torch.randint(0, NUM_SAMPLES, (256,), generator=torch.Generator().manual_seed(seed))
            optimizer.zero_grad(set_to_none=True)
            logits = module.values_at_rows(owned, rows).mean(dim=(1, 2))
            torch.nn.functional.cross_entropy(logits, rows % 10).backward()
            optimizer.step()

        step(0)
        steps[num_pairs] = step
    times: Dict[int, List[float]] = {num_pairs: [] for num_pairs in steps}
    for repeat in range(repeats):
        for num_pairs, step in steps.items():
            started = time.perf_counter()
            step(repeat + 1)
            times[num_pairs].append(time.perf_counter() - started)
    return {num_pairs: statistics.median(t) for num_pairs, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvb_dist.bench.step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: List[Dict] = []
    for num_pairs in args.pairs:
        size = dict(num_codebooks=256, num_pairs=num_pairs, dim_keys=14, dim_values=10, batch=256)
        for world_size, num_shards in LAYOUTS:
            per_rank = run_ranks(world_size, step_worker, num_shards, size, args.repeats, timeout=1800)
            results.append(dict(num_pairs=num_pairs, layout=f"{world_size // num_shards} x {num_shards}", per_rank=per_rank))
    print("| J | R x S | sparse + lazy Adam: step | sent / rank | step peak above state | dense + Adam: step | sent / rank | step peak above state | EMA step sent / rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        worst = {mode: {key: max(p[mode][key] for p in r["per_rank"]) for key in ("seconds", "sent", "peak_above")} for mode in ("sparse", "dense")}
        ema = max(p["sparse"]["ema_sent"] for p in r["per_rank"])
        print(
            f"| {r['num_pairs']} | {r['layout']} "
            + "".join(f"| {worst[m]['seconds'] * 1e3:.1f} ms | {worst[m]['sent'] / MiB:.2f} MiB | {worst[m]['peak_above'] / MiB:.0f} MiB " for m in ("sparse", "dense"))
            + f"| {ema / MiB:.2f} MiB |"
        )
    medians = interleaved_scaling(args.pairs, repeats=6 * args.repeats)
    print("interleaved, 1 process: " + ", ".join(f"J {j}: {t * 1e3:.1f} ms" for j, t in medians.items())
          + f"; largest / smallest J: {medians[max(medians)] / medians[min(medians)]:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"layouts": results, "interleaved_seconds": medians}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
