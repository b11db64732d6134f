"""Lloyd iterations on a slice of codebooks (each codebook clusters its own heads).

`lloyd_`: in-memory iterations on one batch; `reduce_sum` sums per-cluster counts and sums over
every process holding part of the data, so the same code fits one batch on one process or a
batch spread over many (the bottleneck's init_mode="kmeans").

`streaming_kmeans`: the initialize phase's k-means over a whole data set streamed in passes,
for all codebooks sharded as the bottleneck is (see the section below). Nothing here imports
torch.distributed: collectives come from the layout object passed in.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Iterable, List, Optional, Tuple

import torch

from kvb_dist.codebook import (
    Reduce,
    assignment_statistics,
    best_in_rows,
    counter_hash,
    counter_randint,
    counter_uniform,
    default_chunk_elements,
    nearest_keys,
    no_reduce,
)
from kvb_dist.native import fused_nearest_means

logger = logging.getLogger(__name__)


def lloyd_(
    samples_cik: torch.Tensor,
    means_cjk: torch.Tensor,
    num_iters: int,
    reduce_sum: Reduce = no_reduce,
    chunk_elements: Optional[int] = None,
) -> torch.Tensor:
    """Runs `num_iters` Lloyd iterations in place on means; returns the last cluster counts [c, j].

    A cluster that received no sample keeps its previous mean.
    """
    num_codebooks, num_pairs, _ = means_cjk.shape
    counts = torch.zeros(num_codebooks, num_pairs, device=means_cjk.device)
    for _ in range(num_iters):
        indices, _ = nearest_keys(samples_cik, means_cjk, chunk_elements=chunk_elements)
        counts, sums = assignment_statistics(samples_cik, indices[..., 0], num_pairs)
        counts, sums = reduce_sum(counts), reduce_sum(sums)
        filled = counts > 0
        means_cjk.copy_(torch.where(filled[..., None], sums / counts.clamp(min=1)[..., None], means_cjk))
    return counts


# =============================================================================================
# Streaming distributed k-means for all codebooks (the initialize phase)
#
# Each Lloyd iteration is one pass over every rank's local samples. A rank turns a batch into
# heads [C, i, k] for all C codebooks, routes them to the codebooks' owners (its shard group),
# the owner assigns them and accumulates per-cluster counts, sums and squared errors; after the
# pass these are summed over the replica group and the means derived from the sums. Any split of
# the data over ranks therefore gives what one process computes on all of it (up to float
# summation order), given the same initial means.
#
# Random choices are a pure function of a sample's stable id (a hash of its WebDataset key), its
# position and the seed, never of which rank holds it:
# - a query's priority p = counter_randint(seed, 2**62, sample id, position);
# - the training set is capped as FAISS does (max_points_per_centroid x pairs queries per
#   codebook): the queries of the smallest priorities, found by a search over all-reduced counts;
# - the initial means are the queries of the J smallest priorities (a bottom-k sample): every rank
#   offers the queries below its running local bottom J to the owners of each codebook range
#   (the routing of a Lloyd pass), an all-gather of priorities over the replica group fixes the
#   global J and their order; so the sample is identical on every holder of a codebook, lies in
#   the training set, and a rank holds only its own codebooks' sample;
# - k-means++ (optional) runs on a larger bottom-k sample with counter-based draws per codebook;
# - empty clusters are split FAISS-style with draws per (codebook, iteration, round), decided on
#   reduced counts, so every replica splits the same clusters the same way.
#
# One sample's queries share their priority across codebooks (a query is kept or not for every
# codebook at once), which keeps batches dense; codebooks see different heads of it anyway.


INIT_METHODS = ("random", "kmeans++")
PRIORITY_RANGE = 1 << 62
NO_PRIORITY = torch.iinfo(torch.int64).max  # padding: above every real priority
SPLIT_EPS = 1.0 / 1024  # relative perturbation of a split cluster (FAISS's value)
_TAG_PRIORITY, _TAG_KMEANSPP, _TAG_SPLIT = 21, 22, 23


def _seed_for(seed: int, tag: int) -> torch.Tensor:
    return counter_hash(torch.tensor(seed, dtype=torch.int64), torch.tensor(tag))


def heads_to_queries(heads: torch.Tensor) -> torch.Tensor:
    """Heads [b, c, *spatial, k] -> queries [c, b * n, k] (query index = sample * n + position)."""
    if heads.ndim < 3:
        raise ValueError(f"heads must have shape [batch, codebooks, *spatial, dim], got {tuple(heads.shape)}")
    batch, num_codebooks, *spatial, dim = heads.shape
    positions = math.prod(spatial)
    return heads.reshape(batch, num_codebooks, positions, dim).permute(1, 0, 2, 3).reshape(num_codebooks, -1, dim)


def query_priorities(seed: int, sample_ids: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Priorities [b * n] in [0, 2**62) of the queries of samples [b], in heads_to_queries order."""
    positions = torch.arange(num_positions, device=sample_ids.device)
    return counter_randint(_seed_for(seed, _TAG_PRIORITY), PRIORITY_RANGE, sample_ids[:, None], positions).reshape(-1)


def bottom_k(priorities: torch.Tensor, k: int, *rows: torch.Tensor):
    """The k smallest priorities (ascending) and the matching columns (dim 1) of each rows tensor."""
    k = min(k, priorities.numel())
    chosen = torch.topk(priorities, k, largest=False, sorted=True).indices
    return (priorities[chosen], *(r[:, chosen] for r in rows))


