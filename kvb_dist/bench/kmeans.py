"""Streaming k-means against FAISS: time per Lloyd iteration and final SSE.

    python -m kvb_dist.bench.kmeans                       # pairs {256, 4096} x codebooks {1, 16}
    python -m kvb_dist.bench.kmeans --pairs 256 --codebooks 1 --num-points 20000 --json out.json

Same data, same initial centroids (the bottom-k sample streaming_kmeans would draw), same
thread count, subsampling off on both sides (max_points_per_centroid None here, 10**9 for
FAISS), the same number of iterations. FAISS clusters each codebook on its own
(faiss.Kmeans per codebook, as one would use it); streaming_kmeans does all codebooks in one
pass over in-memory batches (no shard reading: this measures the k-means, not the I/O).
Time per iteration: streaming_kmeans' own per-pass timings; FAISS: train() wall time / iterations,
summed over codebooks. CPU time (process time, all threads) per iteration is reported as well:
on a shared machine it is the steadier of the two. Final SSE: the assignment SSE of the last iteration on both sides
(FAISS's obj[-1]), summed over codebooks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np
import torch

from kvb_dist.kmeans import InMemoryBatches, heads_to_queries, query_priorities, streaming_kmeans


def mixture(num_points: int, num_codebooks: int, dim: int, seed: int) -> torch.Tensor:
    """Heads [n, C, d]: per codebook a mixture of 64 Gaussians, different for every codebook."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_codebooks, 64, dim, generator=g) * 3
    which = torch.randint(0, 64, (num_points, num_codebooks), generator=g)
    noise = torch.randn(num_points, num_codebooks, dim, generator=g)
    return (centres[torch.arange(num_codebooks), which] + noise).contiguous()


def initial_centroids(heads: torch.Tensor, num_pairs: int, seed: int) -> torch.Tensor:
    """[C, J, d]: the queries of the J smallest priorities, as streaming_kmeans' random init picks."""
    priorities = query_priorities(seed, torch.arange(heads.shape[0]), 1)
    chosen = torch.topk(priorities, num_pairs, largest=False).indices
    return heads_to_queries(heads)[:, chosen].contiguous()


def run_ours(heads, init, num_iters: int, batch_size: int) -> Dict:
    cpu = time.process_time()
    result = streaming_kmeans(
        InMemoryBatches(heads, batch_size), init.shape[1], num_iters=num_iters, init_means=init,
        max_points_per_centroid=None, seed=0,
    )
    return {
        "seconds_per_iter": float(np.mean(result.iteration_seconds)),
        "cpu_seconds_per_iter": (time.process_time() - cpu) / num_iters,
        "sse": result.sse_history[-1],
        "splits": result.num_split,
    }


def run_faiss(heads, init, num_iters: int) -> Dict:
    import faiss

    total_seconds, total_cpu, sse = 0.0, 0.0, 0.0
    for c in range(heads.shape[1]):
        data = np.ascontiguousarray(heads[:, c].numpy(), dtype=np.float32)
        kmeans = faiss.Kmeans(
            data.shape[1], init.shape[1], niter=num_iters, verbose=False, seed=1234,
            max_points_per_centroid=10**9, min_points_per_centroid=1,
        )
        started, cpu = time.perf_counter(), time.process_time()
        kmeans.train(data, init_centroids=np.ascontiguousarray(init[c].numpy()))
        total_seconds += time.perf_counter() - started
        total_cpu += time.process_time() - cpu
        sse += float(kmeans.obj[-1])
    return {"seconds_per_iter": total_seconds / num_iters, "cpu_seconds_per_iter": total_cpu / num_iters, "sse": sse}


def run_one(args) -> Dict:
    """One implementation on one configuration, in this (fresh) process."""
    torch.set_num_threads(args.threads)
    heads = mixture(args.num_points, args.codebooks[0], args.dim, args.seed)
    init = initial_centroids(heads, args.pairs[0], args.seed)
    # A short warm-up run first: thread pools, BLAS and allocator start-up are not per-iteration costs.
    warm = heads[: 16 * args.pairs[0]]
    if args.run == "faiss":
        import faiss

        faiss.omp_set_num_threads(args.threads)
        run_faiss(warm, init, 1)
        return run_faiss(heads, init, args.iters)
    run_ours(warm, init, 1, args.batch_size)
    return run_ours(heads, init, args.iters, args.batch_size)


