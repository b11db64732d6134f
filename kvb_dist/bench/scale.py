"""Peak memory per rank at scale: does any rank hold more than its share of the model?

    python -m kvb_dist.bench.scale                       # 4 gloo ranks, C 256 x J 1024 x k 32, v 32: ~2 min on 2 cores
    python -m kvb_dist.bench.scale --codebooks 8 --pairs 256 --samples 1024 --ranks 2   # seconds

One node, --ranks gloo ranks (default 4), codebooks sharded over all of them (1 x W): a rank
holds 1/W of the state, so the full state is W x a rank's share (shown as full/share; 8 x and
more takes 8 ranks or more). On every rank, one after the other:
1. construction: ShardedKeyValueBottleneck (sparse values, random keys);
2. k-means init "random": streaming_kmeans over this rank's samples (random heads made per
   batch, --samples over all ranks), then install_ into the module;
3. k-means init "kmeans++": the same with k-means++ seeding (sample of min(8 J, samples) queries);
4. training step: frozen keys, forward of one data batch, mean of the fetched values over the
   codebooks as logits, cross entropy, backward (sparse value gradients), SparseAdam step (its
   first step: it allocates the moments, 2 x the values).

Measured per rank and phase: the peak RSS (VmHWM, restarted from the current RSS through
/proc/self/clear_refs before the phase) minus the RSS right before the phase. Subtracted thereby:
everything the process held before the phase, i.e. torch and kvb_dist imported, the process group,
and the module built in phase 1 (the optimizer is made just before phase 4: its moments, allocated
by its first step, count in phase 4). What remains is what the phase itself allocated. It is compared with the floor: this rank's state
share (bytes of its buffers and parameters) plus its data batch (bytes of one batch of heads,
[batch, C, k] fp32). Target: peak above <= 1.3 x floor, PASS or MISS. Numbers only; times are
printed for orientation, not compared. Every phase runs once at a tiny size first, unmeasured.
The ranks run with glibc's mmap threshold fixed (--mmap-threshold-mib, see MMAP_THRESHOLD_MIB), so
that freed blocks leave RSS: with the default dynamic threshold the same phase on identical ranks
measured anywhere from 0 to 2.5 x. A GPU run would read torch.cuda.max_memory_allocated
instead; this benchmark is for gloo on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Dict, List, Optional

import torch

from kvb_dist.bench.core import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from kvb_dist.distributed.spawn import run_ranks

MiB = 1 << 20
TARGET_RATIO = 1.3
PHASES = ("construction", "k-means random", "k-means kmeans++", "training step")
# 256 codebooks of 1024 pairs rather than 64 of 4096: the same state (24.5 MiB a rank), a quarter
# of k-means++'s O(C J^2 k) work (the longest phase here).
DEFAULTS = dict(ranks=4, codebooks=256, pairs=1024, dim_keys=32, dim_values=32, samples=2048, batch=64, iters=2,
                kmeanspp_factor=8)


class RandomHeads:
    """Re-iterable batches (heads [b, C, k], sample ids) of this rank's samples, made per batch from
    a seed (nothing held between batches); ids first_id, first_id + 1, ... are unique over ranks."""

    def __init__(self, num_samples: int, num_codebooks: int, dim: int, batch_size: int, first_id: int):
        self.num_samples, self.num_codebooks, self.dim = num_samples, num_codebooks, dim
        self.batch_size, self.first_id = batch_size, first_id

    def __iter__(self):
        for start in range(0, self.num_samples, self.batch_size):
            n = min(self.batch_size, self.num_samples - start)
            first = self.first_id + start
            generator = torch.Generator().manual_seed(first)
            yield torch.randn(n, self.num_codebooks, self.dim, generator=generator), torch.arange(first, first + n)


def state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@contextmanager
def _measured(phases: Dict, name: str, reset_works: bool):
    gc.collect()
    reset_peak_rss()
    before = current_rss_bytes()
    started = time.perf_counter()
    yield
    peak = peak_rss_bytes() if reset_works else float("nan")
    phases[name] = dict(rss_before=before, peak=peak, above=peak - before, seconds=time.perf_counter() - started)


def rank_worker(rank: int, world_size: int, config: Dict) -> Dict:
    """Runs the phases on this rank, first at a tiny size (unmeasured: lazy imports, the native
    kernels' loading and first-call buffers are one-time costs, not the phases'), then at the
    configured one; returns its measurements (bytes, seconds)."""
    rss_at_start = current_rss_bytes()  # torch and kvb_dist imported, process group up
    tiny = dict(config, codebooks=world_size, pairs=8, samples=16 * world_size, batch=8, iters=1)
    _phases(rank, world_size, tiny)
    return dict(_phases(rank, world_size, config), rss_at_start=rss_at_start)


def _phases(rank: int, world_size: int, config: Dict) -> Dict:
    from kvb_dist.distributed.layout import ParallelLayout
    from kvb_dist.distributed.sharded import ShardedKeyValueBottleneck
    from kvb_dist.kmeans import streaming_kmeans

    reset_works = reset_peak_rss()
    layout = ParallelLayout.build(world_size)
    num_codebooks, num_pairs = config["codebooks"], config["pairs"]
    dim_keys, dim_values, batch = config["dim_keys"], config["dim_values"], config["batch"]
    per_rank = config["samples"] // world_size
    data = RandomHeads(per_rank, num_codebooks, dim_keys, batch, first_id=rank * per_rank)
    phases: Dict[str, Dict] = {}

    with _measured(phases, "construction", reset_works):
        module = ShardedKeyValueBottleneck(num_codebooks, num_pairs, dim_keys, dim_values, layout=layout, seed=0,
                                           sparse_values=True)
    kmeans_stats = {}
    for init in ("random", "kmeans++"):
        with _measured(phases, f"k-means {init}", reset_works):
            result = streaming_kmeans(data, num_pairs, layout, init=init, num_iters=config["iters"], seed=0,
                                      kmeanspp_sample_factor=config["kmeanspp_factor"])
            result.install_(module)
        kmeans_stats[init] = dict(sse=result.sse_history, training=result.num_training_queries)
        del result

    module.freeze_keys()
    optimizer = torch.optim.SparseAdam([module.values], lr=1e-3)
    heads, ids = next(iter(data))
    labels = ids % dim_values
    with _measured(phases, "training step", reset_works):
        optimizer.zero_grad(set_to_none=True)
        (values,) = module(heads)  # [b, C, 1, v]
        torch.nn.functional.cross_entropy(values.mean(dim=(1, 2)), labels).backward()
        optimizer.step()
    start, stop = layout.codebook_range(num_codebooks)
    return dict(
        rank=rank, codebooks=(start, stop), reset_works=reset_works,
        state_bytes=state_bytes(module), batch_bytes=batch * num_codebooks * dim_keys * 4, phases=phases,
        kmeans=kmeans_stats,
    )


# glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), after
# which freed blocks of that size stay in its heap: RSS then depends on the allocation history
# (measured here: 42 to 66 MiB peaks on four ranks doing the same k-means, and a step that
# allocates 16 MiB shown as 0 because freed blocks were reused). A fixed threshold of 128 KiB
# (glibc's initial value) hands every larger block back to the system on free, so that RSS follows
# what the code holds: the four ranks then agree within 0.2 MiB. It costs page faults (sys time)
# for k-means++'s per-step temporaries; a threshold of 4 MiB was faster but as erratic as the default.
MMAP_THRESHOLD_MIB = 0.125
_MMAP_THRESHOLD_VARIABLE = "MALLOC_MMAP_THRESHOLD_"


def measure(config: Dict, timeout: float = 1800, mmap_threshold_mib: float = MMAP_THRESHOLD_MIB) -> List[Dict]:
    """Runs the ranks; mmap_threshold_mib 0 keeps glibc's dynamic threshold."""
    # The ranks share the machine's cores (at least one thread each).
    threads = max(1, (os.cpu_count() or 1) // config["ranks"])
    saved = os.environ.get(_MMAP_THRESHOLD_VARIABLE)
    if mmap_threshold_mib > 0:  # read by glibc when a rank starts: set in the environment it inherits
        os.environ[_MMAP_THRESHOLD_VARIABLE] = str(int(mmap_threshold_mib * MiB))
    try:
        # k-means++ seeds for a minute or more without a collective, and ranks sharing few cores
        # finish it far apart: the default 30 s process-group timeout would fire.
        return run_ranks(config["ranks"], rank_worker, config, timeout=timeout, threads=threads,
                         process_group_timeout=timedelta(seconds=timeout))
    finally:
        if saved is None:
            os.environ.pop(_MMAP_THRESHOLD_VARIABLE, None)
        else:
            os.environ[_MMAP_THRESHOLD_VARIABLE] = saved


def rows_of(reports: List[Dict]) -> List[Dict]:
    rows = []
    for report in reports:
        floor = report["state_bytes"] + report["batch_bytes"]
        for phase in PHASES:
            measured = report["phases"][phase]
            ratio = measured["above"] / floor
            rows.append(dict(
                phase=phase, rank=report["rank"], above_mib=measured["above"] / MiB,
                rss_before_mib=measured["rss_before"] / MiB, share_mib=report["state_bytes"] / MiB,
                batch_mib=report["batch_bytes"] / MiB, ratio=ratio, seconds=measured["seconds"],
                verdict="PASS" if ratio <= TARGET_RATIO else "MISS",
            ))
    return rows


def format_report(config: Dict, reports: List[Dict], mmap_threshold_mib: float = MMAP_THRESHOLD_MIB) -> str:
    full = sum(r["state_bytes"] for r in reports)
    share = max(r["state_bytes"] for r in reports)
    malloc = (f"glibc malloc with a fixed mmap threshold of {mmap_threshold_mib:g} MiB ({_MMAP_THRESHOLD_VARIABLE})"
              if mmap_threshold_mib > 0 else
              "glibc malloc with its default dynamic mmap threshold (RSS includes freed blocks it keeps)")
    lines = [
        f"{config['ranks']} gloo ranks (1 x {config['ranks']}), C {config['codebooks']} x J {config['pairs']} x "
        f"k {config['dim_keys']}, v {config['dim_values']}; {config['samples']} samples, batch {config['batch']} per rank, "
        f"{config['iters']} Lloyd iterations, k-means++ sample factor {config['kmeanspp_factor']}",
        f"full state {full / MiB:.1f} MiB, largest rank share {share / MiB:.1f} MiB (full/share {full / share:.2f}); "
        "RSS at rank start (torch imported, process group up): "
        + ", ".join(f"{r['rss_at_start'] / MiB:.0f}" for r in reports) + " MiB",
        "peak above = VmHWM during the phase - RSS right before it (subtracts torch, the process group and "
        "whatever earlier phases left, e.g. the module); floor = state share + data batch; "
        f"target: peak above <= {TARGET_RATIO} x floor; {malloc}",
    ]
    if not all(r["reset_works"] for r in reports):
        lines.append("/proc/self/clear_refs is not writable here: peaks are not measurable (nan)")
    header = "| phase | rank | RSS before MiB | peak above MiB | share MiB | batch MiB | ratio | target | s |"
    lines += [header, "|---|---|---|---|---|---|---|---|---|"]
    for row in rows_of(reports):
        lines.append(
            f"| {row['phase']} | {row['rank']} | {row['rss_before_mib']:.1f} | {row['above_mib']:.1f} | "
            f"{row['share_mib']:.1f} | {row['batch_mib']:.1f} | {row['ratio']:.2f} | {row['verdict']} | "
            f"{row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(prog="python -m kvb_dist.bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=DEFAULTS["ranks"], help="gloo ranks on this machine, all shards")
    parser.add_argument("--codebooks", type=int, default=DEFAULTS["codebooks"], help="C, over all ranks")
    parser.add_argument("--pairs", type=int, default=DEFAULTS["pairs"], help="J, pairs per codebook")
    parser.add_argument("--dim-keys", type=int, default=DEFAULTS["dim_keys"], help="k, head / key dimension")
    parser.add_argument("--dim-values", type=int, default=DEFAULTS["dim_values"], help="v, value dimension (= classes)")
    parser.add_argument("--samples", type=int, default=DEFAULTS["samples"],
                        help="k-means samples over all ranks (at least J; k-means++ samples min(factor x J, this))")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="samples per batch and rank")
    parser.add_argument("--iters", type=int, default=DEFAULTS["iters"], help="Lloyd iterations per k-means")
    parser.add_argument("--kmeanspp-factor", type=int, default=DEFAULTS["kmeanspp_factor"],
                        help="k-means++ sample factor (streaming_kmeans' kmeanspp_sample_factor)")
    parser.add_argument("--mmap-threshold-mib", type=float, default=MMAP_THRESHOLD_MIB,
                        help="glibc's mmap threshold in the ranks (MALLOC_MMAP_THRESHOLD_; 0: glibc's dynamic default)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before the ranks are killed")
    parser.add_argument("--json", default=None, help="also write the measurements to this file")
    args = parser.parse_args(argv)
    config = dict(ranks=args.ranks, codebooks=args.codebooks, pairs=args.pairs, dim_keys=args.dim_keys,
                  dim_values=args.dim_values, samples=args.samples, batch=args.batch, iters=args.iters,
                  kmeanspp_factor=args.kmeanspp_factor)
    if config["samples"] < config["pairs"]:
        raise ValueError(f"--samples ({config['samples']}) must be at least --pairs ({config['pairs']})")
    if config["ranks"] < 1 or config["samples"] // config["ranks"] < 1:
        raise ValueError("need at least one rank and one sample per rank")
    reports = measure(config, timeout=args.timeout, mmap_threshold_mib=args.mmap_threshold_mib)
    print(format_report(config, reports, args.mmap_threshold_mib))
    result = dict(config=config, mmap_threshold_mib=args.mmap_threshold_mib, reports=reports, rows=rows_of(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