def kth_smallest_global(local_smallest: torch.Tensor, k: int, all_reduce_sum: Reduce, ways: int = 16) -> int:
    """The k-th smallest value of the union of every rank's priorities (k >= 1).

    local_smallest must hold at least this rank's k smallest priorities (fewer if it has fewer).
    A `ways`-ary search over [0, 2**62) on all-reduced counts: ~62 / log2(ways) small
    all-reduces, no priorities sent. Every rank gets the same answer.
    """
    low, high = -1, PRIORITY_RANGE - 1  # count(<= low) < k <= count(<= high)
    while high - low > 1:
        step = max(1, (high - low) // ways)
        probes = list(range(low + step, high, step))[: ways - 1] or [low + 1]
        probe_t = torch.tensor(probes, dtype=torch.int64, device=local_smallest.device)
        counts = (local_smallest[None, :] <= probe_t[:, None]).sum(1).to(torch.int64)
        counts = all_reduce_sum(counts)
        enough = (counts >= k).nonzero()
        if enough.numel():
            first = int(enough[0, 0])
            high = probes[first]
            low = probes[first - 1] if first > 0 else low
        else:
            low = probes[-1]
    return high


def split_empty_clusters_(
    means_cjk: torch.Tensor,
    counts_cj: torch.Tensor,
    seed: int,
    iteration: int,
    first_codebook: int = 0,
    relative_eps: float = SPLIT_EPS,
) -> int:
    """FAISS-style: every empty cluster takes a perturbed copy of a cluster drawn with probability
    proportional to (size - 1), which moves the other way, and half of its count. Returns how many
    clusters were split.

    In place on means and counts (counts may become fractional, as in FAISS). The draws depend on
    (seed, iteration, global codebook id, round) only, so any codebook split over processes
    decides exactly as one process would. A codebook without any cluster of more than one member
    keeps its empty clusters.
    """
    num_codebooks, num_pairs, dim = means_cjk.shape
    sign = torch.ones(dim, dtype=means_cjk.dtype, device=means_cjk.device)
    sign[1::2] = -1  # alternate directions over dimensions, so the pair separates in every direction
    seed_t = _seed_for(seed, _TAG_SPLIT)
    num_split, round_index = 0, 0
    while True:
        empty = counts_cj == 0
        weights = (counts_cj - 1).clamp(min=0).double()
        active = (empty.any(1) & (weights.sum(1) > 0)).nonzero()[:, 0]
        if active.numel() == 0:
            return num_split
        target = empty[active].to(torch.int8).argmax(1)  # the first empty cluster of each codebook
        cumulative = weights[active].cumsum(1)
        uniform = counter_uniform(seed_t, active + first_codebook, torch.tensor(iteration), torch.tensor(round_index))
        drawn = uniform.double() * cumulative[:, -1]
        donor = torch.searchsorted(cumulative, drawn[:, None], right=True)[:, 0].clamp(max=num_pairs - 1)
        source = means_cjk[active, donor]
        means_cjk[active, target] = source * (1 + relative_eps * sign)
        means_cjk[active, donor] = source * (1 - relative_eps * sign)
        half = counts_cj[active, donor] / 2
        counts_cj[active, target] = half
        counts_cj[active, donor] -= half
        num_split += int(active.numel())
        round_index += 1


def kmeans_plus_plus(samples_cnk: torch.Tensor, num_pairs: int, seed: int, first_codebook: int = 0) -> torch.Tensor:
    """k-means++ seeding [c, j, k] from samples [c, n, k] (n >= j), each codebook on its own.

    Draws are counter based per (global codebook id, step): identical wherever it runs. Cost
    O(j * n * k) per codebook, so it is meant for a sample of a few times j points.
    """
    num_codebooks, num_samples, dim = samples_cnk.shape
    if num_samples < num_pairs:
        raise ValueError(f"k-means++ needs at least {num_pairs} samples per codebook, got {num_samples}")
    samples = samples_cnk.float()
    seed_t = _seed_for(seed, _TAG_KMEANSPP)
    codebook_ids = torch.arange(num_codebooks, device=samples.device) + first_codebook
    rows = torch.arange(num_codebooks, device=samples.device)
    means = samples.new_empty(num_codebooks, num_pairs, dim)
    first = counter_randint(seed_t, num_samples, codebook_ids, torch.tensor(0), torch.tensor(0))
    means[:, 0] = samples[rows, first]
    nearest_sq = (samples - means[:, :1]).pow(2).sum(-1)
    for step in range(1, num_pairs):
        cumulative = nearest_sq.double().cumsum(1)
        total = cumulative[:, -1]
        drawn = counter_uniform(seed_t, codebook_ids, torch.tensor(step), torch.tensor(1)).double() * total
        pick = torch.searchsorted(cumulative, drawn[:, None], right=True)[:, 0].clamp(max=num_samples - 1)
        # Every sample already is a mean (duplicates): any sample will do.
        fallback = counter_randint(seed_t, num_samples, codebook_ids, torch.tensor(step), torch.tensor(2))
        pick = torch.where(total > 0, pick, fallback)
        means[:, step] = samples[rows, pick]
        nearest_sq = torch.minimum(nearest_sq, (samples - means[:, step : step + 1]).pow(2).sum(-1))
    return means


# Distances for at most this many (query, pair) couples exist at once (4 MiB): small enough to
# stay in cache between the GEMM that writes them and the reductions that read them.
ASSIGN_CHUNK_ELEMENTS = 1 << 20


def _fused_kernel(queries_cik: torch.Tensor):
    """(kvb_dist.native's kernel, the queries as it takes them: rows with a contiguous last dim)
    where it applies (float32 on the CPU), else (None, the queries)."""
    if queries_cik.device.type != "cpu" or queries_cik.dtype != torch.float32:
        return None, queries_cik
    fused = fused_nearest_means()
    if fused is not None and queries_cik.stride(-1) != 1:
        queries_cik = queries_cik.contiguous()
    return fused, queries_cik


def _num_workers(pool: Optional[ThreadPoolExecutor]) -> int:
    return 1 if pool is None else 1 + pool._max_workers


def _run_chunks(queries_cik, num_pairs: int, chunk_elements: int, pool, work, by_codebook: bool = False) -> None:
    """work(worker, chunks) over (codebook, first row, end row) chunks of about chunk_elements
    distances each, split over this thread (worker 0) and the pool's threads; by_codebook: each
    codebook's chunks all go to one worker."""
    num_codebooks, num_queries, _ = queries_cik.shape
    rows_per_chunk = max(1, min(num_queries, chunk_elements // num_pairs))
    chunks = [(c, i0, min(i0 + rows_per_chunk, num_queries))
              for c in range(num_codebooks) for i0 in range(0, num_queries, rows_per_chunk)]
    workers = _num_workers(pool)
    if by_codebook:
        shares = [[chunk for chunk in chunks if chunk[0] % workers == w] for w in range(workers)]
    else:
        shares = [chunks[w::workers] for w in range(workers)]
    others = [pool.submit(work, w, shares[w]) for w in range(1, workers) if shares[w]]
    work(0, shares[0])
    for future in others:
        future.result()


def nearest_means(
    queries_cik: torch.Tensor,
    means_cjk: torch.Tensor,
    chunk_elements: int = ASSIGN_CHUNK_ELEMENTS,
    pool: Optional[ThreadPoolExecutor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index [c, i] of the nearest mean of every query (the first one on ties, as argmin) and
    the squared distance [c, i] to it.

    On the CPU: the fused kernel of kvb_dist.native, which never writes the [i, j] distances.
    Elsewhere (or without a C compiler): |m|^2 - 2 q.m by GEMM on chunks that stay in cache,
    then the two-level argmin of codebook.best_in_rows. With a thread pool the chunks run on
    its threads (see chunk_threads); the result is the same.
    """
    num_codebooks, num_queries, _ = queries_cik.shape
    num_pairs = means_cjk.shape[1]
    indices = torch.empty(num_codebooks, num_queries, dtype=torch.long, device=queries_cik.device)
    distances = torch.empty(num_codebooks, num_queries, dtype=torch.float32, device=queries_cik.device)
    if num_queries == 0 or num_codebooks == 0:
        return indices, distances
    fused, queries_cik = _fused_kernel(queries_cik)
    if fused is not None:
        means_cjk = means_cjk.contiguous()
    else:
        means_sq = means_cjk.pow(2).sum(-1)
        means_ckj = means_cjk.transpose(1, 2).contiguous()
    rows_per_chunk = max(1, min(num_queries, chunk_elements // num_pairs))

    # Chunks are disjoint slices of indices and distances: safe to fill from several threads.
    def assign(worker: int, chunks) -> None:
        if fused is not None:
            for c, i0, i1 in chunks:
                fused(queries_cik[c, i0:i1], means_cjk[c], indices[c, i0:i1], distances[c, i0:i1])
            return
        buffer = queries_cik.new_empty(rows_per_chunk, num_pairs)
        for c, i0, i1 in chunks:
            queries = queries_cik[c, i0:i1]
            partial = torch.addmm(means_sq[c], queries, means_ckj[c], alpha=-2, out=buffer[: i1 - i0])
            best, index = best_in_rows(partial, largest=False)
            indices[c, i0:i1] = index
            torch.add(best, queries.pow(2).sum(-1), out=distances[c, i0:i1])

    _run_chunks(queries_cik, num_pairs, chunk_elements, pool, assign)
    return indices, distances


def accumulate_assignments_(
    queries_cik: torch.Tensor,
    means_cjk: torch.Tensor,
    counts_cj: torch.Tensor,
    sums_cjk: torch.Tensor,
    sse_c: torch.Tensor,
    chunk_elements: int = ASSIGN_CHUNK_ELEMENTS,
    pool: Optional[ThreadPoolExecutor] = None,
) -> None:
    """One Lloyd step's statistics: adds every query to its nearest mean's count [c, j] and sum
    [c, j, k], and its squared distance to the SSE [c] (float64 accumulators, in place).

    With the fused kernel the accumulation happens inside it, on all the pool's threads: each
    adds the codebooks it owns into the accumulators (no per-thread [c, j, k] copies).
    """
    num_codebooks, num_queries, dim = queries_cik.shape
    num_pairs = means_cjk.shape[1]
    if num_queries == 0 or num_codebooks == 0:
        return
    fused, queries_cik = _fused_kernel(queries_cik)
    if fused is None:
        indices, distances = nearest_means(queries_cik, means_cjk, chunk_elements, pool)
        batch_counts, batch_sums = assignment_statistics(queries_cik, indices, num_pairs)
        counts_cj += batch_counts
        sums_cjk += batch_sums
        sse_c += distances.clamp(min=0).sum(1, dtype=torch.float64)  # may round below zero on a mean
        return
    means_cjk = means_cjk.contiguous()

    def accumulate(worker: int, chunks) -> None:
        counts, sums, sse = accumulators[worker]
        for c, i0, i1 in chunks:
            fused(queries_cik[c, i0:i1], means_cjk[c], counts_j=counts[c], sums_jk=sums[c], sse_1=sse[c : c + 1])

    # Workers that own whole codebooks add into the shared accumulators; fewer codebooks than
    # threads: each worker has its own, summed at the end.
    workers = _num_workers(pool)
    by_codebook = num_codebooks >= workers
    accumulators = [(counts_cj, sums_cjk, sse_c)] + [
        (counts_cj, sums_cjk, sse_c) if by_codebook
        else (torch.zeros_like(counts_cj), torch.zeros_like(sums_cjk), torch.zeros_like(sse_c))
        for _ in range(1, workers)
    ]
    _run_chunks(queries_cik, num_pairs, chunk_elements, pool, accumulate, by_codebook=by_codebook)
    if not by_codebook:
        for counts, sums, sse in accumulators[1:]:
            counts_cj += counts
            sums_cjk += sums
            sse_c += sse


@contextmanager
def chunk_threads(num_threads: int):
    """The threads for nearest_means and accumulate_assignments_ (the calling thread and a pool
    of num_threads - 1), with torch's intra-op threads at one meanwhile (restored after). Chunks
    then run side by side without an OpenMP barrier per op: on a busy machine every barrier can
    wait a scheduler slice for a descheduled thread, which made many small parallel ops 10-30x
    slower than one thread."""
    if num_threads <= 1:
        yield None
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(num_threads - 1, thread_name_prefix="kmeans") as pool:
            yield pool
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Data sources and the layout of a single process


class InMemoryBatches:
    """Re-iterable (x, sample ids) batches of an in-memory tensor, for streaming_kmeans.

    Ids default to first_id + row number; give the same ids however the rows are split over
    ranks (e.g. first_id = offset of this rank's rows) to get the same sample everywhere.
    """

    def __init__(self, x: torch.Tensor, batch_size: int, ids: Optional[torch.Tensor] = None, first_id: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.batch_size = x, batch_size
        self.ids = torch.arange(first_id, first_id + x.shape[0]) if ids is None else ids.to(torch.int64)

    def __iter__(self):
        for start in range(0, self.x.shape[0], self.batch_size):
            yield self.x[start : start + self.batch_size], self.ids[start : start + self.batch_size]


class ChunkHeads:
    """x [b, *spatial, num_codebooks * k] -> heads [b, num_codebooks, *spatial, k] (chunk splitting)."""

    def __init__(self, num_codebooks: int):
        self.num_codebooks = num_codebooks

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.num_codebooks:
            raise ValueError(f"feature dim {x.shape[-1]} is not divisible by num_codebooks={self.num_codebooks}")
        heads = x.reshape(*x.shape[:-1], self.num_codebooks, x.shape[-1] // self.num_codebooks)
        return heads.movedim(-2, 1)


class _OneProcess:
    """The collectives of a world of one (kvb_dist.distributed.layout.ParallelLayout.single() behaves the
    same; it is not imported here so that the math modules stay free of torch.distributed)."""

    world_size, rank, num_shards, num_replicas, shard_index, replica_index = 1, 0, 1, 1, 0, 0

    def codebook_ranges(self, num_codebooks: int) -> List[Tuple[int, int]]:
        return [(0, num_codebooks)]

    def codebook_range(self, num_codebooks: int) -> Tuple[int, int]:
        return 0, num_codebooks

    def all_reduce_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_world(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        return tensor

    def all_gather_world(self, tensor: torch.Tensor, over: str = "world") -> torch.Tensor:
        return tensor[None]

    def all_gather_rows(self, local: torch.Tensor, rows_per_rank, over: str = "world") -> torch.Tensor:
        return local

    def shard_peers(self, per_rank) -> list:
        return list(per_rank)

    def route_to_owners(self, heads_cik: torch.Tensor, queries_per_rank=None):
        return SimpleNamespace(owned_cik=heads_cik, first_query_id=0, num_global_queries=heads_cik.shape[1])

    def route_to_owners_by_peer(self, heads_cik: torch.Tensor, queries_per_rank=None) -> List[torch.Tensor]:
        return [heads_cik]


# ---------------------------------------------------------------------------------------------
# The passes


@dataclass
class KMeansResult:
    means: torch.Tensor  # [C_local, J, k] for codebooks first_codebook .. (this rank's range)
    counts: torch.Tensor  # [C_local, J] cluster sizes of the last assignment (after splits)
    first_codebook: int
    num_codebooks: int  # C, over all ranks
    sse_history: List[float]  # SSE of each iteration's assignment (all codebooks, all data)
    sse_per_codebook: torch.Tensor  # [C] of the last assignment
    iteration_seconds: List[float]
    num_queries: int  # queries per codebook in the data set
    num_training_queries: int  # after the max_points_per_centroid cap
    num_split: int  # empty clusters split over all iterations
    initial_means: Optional[torch.Tensor]  # [C_local, J, k] with keep_initial_means, else None

    def install_(self, bottleneck) -> None:
        """Hands the keys to a (possibly sharded) KeyValueBottleneck with consistent EMA state."""
        first = getattr(bottleneck, "first_codebook", 0)
        if first != self.first_codebook or tuple(bottleneck.keys.shape) != tuple(self.means.shape):
            raise ValueError(
                f"the bottleneck holds keys {tuple(bottleneck.keys.shape)} from codebook {first}; this k-means "
                f"result is {tuple(self.means.shape)} from codebook {self.first_codebook}: use the same layout"
            )
        bottleneck.set_keys_(self.means.to(bottleneck.keys.device), self.counts.to(bottleneck.keys.device))


# Routing by codebook range (DESIGN.md §7: no rank holds what it does not own).
#
# A rank streams its own data for all C codebooks, but keeps rows only for the codebooks it holds:
# - sampling pass: per batch, the rank's sample candidates (queries below its running local
#   bottom-L priority: a query outside its rank's bottom L is outside the global bottom L) are
#   routed to the owners of each codebook range (the same all-to-all over the shard group as a
#   Lloyd pass), with their priorities (an all-gather of int64 over the shard group). The owner
#   keeps, in place in one [C_mine, L, k] buffer, the bottom L of what its shard group offered.
#   Keeping the local candidates of all codebooks instead would be [C, L, k] per rank whenever a
#   rank's data exceeds L queries, which it does at the design size (32-256 GiB): bounded by the
#   local data is not bounded. What a rank holds of all codebooks is its data batch and L
#   priorities (8 bytes each).
# - merge: the replica group (the R ranks holding the same range, one per shard group) fixes the
#   global bottom L from an all-gather of L priorities, then sums slot-ordered [C_mine, L, k]
#   blocks (each slot filled by exactly one rank), a block of codebooks at a time, into the
#   buffer itself: per rank O(C_mine x L x k), whatever C is.
# - Lloyd passes: queries are routed to the owners per batch (as before); counts and sums
#   [C_mine, J, k + 1] live in one float64 buffer summed in place over the replica group (a
#   reduce among exactly the ranks that need them); only the SSE [C] and the split count travel
#   over the world.
# Every data-dependent decision (non-finite heads, shapes, end of data, duplicate ids) is taken
# on a gathered or reduced value, so every rank raises the same error at the same collective.

# The merge, k-means++ and each batch's assignment work on about 1/8 of a rank's codebooks at a
# time: their temporaries (slot-ordered rows, k-means++ distances, the kernel's -2 x means) stay
# an eighth of the sample or means instead of a copy of them.
CODEBOOK_BLOCKS = 8


def _codebook_blocks(num_local: int):
    """[c0, c1) blocks of about num_local / CODEBOOK_BLOCKS codebooks (the same on every holder)."""
    block = max(1, -(-num_local // CODEBOOK_BLOCKS))
    return [(c0, min(c0 + block, num_local)) for c0 in range(0, num_local, block)]


# The columns of the per-batch status every rank gathers (see _agree_on_batch).
_STATUS = ("queries", "offered", "has data", "codebooks", "dim", "non-finite", "bad sample id")


def assign_chunk_elements(device) -> int:
    """Distances per chunk of the k-means assignment on this device (streaming_kmeans' default).

    On the CPU, ASSIGN_CHUNK_ELEMENTS: chunks that stay in cache (the fused kernel's sweet spot).
    Elsewhere codebook.default_chunk_elements, as the lookup: on a GPU a sixteenth of the free
    memory (asked once per k-means, not per chunk), between 1 << 22 and 1 << 30 distances; at
    J = 65536 that is 4096 to 16384 queries per GEMM instead of 16, thousands of kernel launches
    per pass instead of millions.
    """
    device = torch.device(device)
    return ASSIGN_CHUNK_ELEMENTS if device.type == "cpu" else default_chunk_elements(device)


@dataclass
class _SamplingState:
    num_queries: int = 0  # per codebook, all ranks together
    num_codebooks: int = 0
    dim: int = 0
    sample_priorities: Optional[torch.Tensor] = None  # [L] buffer, first num_sampled filled (unordered)
    sample_rows: Optional[torch.Tensor] = None  # [C_mine, L, k] buffer: my codebooks' rows of those queries
    num_sampled: int = 0
    cap_parts: List[torch.Tensor] = field(default_factory=list)  # this rank's bottom cap_size priorities
    cap_size: int = 0


def _non_finite_sample(queries_cik: torch.Tensor, ids: torch.Tensor, num_positions: int) -> Optional[int]:
    """The id of the first sample with a NaN or inf head, or None."""
    if bool(torch.isfinite(queries_cik.sum())) or bool(torch.isfinite(queries_cik).all()):
        return None
    bad_query = int((~torch.isfinite(queries_cik)).any(-1).any(0).nonzero()[0, 0])
    return int(ids[bad_query // num_positions])


def _queries_of(item, to_heads, device):
    """(queries [C, b * n, k] fp32, sample ids [b], positions n) of a batch (x, ids); the batch
    and its heads are not kept (the queries are a copy unless heads_to_queries can view them)."""
    x, ids = item
    heads = to_heads(x.to(device))
    batch = max(heads.shape[0], 1)
    queries = heads_to_queries(heads).float()
    return queries, ids.to(device), queries.shape[1] // batch


def _agree_on_batch(layout, device, queries_cik: Optional[torch.Tensor], num_offered: int,
                    bad_id: Optional[int], shape: Optional[Tuple[int, int]]) -> torch.Tensor:
    """Every rank's status of this step [ranks, len(_STATUS)] (one small all-gather, on the CPU
    afterwards) for its batch's queries [C, i, k] (None: out of data), of which it offers
    num_offered; checked alike everywhere: the same ValueError on every rank for non-finite
    heads, or for (codebooks, head dim) that differ between ranks or from `shape` (seen before)."""
    has_data = queries_cik is not None
    num_codebooks, num_queries, dim = queries_cik.shape if has_data else (0, 0, 0)
    row = [num_queries, num_offered, int(has_data), num_codebooks, dim, int(bad_id is not None),
           0 if bad_id is None else bad_id]
    table = layout.all_gather_world(torch.tensor(row, dtype=torch.int64, device=device)).cpu()
    bad = table[:, 5].nonzero()
    if bad.numel():
        rank = int(bad[0, 0])
        raise ValueError(f"non-finite heads (NaN or inf) for sample id {int(table[rank, 6])} in the k-means data "
                         f"(rank {rank})")
    shapes = table[table[:, 2] > 0][:, 3:5]
    if shape is not None:
        shapes = torch.cat([torch.tensor([shape]), shapes])
    if shapes.shape[0] and bool((shapes != shapes[0]).any()):
        raise ValueError(f"ranks disagree on (codebooks, head dim): {shapes.tolist()}")
    return table


def _offer_(state: _SamplingState, priorities: torch.Tensor, rows_cik: torch.Tensor, sample_size: int) -> None:
    """Keeps, in place in the state's buffers, the sample_size smallest priorities offered so far
    and their rows: a new query overwrites the slot of one that drops out (no [C_mine, 2L, k] copy)."""
    free = sample_size - state.num_sampled
    if free > 0:
        take = min(free, priorities.numel())
        n = state.num_sampled
        state.sample_priorities[n : n + take] = priorities[:take]
        state.sample_rows[:, n : n + take] = rows_cik[:, :take]
        state.num_sampled += take
        priorities, rows_cik = priorities[take:], rows_cik[:, take:]
    if priorities.numel() == 0:
        return
    held = state.sample_priorities  # full: [sample_size]
    below = priorities < held.max()
    if not bool(below.any()):
        return
    priorities, rows_cik = priorities[below], rows_cik[:, below]
    combined = torch.cat([held, priorities])
    kept = torch.zeros(combined.numel(), dtype=torch.bool, device=combined.device)
    kept[torch.topk(combined, sample_size, largest=False, sorted=False).indices] = True
    slots, incoming = (~kept[:sample_size]).nonzero()[:, 0], kept[sample_size:].nonzero()[:, 0]
    held[slots] = priorities[incoming]
    state.sample_rows[:, slots] = rows_cik[:, incoming]


def _sampling_pass(data, to_heads, layout, seed: int, sample_size: int, cap_size: Optional[int], device) -> _SamplingState:
    """One pass over every rank's data, all ranks in step (see the routing notes above): the data
    size, every rank's bottom-`cap_size` priorities of its own queries, and, on the owners, the
    bottom-`sample_size` queries of their shard group for the codebooks they hold.

    A rank out of data keeps joining with nothing to offer until every rank is out.
    """
    state = _SamplingState()
    local_bottom = torch.empty(0, dtype=torch.int64, device=device)  # my bottom sample_size priorities so far
    cap_threshold = NO_PRIORITY
    iterator, exhausted, shape = iter(data), False, None
    while True:
        item = None if exhausted else next(iterator, None)
        exhausted = item is None
        queries = offered = bad_id = None
        offered_priorities = torch.empty(0, dtype=torch.int64, device=device)
        if not exhausted:
            queries, ids, num_positions = _queries_of(item, to_heads, device)
            item = None
            bad_id = _non_finite_sample(queries, ids, num_positions)
            priorities = query_priorities(seed, ids, num_positions)
            if sample_size and bad_id is None:
                if local_bottom.numel() == sample_size:  # only queries below my L-th can be in the global L
                    keep = priorities < local_bottom[-1]
                    offered_priorities, offered = priorities[keep], queries[:, keep]
                else:
                    offered_priorities, offered = priorities, queries
                if offered_priorities.numel():
                    local_bottom = bottom_k(torch.cat([local_bottom, offered_priorities]), sample_size)[0]
            if cap_size is not None:
                below = priorities[priorities < cap_threshold]
                state.cap_parts.append(below)
                state.cap_size += below.numel()
                if state.cap_size > 2 * cap_size:  # compact now and then: memory stays O(cap_size)
                    merged = bottom_k(torch.cat(state.cap_parts), cap_size)[0]
                    state.cap_parts, state.cap_size, cap_threshold = [merged], merged.numel(), int(merged[-1])
        status = _agree_on_batch(layout, device, queries, offered_priorities.numel(), bad_id, shape)
        if int(status[:, 2].sum()) == 0:
            return state
        with_data = status[status[:, 2] > 0]
        state.num_queries += int(status[:, 0].sum())
        if shape is None:
            shape = (int(with_data[0, 3]), int(with_data[0, 4]))
            state.num_codebooks, state.dim = shape
            if sample_size:
                start, stop = layout.codebook_range(state.num_codebooks)
                state.sample_priorities = torch.empty(sample_size, dtype=torch.int64, device=device)
                state.sample_rows = torch.empty(stop - start, sample_size, state.dim, device=device)
        if not sample_size:
            continue
        if offered is None:
            offered = torch.empty(state.num_codebooks, 0, state.dim, device=device)
        offered_per_rank = [int(n) for n in status[:, 1]]
        queries = None
        offered = offered.contiguous()  # what the all-to-all sends; the batch itself can go now
        parts = layout.route_to_owners_by_peer(offered, offered_per_rank)
        offered = None  # only the rows of my codebooks stay
        peer_sizes = layout.shard_peers(offered_per_rank)
        owned_priorities = layout.all_gather_rows(offered_priorities, peer_sizes, over="shard")
        for part, part_priorities in zip(parts, owned_priorities.split(peer_sizes)):
            _offer_(state, part_priorities, part, sample_size)


def _merge_samples(state: _SamplingState, sample_size: int, layout, device) -> torch.Tensor:
    """The global bottom-`sample_size` queries [C_mine, L, k] of my codebooks, ordered by priority,
    identical on every rank that holds them. Built in the sampling buffer, a block of codebooks
    at a time: the merge holds O(C_mine x L x k) on a rank, whatever the other codebooks hold."""
    held = state.sample_priorities[: state.num_sampled]  # unordered
    mine = bottom_k(held, sample_size)[0]  # ascending
    local = torch.full((sample_size,), NO_PRIORITY, dtype=torch.int64, device=device)
    local[: mine.numel()] = mine
    # Each rank of my replica group offers its shard group's bottom L (the same on all owners of
    # a shard group): together they hold the global bottom L, each query exactly once.
    chosen = layout.all_gather_world(local, over="replica").reshape(-1).sort().values[:sample_size]
    slots = torch.searchsorted(chosen, held)
    found = slots < sample_size
    found &= chosen[slots.clamp(max=sample_size - 1)] == held
    columns, slots = found.nonzero()[:, 0], slots[found]
    hits = torch.zeros(sample_size, device=device)
    hits.index_add_(0, slots, torch.ones(slots.numel(), device=device))
    hits = layout.all_reduce_replicas(hits)
    duplicates = layout.all_reduce_world((hits != 1).sum().reshape(1).float())
    if bool(duplicates[0] > 0):
        raise ValueError(
            "two samples have the same id (duplicate WebDataset keys?): sample ids must be unique in the data set"
        )
    rows = state.sample_rows
    state.sample_rows = state.sample_priorities = None
    blocks = _codebook_blocks(rows.shape[0])
    block = max((c1 - c0 for c0, c1 in blocks), default=0)
    merged_buffer = rows.new_empty(block, sample_size, rows.shape[2])
    mine_buffer = rows.new_empty(block, columns.numel(), rows.shape[2])
    for c0, c1 in blocks:
        merged, mine_rows = merged_buffer[: c1 - c0].zero_(), mine_buffer[: c1 - c0]
        torch.index_select(rows[c0:c1], 1, columns, out=mine_rows)
        merged.index_copy_(1, slots, mine_rows)
        # Each slot receives exactly one query from exactly one rank: the sum is exact.
        rows[c0:c1, :sample_size] = layout.all_reduce_replicas(merged)
    return rows[:, :sample_size]


@dataclass
class _PassStatistics:
    """One Lloyd pass's statistics of my codebooks, float64: counts and sums are views of one
    buffer, so that summing them over the replica group is one in-place collective, no copy."""

    packed: torch.Tensor  # [C_mine * J * (1 + k)]
    counts: torch.Tensor  # [C_mine, J]
    sums: torch.Tensor  # [C_mine, J, k]
    sse: torch.Tensor  # [C_mine]
    offered: int = 0  # queries all ranks offered (per codebook)

    @classmethod
    def zeros(cls, num_local: int, num_pairs: int, dim: int, device) -> "_PassStatistics":
        packed = torch.zeros(num_local * num_pairs * (1 + dim), dtype=torch.float64, device=device)
        counts = packed[: num_local * num_pairs].view(num_local, num_pairs)
        sums = packed[num_local * num_pairs :].view(num_local, num_pairs, dim)
        return cls(packed, counts, sums, torch.zeros(num_local, dtype=torch.float64, device=device))


def _lloyd_pass(data, to_heads, means_cjk, layout, num_codebooks: int, dim: int, seed: int,
                cap_threshold: Optional[int], chunk_elements: int, pool: Optional[ThreadPoolExecutor],
                check_finite: bool) -> _PassStatistics:
    """One assignment pass: counts [c, j], sums [c, j, k] and SSE [c] of the queries routed to
    this rank for its codebooks, and the number of queries all ranks offered.

    All ranks step together (routing is a collective): a rank out of data keeps joining with no
    queries until every rank is out, so uneven data neither hangs nor drops anything.
    """
    num_local, num_pairs, _ = means_cjk.shape
    device = means_cjk.device
    stats = _PassStatistics.zeros(num_local, num_pairs, dim, device)
    blocks = _codebook_blocks(num_local)
    iterator, exhausted = iter(data), False
    while True:
        item = None if exhausted else next(iterator, None)
        exhausted = item is None
        queries = bad_id = None
        if not exhausted:
            queries, ids, num_positions = _queries_of(item, to_heads, device)
            item = None
            if check_finite:  # every pass sees the same data: checking one pass is enough
                bad_id = _non_finite_sample(queries, ids, num_positions)
            if cap_threshold is not None:
                queries = queries[:, query_priorities(seed, ids, num_positions) <= cap_threshold]
        num_offered = 0 if queries is None else queries.shape[1]
        status = _agree_on_batch(layout, device, queries, num_offered, bad_id, (num_codebooks, dim))
        if int(status[:, 2].sum()) == 0:
            return stats
        if queries is None:
            queries = means_cjk.new_empty(num_codebooks, 0, dim)
        queries_per_rank = [int(n) for n in status[:, 1]]
        stats.offered += sum(queries_per_rank)
        queries = queries.contiguous()  # what the all-to-all sends; the batch itself can go now
        parts = layout.route_to_owners_by_peer(queries, queries_per_rank)
        queries = None  # only the rows of my codebooks stay
        # Codebooks and queries are independent: blocks of codebooks and the peers' parts one by
        # one give the same statistics as all at once (up to float64 summation order).
        for owned in parts:
            for c0, c1 in blocks:
                accumulate_assignments_(owned[c0:c1], means_cjk[c0:c1], stats.counts[c0:c1], stats.sums[c0:c1],
                                        stats.sse[c0:c1], chunk_elements, pool)
        parts = owned = None


def streaming_kmeans(
    data: Iterable,
    num_pairs: int,
    layout=None,
    *,
    num_iters: int = 10,
    init: str = "random",
    init_means: Optional[torch.Tensor] = None,
    seed: int = 0,
    max_points_per_centroid: Optional[int] = 256,
    tol: float = 0.0,
    split_empty: bool = True,
    to_heads: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    kmeanspp_sample_factor: int = 8,
    after_pass: Optional[Callable[[], object]] = None,
    chunk_elements: Optional[int] = None,
    num_threads: Optional[int] = None,
    device: Optional[torch.device] = None,
    keep_initial_means: bool = False,
) -> KMeansResult:
    """Lloyd's k-means with `num_pairs` clusters per codebook over data streamed in passes.

    data: re-iterable; each iter() is a fresh pass over this rank's samples, yielding (x, ids)
      with ids [b] stable unique int64 sample ids (ShardStream.features_and_ids() hashes keys;
      InMemoryBatches numbers rows). Ranks may hold different amounts of data, or none.
    layout: a kvb_dist.distributed.layout.ParallelLayout (None: one process). Every rank calls this together.
    to_heads: x -> heads [b, C, *spatial, k] (default: x already is); see ChunkHeads.
    init: "random" (the J queries of smallest priority) or "kmeans++" (seeded on the
      kmeanspp_sample_factor * J smallest); init_means [C, J, k] (all codebooks, identical on
      every rank) overrides both.
    max_points_per_centroid: cap the training queries per codebook at this x J, as FAISS does
      (None: use all). num_iters Lloyd passes; tol > 0 stops early once an iteration lowers the
      SSE by less than tol (relative). after_pass() runs on every rank after each pass (e.g. the
      all-rank bad-shard check). num_threads: threads for the assignment (default: torch's).
    chunk_elements: distances per assignment chunk (default: by device, see assign_chunk_elements).
    device: where the k-means runs (default cpu); batches are moved there before to_heads, and
      the layout's collectives see tensors on it (gloo: cpu, NCCL: cuda).
    keep_initial_means: also return the initial means (result.initial_means; else None), a copy
      of the means that costs as much memory as they do.

    A rank holds rows (sample, means, statistics) of its own codebooks only; its data batches
    are the only tensors it holds for all of them (see the routing notes above).
    Returns this rank's codebooks; result.install_(bottleneck) hands them to the bottleneck.
    """
    layout = _OneProcess() if layout is None else layout
    device = torch.device("cpu") if device is None else torch.device(device)
    to_heads = to_heads if to_heads is not None else _identity
    if not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs must be a positive integer, got {num_pairs!r}")
    if init not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
    if not isinstance(num_iters, int) or num_iters < 0:
        raise ValueError(f"num_iters must be a non-negative integer, got {num_iters!r}")
    if max_points_per_centroid is not None and max_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid must be positive or None, got {max_points_per_centroid!r}")
    if kmeanspp_sample_factor < 1:
        raise ValueError(f"kmeanspp_sample_factor must be >= 1, got {kmeanspp_sample_factor!r}")
    if init_means is not None and (init_means.ndim != 3 or init_means.shape[1] != num_pairs):
        raise ValueError(f"init_means must be [num_codebooks, num_pairs={num_pairs}, dim], got {tuple(init_means.shape)}")
    if chunk_elements is not None and chunk_elements < 1:
        raise ValueError(f"chunk_elements must be positive or None, got {chunk_elements!r}")
    chunk_elements = assign_chunk_elements(device) if chunk_elements is None else chunk_elements
    cap_size = None if max_points_per_centroid is None else max_points_per_centroid * num_pairs

    # Sampling pass: only for a sample (init) or to know whether the cap applies.
    plan = None
    if init_means is None or cap_size is not None:
        sample_size = 0 if init_means is not None else num_pairs if init == "random" else kmeanspp_sample_factor * num_pairs
        plan = _sampling_plan(data, to_heads, layout, seed, num_pairs, sample_size, cap_size, device)
        num_codebooks, dim = plan.num_codebooks, plan.dim
        if init_means is not None and tuple(init_means.shape) != (num_codebooks, num_pairs, dim):
            raise ValueError(f"init_means has shape {tuple(init_means.shape)}, the data gives {(num_codebooks, num_pairs, dim)}")
    else:
        num_codebooks, dim = init_means.shape[0], init_means.shape[2]

    start, stop = layout.codebook_range(num_codebooks)
    initial_means = None
    if init_means is not None:
        means = init_means[start:stop].to(device=device, dtype=torch.float32).clone()
    elif init == "kmeans++":
        means = _seed_kmeans_plus_plus(plan.sample, num_pairs, seed, start)
    else:
        means = plan.sample[:, :num_pairs]  # L = J: the sample is the initial means
        if keep_initial_means:
            initial_means, means = means, means.clone()
        elif not means.is_contiguous():
            means = means.contiguous()
    if keep_initial_means and initial_means is None:
        initial_means = means.clone()
    if plan is not None:
        plan.sample = None  # the k-means++ sample (8 J rows per codebook) is not kept through the passes
    result = KMeansResult(
        means=means, counts=torch.ones(stop - start, num_pairs, device=device), first_codebook=start,
        num_codebooks=num_codebooks, sse_history=[], sse_per_codebook=torch.zeros(num_codebooks, dtype=torch.float64),
        iteration_seconds=[], num_queries=-1 if plan is None else plan.num_queries,
        num_training_queries=-1 if plan is None else plan.num_training, num_split=0, initial_means=initial_means,
    )
    cap_threshold = None if plan is None else plan.cap_threshold
    # Chunks of the assignment run on a pool of threads (see chunk_threads); the rest of the pass
    # is small and runs single-threaded meanwhile.
    num_threads = torch.get_num_threads() if num_threads is None else num_threads
    with chunk_threads(num_threads if device.type == "cpu" else 1) as pool:
        for iteration in range(num_iters):
            started = time.perf_counter()
            stats = _lloyd_pass(
                data, to_heads, result.means, layout, num_codebooks, dim, seed, cap_threshold, chunk_elements, pool,
                check_finite=plan is None and iteration == 0,
            )
            if result.num_training_queries < 0:  # no sampling pass: this pass counted the data
                result.num_queries = result.num_training_queries = stats.offered
            _update_means_(result, stats, layout, seed, iteration, split_empty)
            del stats
            if after_pass is not None:
                after_pass()
            result.iteration_seconds.append(time.perf_counter() - started)
            if layout.rank == 0:
                logger.info("k-means iteration %d/%d: SSE %.6g, %d empty clusters split so far, %.2fs",
                            iteration + 1, num_iters, result.sse_history[-1], result.num_split,
                            result.iteration_seconds[-1])
            history = result.sse_history
            if tol > 0 and len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]:
                break
    return result


def _identity(x):
    return x


def _seed_kmeans_plus_plus(sample_cnk: torch.Tensor, num_pairs: int, seed: int, first_codebook: int) -> torch.Tensor:
    """kmeans_plus_plus on my codebooks, a block at a time: its [c, n, k] temporaries stay a
    fraction of the sample. The draws are per codebook: the same means as all at once."""
    means = sample_cnk.new_empty(sample_cnk.shape[0], num_pairs, sample_cnk.shape[2])
    for c0, c1 in _codebook_blocks(sample_cnk.shape[0]):
        means[c0:c1] = kmeans_plus_plus(sample_cnk[c0:c1], num_pairs, seed, first_codebook=first_codebook + c0)
    return means


@dataclass
class _Plan:
    num_codebooks: int
    dim: int
    num_queries: int  # per codebook, in the whole data set
    num_training: int  # after the cap
    cap_threshold: Optional[int]  # largest priority kept (None: all)
    sample: Optional[torch.Tensor]  # [C_mine, L, k] bottom-L sample of my codebooks, identical on their holders


def _sampling_plan(data, to_heads, layout, seed, num_pairs, sample_size, cap_size, device) -> _Plan:
    """The sampling pass and its reductions: data size, cap threshold and merged sample."""
    started = time.perf_counter()
    if cap_size is not None:
        sample_size = min(sample_size, cap_size)
    state = _sampling_pass(data, to_heads, layout, seed, sample_size, cap_size, device)
    num_queries = state.num_queries
    if num_queries < num_pairs:
        raise ValueError(
            f"k-means with {num_pairs} pairs per codebook needs at least {num_pairs} samples (queries per "
            f"codebook) in the data, found {num_queries}"
        )
    num_training, cap_threshold = num_queries, None
    if cap_size is not None and num_queries > cap_size:
        local = (bottom_k(torch.cat(state.cap_parts), cap_size)[0] if state.cap_parts
                 else torch.empty(0, dtype=torch.int64, device=device))
        cap_threshold = kth_smallest_global(local, cap_size, layout.all_reduce_world)
        num_training = int(layout.all_reduce_world((local <= cap_threshold).sum().reshape(1))[0])
    state.cap_parts = []
    sample = _merge_samples(state, min(sample_size, num_training), layout, device) if sample_size else None
    if layout.rank == 0:
        logger.info("k-means sampling pass: %d queries per codebook, training on %d, %.2fs",
                    num_queries, num_training, time.perf_counter() - started)
    return _Plan(state.num_codebooks, state.dim, num_queries, num_training, cap_threshold, sample)


def _update_means_(result: KMeansResult, stats: _PassStatistics, layout, seed: int, iteration: int, split_empty: bool):
    """After a pass: sum the statistics over the replicas, derive the means, split empty clusters,
    and record the SSE. Sums and counts are reduced, then divided: means are never averaged.

    In place, a codebook at a time: no float64 copy of all my codebooks' sums or means."""
    num_codebooks, start = result.num_codebooks, result.first_codebook
    stop = start + result.means.shape[0]
    layout.all_reduce_replicas(stats.packed)  # counts and sums are views of it
    counts, sums = stats.counts, stats.sums
    for c in range(counts.shape[0]):
        filled = counts[c] > 0
        derived = (sums[c] / counts[c].clamp(min=1)[:, None]).float()
        result.means[c] = torch.where(filled[:, None], derived, result.means[c])
    result.counts = counts.float()
    # Decided on reduced counts with counter-based draws: every replica splits alike.
    num_split = split_empty_clusters_(result.means, result.counts, seed, iteration, start) if split_empty else 0
    # One world all-reduce for what every rank reports: SSE per codebook (each rank adds its
    # share of the queries) and the number of splits (counted by the first replica only).
    report = torch.zeros(num_codebooks + 1, dtype=torch.float64, device=result.means.device)
    report[start:stop] = stats.sse
    report[-1] = num_split if layout.replica_index == 0 else 0
    report = layout.all_reduce_world(report)
    result.sse_per_codebook = report[:-1].cpu()
    result.num_split += int(report[-1])
    result.sse_history.append(float(report[:-1].sum()))