def in_subprocess(args, run: str, num_pairs: int, num_codebooks: int) -> Dict:
    """Each measurement in its own process: FAISS's OpenMP runtime and torch's then never share
    (or fight over) the cores, and neither warms the other's caches."""
    command = [
        sys.executable, "-m", "kvb_dist.bench.kmeans", "--run", run, "--pairs", str(num_pairs),
        "--codebooks", str(num_codebooks), "--num-points", str(args.num_points), "--dim", str(args.dim),
        "--iters", str(args.iters), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
        "--seed", str(args.seed),
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvb_dist.bench.kmeans", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--codebooks", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--num-points", type=int, default=32768, help="points per codebook")
    parser.add_argument("--dim", type=int, default=16, help="head dimension")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8192, help="streaming batch (samples)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--run", choices=("ours", "faiss"), help=argparse.SUPPRESS)  # one measurement
    args = parser.parse_args(argv)
    if args.run is not None:
        print(json.dumps(run_one(args)))
        return 0

    rows = []
    for num_pairs in args.pairs:
        for num_codebooks in args.codebooks:
            faiss_result = in_subprocess(args, "faiss", num_pairs, num_codebooks)
            ours = in_subprocess(args, "ours", num_pairs, num_codebooks)
            rows.append({
                "pairs": num_pairs, "codebooks": num_codebooks, "points": args.num_points, "dim": args.dim,
                "iters": args.iters, "threads": args.threads,
                "ours_s_per_iter": ours["seconds_per_iter"], "faiss_s_per_iter": faiss_result["seconds_per_iter"],
                "time_ratio": ours["seconds_per_iter"] / faiss_result["seconds_per_iter"],
                "ours_cpu_s_per_iter": ours["cpu_seconds_per_iter"],
                "faiss_cpu_s_per_iter": faiss_result["cpu_seconds_per_iter"],
                "cpu_ratio": ours["cpu_seconds_per_iter"] / faiss_result["cpu_seconds_per_iter"],
                "ours_sse": ours["sse"], "faiss_sse": faiss_result["sse"],
                "sse_rel_diff": ours["sse"] / faiss_result["sse"] - 1, "ours_splits": ours["splits"],
            })
            row = rows[-1]
            print(f"pairs {num_pairs:5d} codebooks {num_codebooks:3d}: ours {row['ours_s_per_iter']:.4f} s/iter, "
                  f"faiss {row['faiss_s_per_iter']:.4f} s/iter, ratio {row['time_ratio']:.2f} (CPU time {row['cpu_ratio']:.2f}), "
                  f"SSE diff {100 * row['sse_rel_diff']:+.3f} %", file=sys.stderr, flush=True)

    header = ("| pairs | codebooks | ours s/iter | faiss s/iter | ratio | ours CPU s/iter | faiss CPU s/iter | CPU ratio "
              "| ours SSE | faiss SSE | SSE diff |")
    print(f"\n{args.num_points} points x dim {args.dim} per codebook, {args.iters} iterations, "
          f"{args.threads} threads, subsampling off, same initial centroids\n")
    print(header)
    print("|" + "---|" * 11)
    for r in rows:
        print(f"| {r['pairs']} | {r['codebooks']} | {r['ours_s_per_iter']:.4f} | {r['faiss_s_per_iter']:.4f} | "
              f"{r['time_ratio']:.2f} | {r['ours_cpu_s_per_iter']:.4f} | {r['faiss_cpu_s_per_iter']:.4f} | "
              f"{r['cpu_ratio']:.2f} | {r['ours_sse']:.6g} | {r['faiss_sse']:.6g} | {100 * r['sse_rel_diff']:+.3f} % |")
    print(json.dumps(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
