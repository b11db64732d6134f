"""Math on a slice of codebooks: lookup, EMA statistics, key derivation, dead-pair reset.

Pure tensor functions. Nothing here knows about torch.distributed: where a statistic must be
summed over other processes, the caller passes `reduce_sum` (identity for a world of one).

Shape legend: c codebooks in the slice, i queries, j key-value pairs per codebook,
k key dimension, v value dimension, t pairs fetched per query (top-k).

Randomness (Gumbel noise, replacement samples, k-means seeds) is counter based: a pure
function of (seed, step, codebook id, query id, pair). Any split of codebooks or queries
over processes therefore draws exactly the numbers one process would draw.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from kvb_dist.native import native_kernels

Reduce = Callable[[torch.Tensor], torch.Tensor]

# Scores for at most this many (codebook, query, pair) triples exist at once on the CPU: 16 MiB in
# fp32, small enough to stay in cache between the GEMM that writes them and the arg-max that reads them.
DEFAULT_CHUNK_ELEMENTS = 1 << 22
# On an accelerator: large batched GEMMs (few kernel launches), within this share of free memory.
ACCELERATOR_CHUNK_MEMORY_FRACTION = 1 / 16
ACCELERATOR_CHUNK_ELEMENTS_MAX = 1 << 30


def no_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def default_chunk_elements(device: torch.device) -> int:
    """Elements of one chunk of float32 scores (or distances) on this device.

    A CPU wants chunks that fit its cache. A GPU wants few, large kernel launches: 1 << 22 scores
    are 16 to 64 queries per GEMM at J = 65536, millions of launches per k-means pass. There a
    chunk takes a share of the free memory (asked once per call: one query, no per-chunk sync).
    """
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = int(free_bytes * ACCELERATOR_CHUNK_MEMORY_FRACTION) // 4  # float32 scores
        return max(DEFAULT_CHUNK_ELEMENTS, min(ACCELERATOR_CHUNK_ELEMENTS_MAX, budget))
    return DEFAULT_CHUNK_ELEMENTS


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers (splitmix64 on int64 with wrap-around arithmetic).


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)
# Odd multipliers that spread each counter over the 64-bit word before mixing.
_STRIDES = [_signed64(s) for s in (0xD6E8FEB86659FD93, 0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3)]


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; mask to make it logical.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shift_right(x, 30)
    x = x * _MIX1
    x = x ^ _shift_right(x, 27)
    x = x * _MIX2
    return x ^ _shift_right(x, 31)


def counter_hash(seed: torch.Tensor, *counters: torch.Tensor) -> torch.Tensor:
    """64-bit hash of (seed, counters...); counters broadcast against each other."""
    assert len(counters) <= len(_STRIDES)
    x = _mix64(seed.to(torch.int64) + _GOLDEN)
    for stride, counter in zip(_STRIDES, counters):
        x = _mix64(x + counter.to(torch.int64) * stride)
    return x


def counter_uniform(seed: torch.Tensor, *counters: torch.Tensor) -> torch.Tensor:
    """Uniform floats in (0, 1), 24 random bits each."""
    top = _shift_right(counter_hash(seed, *counters), 40)
    return (top.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def counter_randint(seed: torch.Tensor, high: int, *counters: torch.Tensor) -> torch.Tensor:
    """Integers in [0, high); the modulo bias is below 2**-40 for any realistic high."""
    return _shift_right(counter_hash(seed, *counters), 1) % high


# ---------------------------------------------------------------------------------------------
# Lookup


def _block_width(num_pairs: int) -> Optional[int]:
    """Width of the blocks of a two-level row argmax (None: plain argmax). Rows narrower than 32
    keep amax from vectorizing; measured on AVX-512, 32 is best up to 2048 pairs, 64 above."""
    for block in ((32, 64) if num_pairs <= 2048 else (64, 128, 32)):
        if num_pairs % block == 0 and num_pairs // block >= 2:
            return block
    return None


def best_in_rows(scores_nj: torch.Tensor, largest: bool = True):
    """(values [n], indices [n]) of the max (or min) of every row, the first one on ties.

    Two levels (amax over blocks of pairs, argmax over the block maxima, argmax inside the winning
    block): torch's argmax along a row is several times slower than the GEMM that made the scores.
    """
    num_rows, num_pairs = scores_nj.shape
    block = _block_width(num_pairs)
    if block is None:
        return scores_nj.max(-1) if largest else scores_nj.min(-1)
    blocks = scores_nj.view(num_rows, num_pairs // block, block)
    block_best = blocks.amax(2) if largest else blocks.amin(2)
    winner = block_best.argmax(1) if largest else block_best.argmin(1)
    rows = torch.arange(num_rows, device=scores_nj.device)
    inner = blocks[rows, winner]
    return block_best[rows, winner], winner * block + (inner.argmax(1) if largest else inner.argmin(1))


def _chunk_sizes(num_codebooks: int, num_queries: int, num_pairs: int, chunk_elements: int):
    queries_per_chunk = max(1, min(num_queries, chunk_elements // max(num_pairs, 1)))
    codebooks_per_chunk = max(1, min(num_codebooks, chunk_elements // (queries_per_chunk * max(num_pairs, 1))))
    return codebooks_per_chunk, queries_per_chunk


# Top-t lookups up to this t run in the native kernel (insertion into a per-query list); larger
# ones by GEMM + torch.topk.
NATIVE_TOPK_MAX = 32


def _native_for(queries_cik: torch.Tensor, keys_cjk: torch.Tensor):
    """The native kernels where they apply to these tensors (float32 on the CPU), else None."""
    if queries_cik.device.type != "cpu" or queries_cik.dtype != torch.float32 or keys_cjk.dtype != torch.float32:
        return None
    return native_kernels()


def nearest_keys(
    queries_cik: torch.Tensor,
    keys_cjk: torch.Tensor,
    *,
    topk: int = 1,
    temperature: float = 0.0,
    excluded_cj: Optional[torch.Tensor] = None,
    noise_seed: Optional[torch.Tensor] = None,
    codebook_ids: Optional[torch.Tensor] = None,
    query_ids: Optional[torch.Tensor] = None,
    chunk_elements: Optional[int] = None,
):
    """Indices [c, i, t] of the t best keys per query, best first, and their scores -||query - key||^2.

    On the CPU (float32, temperature 0, t <= NATIVE_TOPK_MAX) the fused kernel of kvb_dist.native
    computes distances and keeps the best in registers, never writing [c, i, j] scores; ties go to
    the smaller index. Elsewhere it works by GEMM in chunks of chunk_elements scores (default: by
    device, see default_chunk_elements) so that [c, i, j] never exists for the whole batch. With
    temperature > 0 the choice is Gumbel-max sampling on scores / temperature; the noise for
    (codebook, query, pair) comes from `counter_uniform(noise_seed, codebook_ids, query_ids, pair)`.
    Excluded pairs are never fetched.
    """
    num_codebooks, num_queries, _ = queries_cik.shape
    device = queries_cik.device
    if num_queries == 0 or num_codebooks == 0:
        return (torch.empty(num_codebooks, num_queries, topk, dtype=torch.long, device=device),
                torch.empty(num_codebooks, num_queries, topk, dtype=torch.float32, device=device))
    native = _native_for(queries_cik, keys_cjk)
    if native is not None and temperature == 0 and (topk == 1 or (topk <= NATIVE_TOPK_MAX and excluded_cj is None)):
        queries = queries_cik if queries_cik.stride(-1) == 1 else queries_cik.contiguous()
        excluded = None if excluded_cj is None else excluded_cj.contiguous()
        indices, distances = native.nearest_keys(
            queries, keys_cjk.contiguous(), excluded, topk, threads=torch.get_num_threads()
        )
        return indices, distances.neg_()
    key_sq_cj = torch.einsum("cjk,cjk->cj", keys_cjk, keys_cjk)
    return _nearest_keys_by_gemm(
        queries_cik, keys_cjk, key_sq_cj, topk, temperature, excluded_cj, noise_seed, codebook_ids, query_ids,
        chunk_elements or default_chunk_elements(device),
    )


def _nearest_keys_by_gemm(queries_cik, keys_cjk, key_sq_cj, topk, temperature, excluded_cj, noise_seed,
                          codebook_ids, query_ids, chunk_elements):
    num_codebooks, num_queries, _ = queries_cik.shape
    num_pairs = keys_cjk.shape[1]
    device = queries_cik.device
    indices = torch.empty(num_codebooks, num_queries, topk, dtype=torch.long, device=device)
    scores = torch.empty(num_codebooks, num_queries, topk, dtype=torch.float32, device=device)
    if temperature > 0:
        assert noise_seed is not None and codebook_ids is not None and query_ids is not None
        pair_ids = torch.arange(num_pairs, device=device)
    keys_ckj = keys_cjk.transpose(1, 2)
    cb, qb = _chunk_sizes(num_codebooks, num_queries, num_pairs, chunk_elements)
    # One scores buffer for all chunks: a fresh allocation per chunk costs page faults.
    buffer = queries_cik.new_empty(cb * qb * num_pairs)
    for c0 in range(0, num_codebooks, cb):
        c1 = min(c0 + cb, num_codebooks)
        for i0 in range(0, num_queries, qb):
            i1 = min(i0 + qb, num_queries)
            q = queries_cik[c0:c1, i0:i1]
            partial = buffer[: (c1 - c0) * (i1 - i0) * num_pairs].view(c1 - c0, i1 - i0, num_pairs)
            # 2 q.key - |key|^2: the query's own |q|^2 does not change the ranking.
            torch.baddbmm(key_sq_cj[c0:c1, None, :], q, keys_ckj[c0:c1], beta=-1, alpha=2, out=partial)
            if excluded_cj is not None:
                partial.masked_fill_(excluded_cj[c0:c1, None, :], float("-inf"))
            ranking = partial
            if temperature > 0:
                uniform = counter_uniform(
                    noise_seed, codebook_ids[c0:c1, None, None], query_ids[None, i0:i1, None], pair_ids
                )
                ranking = partial / temperature - torch.log(-torch.log(uniform))
            if topk == 1 and temperature == 0:
                best, chosen = best_in_rows(partial.view(-1, num_pairs))
                best, chosen = best.view(c1 - c0, i1 - i0, 1), chosen.view(c1 - c0, i1 - i0, 1)
            else:
                chosen = ranking.topk(topk, dim=-1).indices if topk > 1 else ranking.argmax(-1, keepdim=True)
                best = partial.gather(-1, chosen)
            indices[c0:c1, i0:i1] = chosen
            scores[c0:c1, i0:i1] = best - torch.einsum("cik,cik->ci", q, q)[..., None]
    return indices, scores


# ---------------------------------------------------------------------------------------------
# Statistics and EMA


def pair_counts(indices_cit: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """counts[c, j]: how many times pair j of codebook c appears in indices."""
    num_codebooks = indices_cit.shape[0]
    offsets = torch.arange(num_codebooks, device=indices_cit.device) * num_pairs
    flat = (indices_cit + offsets.view(-1, *[1] * (indices_cit.ndim - 1))).reshape(-1)
    counts = torch.bincount(flat, minlength=num_codebooks * num_pairs)
    return counts.view(num_codebooks, num_pairs).to(torch.float32)


def assignment_statistics(queries_cik: torch.Tensor, indices_ci: torch.Tensor, num_pairs: int):
    """Per-pair counts [c, j] and sums of the assigned queries [c, j, k] (no one-hot matrices)."""
    num_codebooks, _, dim = queries_cik.shape
    offsets = torch.arange(num_codebooks, device=queries_cik.device)[:, None] * num_pairs
    flat = (indices_ci + offsets).reshape(-1)
    sums = torch.zeros(num_codebooks * num_pairs, dim, dtype=torch.float32, device=queries_cik.device)
    sums.index_add_(0, flat, queries_cik.reshape(-1, dim))
    return pair_counts(indices_ci, num_pairs), sums.view(num_codebooks, num_pairs, dim)


def scatter_statistics(ids: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, num_codebooks: int, num_pairs: int):
    """Dense counts [c, j] and sums [c, j, k] from rows (flat pair ids into c * j); rows of a repeated id add up in order."""
    dense_counts = torch.zeros(num_codebooks * num_pairs, dtype=torch.float32, device=sums.device)
    dense_sums = torch.zeros(num_codebooks * num_pairs, sums.shape[-1], dtype=torch.float32, device=sums.device)
    dense_counts.index_add_(0, ids, counts)
    dense_sums.index_add_(0, ids, sums)
    return dense_counts.view(num_codebooks, num_pairs), dense_sums.view(num_codebooks, num_pairs, sums.shape[-1])


def smoothed_cluster_size(cluster_size_cj: torch.Tensor, eps: float) -> torch.Tensor:
    """Laplace-smoothed cluster sizes, rescaled to the total: never zero, sums to the total."""
    num_pairs = cluster_size_cj.shape[-1]
    total = cluster_size_cj.sum(-1, keepdim=True)
    return (cluster_size_cj + eps) / (total + num_pairs * eps) * total


def ema_update_(
    keys_cjk: torch.Tensor,
    keys_avg_cjk: torch.Tensor,
    cluster_size_cj: torch.Tensor,
    counts_cj: torch.Tensor,
    sums_cjk: torch.Tensor,
    decay: float,
    eps: float,
) -> None:
    """cluster_size <- EMA(counts), keys_avg <- EMA(sums), keys = keys_avg / smoothed(cluster_size)."""
    cluster_size_cj.mul_(decay).add_(counts_cj, alpha=1 - decay)
    keys_avg_cjk.mul_(decay).add_(sums_cjk, alpha=1 - decay)
    torch.div(keys_avg_cjk, smoothed_cluster_size(cluster_size_cj, eps)[..., None], out=keys_cjk)


def ema_step_(
    keys_cjk: torch.Tensor,
    keys_avg_cjk: torch.Tensor,
    cluster_size_cj: torch.Tensor,
    queries_ick: torch.Tensor,
    indices_ic: torch.Tensor,
    decay: float,
    eps: float,
    threshold: float,
    replace_seed: torch.Tensor,
    first_codebook: int,
) -> torch.Tensor:
    """The EMA step of these codebooks in place; the number of pairs replaced (a 0-dim tensor).

    queries_ick [i, c, k]: the global batch's heads for these codebooks, indices_ic [i, c]: the
    pair each chose. ema_update_ with their counts and sums (a pair's queries added in batch
    order: any split of the batch, gathered in order, gives the same keys bit for bit), then
    dead-pair replacement: every pair with cluster_size < threshold (if threshold > 0 and the batch is not empty) takes the
    head of query `counter_randint(replace_seed, i, codebook id, pair)` and restarts as if
    `threshold` queries equal to its new key had chosen it (keys_avg = key x threshold), so the
    next EMA step does not pull it back.

    On the CPU the native kernel does all of it in one pass over each codebook's state;
    elsewhere torch does, without host syncs (the replacement is a masked select over all
    pairs, so a GPU never waits for a count of dead pairs).
    """
    num_codebooks, num_pairs, dim = keys_cjk.shape
    num_queries = queries_ick.shape[0]
    native = _native_for(queries_ick, keys_cjk)
    if native is not None and all(t.is_contiguous() for t in (keys_cjk, keys_avg_cjk, cluster_size_cj)):
        queries = queries_ick if queries_ick.stride(-1) == 1 else queries_ick.contiguous()
        replaced = native.ema_step_(
            keys_cjk, keys_avg_cjk, cluster_size_cj, queries, indices_ic, decay, eps, threshold,
            int(replace_seed), first_codebook, threads=torch.get_num_threads(),
        )
        return torch.tensor(replaced)
    codebooks = torch.arange(num_codebooks, device=keys_cjk.device)
    flat_ids = (indices_ic + codebooks * num_pairs).transpose(0, 1).reshape(-1)  # codebook-major, batch order
    counts, sums = scatter_statistics(
        flat_ids, torch.ones(flat_ids.shape, device=keys_cjk.device), queries_ick.transpose(0, 1).reshape(-1, dim),
        num_codebooks, num_pairs,
    )
    ema_update_(keys_cjk, keys_avg_cjk, cluster_size_cj, counts, sums, decay, eps)
    if threshold <= 0 or num_queries == 0:  # no heads to take: dead pairs stay
        return torch.zeros((), dtype=torch.int64, device=keys_cjk.device)
    dead_cj = cluster_size_cj < threshold
    wanted_cj = counter_randint(
        replace_seed, num_queries, codebooks[:, None] + first_codebook, torch.arange(num_pairs, device=keys_cjk.device)
    )
    new_keys_cjk = queries_ick[wanted_cj, codebooks[:, None]]
    keys_cjk.copy_(torch.where(dead_cj[..., None], new_keys_cjk, keys_cjk))
    keys_avg_cjk.copy_(torch.where(dead_cj[..., None], new_keys_cjk * threshold, keys_avg_cjk))
    cluster_size_cj.masked_fill_(dead_cj, threshold)
    return dead_cj.sum()


def nearest_keys_and_ema_step_(
    queries_cik: torch.Tensor,
    keys_cjk: torch.Tensor,
    keys_avg_cjk: torch.Tensor,
    cluster_size_cj: torch.Tensor,
    decay: float,
    eps: float,
    threshold: float,
    replace_seed: torch.Tensor,
    first_codebook: int,
):
    """nearest_keys (top-1) and then ema_step_ with the pairs found, where queries_cik [c, i, k] are
    the whole global batch of these codebooks: (indices [c, i, 1], pairs replaced), the results of
    the two calls bit for bit.

    On the CPU the native kernel does both codebook by codebook: the EMA then writes keys that the
    lookup has just brought into the cache, instead of a second stream over all of them.
    """
    native = _native_for(queries_cik, keys_cjk)
    if native is not None and all(t.is_contiguous() for t in (keys_cjk, keys_avg_cjk, cluster_size_cj)):
        queries = queries_cik if queries_cik.stride(-1) == 1 else queries_cik.contiguous()
        indices, _, replaced = native.lookup_and_ema_step_(
            queries, keys_cjk, keys_avg_cjk, cluster_size_cj, decay, eps, threshold, int(replace_seed),
            first_codebook, threads=torch.get_num_threads(),
        )
        return indices, torch.tensor(replaced)
    indices, _ = nearest_keys(queries_cik, keys_cjk)
    replaced = ema_step_(
        keys_cjk, keys_avg_cjk, cluster_size_cj, queries_cik.transpose(0, 1), indices[..., 0].transpose(0, 1),
        decay, eps, threshold, replace_seed, first_codebook,
    )
    return indices, replaced


def rows_by_query_id(
    queries_cik: torch.Tensor, first_query_id: int, codebook_index_n: torch.Tensor, query_id_n: torch.Tensor
) -> torch.Tensor:
    """Rows [n, k] picked by (codebook, global query id); zero where this slice does not hold the id.

    Queries held here carry the ids first_query_id .. first_query_id + i - 1. Summing the result
    over all holders (the caller's reduce_sum) yields the wanted rows exactly.
    """
    num_queries = queries_cik.shape[1]
    local = query_id_n - first_query_id
    held = (local >= 0) & (local < num_queries)
    rows = queries_cik[codebook_index_n, local.clamp(0, max(num_queries - 1, 0))] if num_queries else (
        queries_cik.new_zeros(codebook_index_n.shape[0], queries_cik.shape[2])
    )
    return rows * held[:, None].to(rows.dtype)
