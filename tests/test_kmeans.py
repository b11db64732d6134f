"""Streaming distributed k-means: pure pieces against naive references, one process against
reference Lloyd, and 2 / 3 gloo ranks over split shards against one process over all of them."""

from __future__ import annotations

import gc
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from kvb_dist.distributed.spawn import run_ranks
from kvb_dist.core import KeyValueBottleneck
from kvb_dist.codebook import smoothed_cluster_size
from kvb_dist.data import ShardStream, write_arrays
from kvb_dist import kmeans as kmeans_module
from kvb_dist.native import build as native
from kvb_dist.kmeans import (
    ChunkHeads,
    accumulate_assignments_,
    InMemoryBatches,
    heads_to_queries,
    kmeans_plus_plus,
    kth_smallest_global,
    lloyd_,
    nearest_means,
    query_priorities,
    split_empty_clusters_,
    streaming_kmeans,
)
from kvb_dist.data.stream import kmeans_from_stream

NUM_CODEBOOKS, DIM, PAIRS = 5, 2, 6  # 5 codebooks: no layout of 2 or 3 shards divides them evenly


def blobs(num: int, num_codebooks: int = NUM_CODEBOOKS, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    """Features [num, C * dim]: per codebook, points around 8 well separated centres, so that
    assignments have no near-ties and float summation order cannot flip them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_codebooks, 8, dim, generator=g) * 10
    which = torch.randint(0, 8, (num, num_codebooks), generator=g)
    points = centres[torch.arange(num_codebooks), which] + 0.3 * torch.randn(num, num_codebooks, dim, generator=g)
    return points.reshape(num, num_codebooks * dim)


def reference_lloyd(samples_cnk: torch.Tensor, means_cjk: torch.Tensor, num_iters: int):
    """Textbook Lloyd in float64 with dense distances (empty clusters keep their mean)."""
    means = means_cjk.double().clone()
    x = samples_cnk.double()
    sse = []
    for _ in range(num_iters):
        distances = torch.cdist(x, means).pow(2)
        nearest = distances.argmin(-1)
        sse.append(float(distances.min(-1).values.sum()))
        one_hot = torch.nn.functional.one_hot(nearest, means.shape[1]).double()
        counts = one_hot.sum(1)
        sums = one_hot.transpose(1, 2) @ x
        means = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], means)
    return means.float(), counts.float(), sse


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_query_layout_and_priorities_do_not_depend_on_batching():
    heads = torch.randn(4, 3, 2, 5, 7)  # [b, c, *spatial, k]
    queries = heads_to_queries(heads)
    assert queries.shape == (3, 4 * 10, 7)
    assert torch.equal(queries[1, 2 * 10 + 7], heads[2, 1].reshape(10, 7)[7])  # query = sample * n + position
    ids = torch.tensor([5, 17, 3, 99])
    together = query_priorities(1, ids, 10)
    apart = torch.cat([query_priorities(1, ids[:1], 10), query_priorities(1, ids[1:], 10)])
    assert torch.equal(together, apart) and int(together.min()) >= 0 and int(together.max()) < 2**62
    assert not torch.equal(together, query_priorities(2, ids, 10))


class ThreadSum:
    """An all-reduce (SUM) among threads: stands in for ranks inside one process."""

    def __init__(self, num_threads: int):
        self.barrier = threading.Barrier(num_threads)
        self.parts, self.lock = [], threading.Lock()

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.parts.append(tensor.clone())
        self.barrier.wait()
        total = torch.stack(self.parts).sum(0)
        if self.barrier.wait() == 0:
            self.parts.clear()
        self.barrier.wait()
        return total


def test_kth_smallest_global_against_sort():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 2**62, (1000,), generator=g)
    values[:10] = values[10]  # ties
    calls = []
    for k in (1, 2, 11, 500, 1000):
        assert kth_smallest_global(values, k, lambda t: calls.append(1) or t) == int(values.sort().values[k - 1])
    assert len(calls) <= 5 * 16  # a 16-way search: a few small all-reduces each
    # Three "ranks" holding uneven parts (one holds nothing) agree on the global answer.
    parts = [values[:700], values[700:], values[:0]]
    reduce_sum, answers = ThreadSum(3), [None] * 3

    def rank(r):
        answers[r] = kth_smallest_global(parts[r].sort().values[:321], 321, reduce_sum)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    intra_op_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # three Python threads in OpenMP regions at once crawl on few cores
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        torch.set_num_threads(intra_op_threads)
    assert answers == [int(values.sort().values[320])] * 3


def test_split_empty_clusters_faiss_style():
    means = torch.arange(4 * 5 * 3, dtype=torch.float32).view(4, 5, 3) + 1
    counts = torch.tensor([[10.0, 0, 3, 1, 1], [5, 5, 5, 5, 5], [1, 1, 0, 1, 1], [0, 0, 0, 0, 8]])
    original_means, original_counts = means.clone(), counts.clone()
    num = split_empty_clusters_(means, counts, seed=3, iteration=2)
    assert num == 1 + 0 + 0 + 4  # codebook 2 has no cluster with more than one member: nothing to split
    assert torch.equal(counts.sum(1), original_counts.sum(1))  # counts are split, not invented
    assert not bool((counts[[0, 1, 3]] == 0).any()) and counts[2, 2] == 0
    assert torch.equal(means[1:3], original_means[1:3])
    # Codebook 0: the empty cluster holds a copy of a donor with more than one member (0 or 2),
    # perturbed by +-1/1024 per dimension with alternating signs; the donor moved the other way
    # and gave half its count.
    sign = torch.tensor([1.0, -1.0, 1.0])
    donors = [d for d in (0, 2) if torch.allclose(means[0, 1] / original_means[0, d], 1 + sign / 1024, atol=1e-6)]
    assert len(donors) == 1
    donor = donors[0]
    assert torch.allclose(means[0, donor] / original_means[0, donor], 1 - sign / 1024, atol=1e-6)
    assert counts[0, 1] == counts[0, donor] == original_counts[0, donor] / 2
    # Codebook 3: four splits out of one cluster of 8 and then of its halves: all distinct.
    assert means[3].unique(dim=0).shape[0] == 5
    # Deterministic, and a codebook decides alone: splitting a slice gives the same as the whole.
    again_means, again_counts = original_means.clone(), original_counts.clone()
    split_empty_clusters_(again_means, again_counts, seed=3, iteration=2)
    assert torch.equal(again_means, means) and torch.equal(again_counts, counts)
    part_means, part_counts = original_means[2:].clone(), original_counts[2:].clone()
    split_empty_clusters_(part_means, part_counts, seed=3, iteration=2, first_codebook=2)
    assert torch.equal(part_means, means[2:]) and torch.equal(part_counts, counts[2:])


def test_kmeans_plus_plus_picks_distinct_data_points_deterministically():
    samples = torch.cat([torch.randn(5, 40, 3), torch.randn(5, 40, 3) + 50], dim=1)
    means = kmeans_plus_plus(samples, 6, seed=1)
    for c in range(5):
        assert all(bool((samples[c] == m).all(-1).any()) for m in means[c])  # every mean is a sample
        assert means[c].unique(dim=0).shape[0] == 6
        assert bool((means[c, :, 0] > 25).any()) and bool((means[c, :, 0] < 25).any())  # both blobs seeded
    assert torch.equal(kmeans_plus_plus(samples[3:], 6, seed=1, first_codebook=3), means[3:])
    with pytest.raises(ValueError, match="at least 100"):
        kmeans_plus_plus(samples, 100, seed=1)


@pytest.fixture(params=["fused", "gemm"])
def assignment_kernel(request, monkeypatch):
    """Runs a test with the fused C kernel of kvb_dist.native and with the GEMM + argmin fallback."""
    if request.param == "gemm":
        monkeypatch.setattr(kmeans_module, "fused_nearest_means", lambda: None)
    else:
        assert kmeans_module.fused_nearest_means() is not None, "the fused kernel did not build (C compiler?)"
    return request.param


def test_nearest_means_matches_brute_force_and_breaks_ties_like_argmin(assignment_kernel):
    g = torch.Generator().manual_seed(0)
    for num_pairs in (5, 64, 96, 256, 4096):
        queries = torch.randn(3, 301, 4, generator=g)
        means = torch.randn(3, num_pairs, 4, generator=g)
        means[:, num_pairs - 1] = means[:, 1]  # an exact duplicate: argmin semantics pick index 1
        exact = torch.cdist(queries.double(), means.double()).pow(2)
        for pool in (None, ThreadPoolExecutor(2)):
            indices, distances = nearest_means(queries, means, chunk_elements=4096, pool=pool)
            chosen = exact.gather(-1, indices[..., None])[..., 0]
            assert torch.allclose(chosen, exact.min(-1).values, atol=1e-4)  # a nearest mean (float ties aside)
            assert torch.allclose(distances.double(), chosen, atol=1e-4)
            assert not bool((indices == num_pairs - 1).any())
        assert torch.equal(indices, nearest_means(queries, means)[0])  # chunking does not matter


def test_accumulated_statistics_match_brute_force(assignment_kernel):
    """Counts, sums and SSE of one Lloyd step, from strided queries (as heads_to_queries gives
    them, and with a strided last dim), with and without threads, added onto what the
    accumulators held."""
    g = torch.Generator().manual_seed(1)
    num_codebooks, num_pairs, dim = 3, 40, 16
    queries = heads_to_queries(torch.randn(997, num_codebooks, dim, generator=g))
    assert not queries.is_contiguous()
    means = torch.randn(num_codebooks, num_pairs, dim, generator=g)
    exact = torch.cdist(queries.double(), means.double()).pow(2)
    nearest = exact.argmin(-1)
    one_hot = torch.nn.functional.one_hot(nearest, num_pairs).double()
    expected_counts, expected_sums = one_hot.sum(1), one_hot.transpose(1, 2) @ queries.double()
    expected_sse = exact.min(-1).values.sum(-1)
    strided_dim = queries.mT.contiguous().mT
    for pool, rows in itertools.product((None, ThreadPoolExecutor(2)), (queries, strided_dim)):
        counts = torch.ones(num_codebooks, num_pairs, dtype=torch.float64)
        sums = torch.ones(num_codebooks, num_pairs, dim, dtype=torch.float64)
        sse = torch.ones(num_codebooks, dtype=torch.float64)
        accumulate_assignments_(rows, means, counts, sums, sse, chunk_elements=4096, pool=pool)
        assert torch.equal(counts, expected_counts + 1)
        assert torch.allclose(sums, expected_sums + 1, atol=1e-4)
        assert torch.allclose(sse, expected_sse + 1, rtol=1e-5)


def test_fused_kernel_falls_back_without_a_compiler(monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(RuntimeError, match="nonexistent"):
        native.build()
    monkeypatch.setattr(native, "_loaded", {})  # as in a fresh process
    with caplog.at_level("WARNING", logger="kvb_dist.native.build"):
        assert native.fused_nearest_means() is None
    # A warning that names the build failure (its wording belongs to kvb_dist.native.build).
    assert any(r.levelname == "WARNING" and "nonexistent" in r.getMessage() for r in caplog.records)
    # k-means still runs, on the fallback.
    x = blobs(64)
    result = streaming_kmeans(InMemoryBatches(x, 16), PAIRS, to_heads=ChunkHeads(NUM_CODEBOOKS), num_iters=2,
                              max_points_per_centroid=None)
    assert torch.isfinite(result.means).all() and len(result.sse_history) == 2


def test_assignment_chunks_follow_the_device(monkeypatch):
    """CPU: cache-sized chunks (ASSIGN_CHUNK_ELEMENTS); GPU: a sixteenth of the free memory, within
    [1 << 22, 1 << 30] distances (4096+ queries per GEMM at J = 65536 instead of 16); and
    streaming_kmeans takes its default from there."""
    assert kmeans_module.assign_chunk_elements(torch.device("cpu")) == kmeans_module.ASSIGN_CHUNK_ELEMENTS
    free = {"bytes": 80 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 141 << 30))
    assert kmeans_module.assign_chunk_elements(torch.device("cuda", 0)) == 1 << 30
    free["bytes"] = 4 << 30
    assert kmeans_module.assign_chunk_elements("cuda") == (4 << 30) // 64
    free["bytes"] = 1 << 20
    assert kmeans_module.assign_chunk_elements("cuda") == 1 << 22
    asked, used = [], []
    monkeypatch.setattr(kmeans_module, "assign_chunk_elements", lambda device: asked.append(device) or 1234)
    real = kmeans_module.accumulate_assignments_
    monkeypatch.setattr(kmeans_module, "accumulate_assignments_",
                        lambda *args: used.append(args[5]) or real(*args))
    streaming_kmeans(InMemoryBatches(blobs(64), 32), PAIRS, to_heads=ChunkHeads(NUM_CODEBOOKS), num_iters=1)
    assert asked == [torch.device("cpu")] and used and set(used) == {1234}
    with pytest.raises(ValueError, match="chunk_elements"):
        streaming_kmeans(InMemoryBatches(blobs(64), 32), PAIRS, to_heads=ChunkHeads(NUM_CODEBOOKS), chunk_elements=0)


# ---------------------------------------------------------------------------------------------
# One process


def test_streaming_kmeans_matches_reference_lloyd_and_any_batching(assignment_kernel):
    x = blobs(300)
    samples = heads_to_queries(ChunkHeads(NUM_CODEBOOKS)(x))
    init = samples[:, 10 : 10 + PAIRS].clone()
    expected_means, expected_counts, expected_sse = reference_lloyd(samples, init, 5)
    for batch_size in (300, 37):
        result = streaming_kmeans(InMemoryBatches(x, batch_size), PAIRS, to_heads=ChunkHeads(NUM_CODEBOOKS),
                                  num_iters=5, init_means=init, max_points_per_centroid=None, split_empty=False)
        assert torch.allclose(result.means, expected_means, atol=1e-5)
        assert torch.equal(result.counts, expected_counts)
        assert np.allclose(result.sse_history, expected_sse, rtol=1e-5)
        assert result.num_training_queries == 300 and len(result.iteration_seconds) == 5
    # The bottleneck's in-memory lloyd_ agrees as well.
    means = init.clone()
    lloyd_(samples, means, 5)
    assert torch.allclose(means, expected_means, atol=1e-5)


def test_sample_cap_init_and_early_stop():
    x = blobs(500)
    result = streaming_kmeans(InMemoryBatches(x, 64), PAIRS, to_heads=ChunkHeads(NUM_CODEBOOKS),
                              num_iters=6, max_points_per_centroid=20, keep_initial_means=True)
    assert streaming_kmeans(InMemoryBatches(x, 64), PAIRS, to_heads=ChunkHeads(NUM_CODEBOOKS), num_iters=1,
                            max_points_per_centroid=20).initial_means is None  # by default: no copy of the means
    cap = 20 * PAIRS
    assert result.num_queries == 500 and result.num_training_queries == cap
    assert torch.equal(result.counts.sum(1), torch.full((NUM_CODEBOOKS,), float(cap)))
    # The initial means are the queries of the smallest priorities: real samples of the training set.
    samples = heads_to_queries(ChunkHeads(NUM_CODEBOOKS)(x))
    order = query_priorities(0, torch.arange(500), 1).argsort()
    assert torch.equal(result.initial_means, samples[:, order[:PAIRS]])
    # Reference Lloyd on exactly the capped subset gives the same means.
    expected, _, sse = reference_lloyd(samples[:, order[:cap]], result.initial_means, 6)
    assert torch.allclose(result.means, expected, atol=1e-5) and np.allclose(result.sse_history, sse, rtol=1e-5)
    # Another batching and another id offset of the same ids: the same run.
    again = streaming_kmeans(InMemoryBatches(x, 500), PAIRS, to_heads=ChunkHeads(NUM_CODEBOOKS),
                             num_iters=6, max_points_per_centroid=20)
    assert torch.allclose(again.means, result.means, atol=1e-5)
    stopped = streaming_kmeans(InMemoryBatches(x, 64), PAIRS, to_heads=ChunkHeads(NUM_CODEBOOKS), num_iters=50, tol=1e-4)
    assert len(stopped.sse_history) < 50
    assert all(a >= b - 1e-3 * a for a, b in zip(stopped.sse_history, stopped.sse_history[1:]))


def test_empty_clusters_are_split_during_kmeans():
    x = blobs(200, num_codebooks=2)
    samples = heads_to_queries(ChunkHeads(2)(x))
    init = samples[:, :PAIRS].clone()
    init[:, 2:] = 1e4  # four centroids far away: they get no point in the first assignment
    kept = streaming_kmeans(InMemoryBatches(x, 50), PAIRS, to_heads=ChunkHeads(2), num_iters=4, init_means=init,
                            max_points_per_centroid=None, split_empty=False)
    split = streaming_kmeans(InMemoryBatches(x, 50), PAIRS, to_heads=ChunkHeads(2), num_iters=4, init_means=init,
                             max_points_per_centroid=None)
    assert bool((kept.counts == 0).any()) and bool((kept.means == 1e4).any())  # left dead
    assert split.num_split >= 8 and bool((split.counts > 0).all())
    assert split.sse_history[-1] < 0.8 * kept.sse_history[-1]


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="at least 6 samples"):
        streaming_kmeans(InMemoryBatches(torch.randn(5, 1, 2), 2), PAIRS)
    bad = torch.randn(20, 1, 2)
    bad[13, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="sample id 13"):
        streaming_kmeans(InMemoryBatches(bad, 8), 4)
    with pytest.raises(ValueError, match="sample id 13"):  # no sampling pass: the first Lloyd pass checks
        streaming_kmeans(InMemoryBatches(bad, 8), 4, init_means=torch.zeros(1, 4, 2), max_points_per_centroid=None)
    with pytest.raises(ValueError, match="duplicate"):
        streaming_kmeans(InMemoryBatches(torch.randn(20, 1, 2), 8, ids=torch.zeros(20, dtype=torch.long)), 4)
    with pytest.raises(ValueError, match="init must be"):
        streaming_kmeans(InMemoryBatches(torch.randn(20, 1, 2), 8), 4, init="kmeans+")


def test_result_goes_into_the_bottleneck_with_consistent_ema_state():
    x = blobs(200)
    result = streaming_kmeans(InMemoryBatches(x, 64), PAIRS, to_heads=ChunkHeads(NUM_CODEBOOKS), num_iters=3,
                              init="kmeans++")
    bottleneck = KeyValueBottleneck(NUM_CODEBOOKS, PAIRS, DIM, 4, seed=0)
    result.install_(bottleneck)
    assert torch.equal(bottleneck.keys, result.means) and torch.equal(bottleneck.cluster_size, result.counts)
    derived = bottleneck.keys_avg / smoothed_cluster_size(bottleneck.cluster_size, bottleneck.eps)[..., None]
    assert torch.allclose(derived, result.means, atol=1e-5)
    # An EMA step on the data the keys were fitted on barely moves them (no collapse to zero).
    bottleneck(ChunkHeads(NUM_CODEBOOKS)(x))
    assert torch.allclose(bottleneck.keys, result.means, atol=0.5)
    with pytest.raises(ValueError, match="same layout"):
        result.install_(KeyValueBottleneck(NUM_CODEBOOKS, PAIRS + 1, DIM, 4, seed=0))


# ---------------------------------------------------------------------------------------------
# Ranks (gloo): split shards give what one process gives on all of them


def far_init() -> torch.Tensor:
    """Initial means [C, J, k] with four of six far from all data: empty clusters get split."""
    means = blobs(PAIRS, seed=1).view(PAIRS, NUM_CODEBOOKS, DIM).transpose(0, 1).clone()
    means[:, 2:] = 1e3
    return means


KMEANS_RUNS = {
    # name: streaming_kmeans arguments; the cap is active (20 x 6 < 260 queries per codebook)
    "random": dict(num_iters=4, max_points_per_centroid=20),
    "kmeans++": dict(num_iters=3, init="kmeans++", kmeanspp_sample_factor=3),
    "split": dict(num_iters=3, init_means=far_init(), max_points_per_centroid=None),
}


def run_kmeans(folder, layout, rank, world_size, batch_size, **args):
    stream = ShardStream(folder, batch_size=batch_size, rank=rank, world_size=world_size, seed=4)
    return kmeans_from_stream(stream, PAIRS, layout, to_heads=ChunkHeads(NUM_CODEBOOKS), seed=9,
                              keep_initial_means=True, **args)


# Sampling-pass memory probe: a rank's share of codebooks fixed, the number of codebooks it does
# not hold varied. The sample of one rank's codebooks is 4 x 8192 x 64 floats = 8 MiB.
PROBE = dict(codebooks_per_rank=4, dim=64, sample=8192, samples_per_rank=8192, batch=128)


def probe_data(rank, num_codebooks):
    """This rank's batches of random heads, made per batch (see kvb_dist.bench.scale.RandomHeads)."""
    from kvb_dist.bench.scale import RandomHeads

    per_rank = PROBE["samples_per_rank"]
    return RandomHeads(per_rank, num_codebooks, PROBE["dim"], PROBE["batch"], first_id=rank * per_rank)


def sampling_memory_probe(layout, rank, num_codebooks):
    """(shape of the sample this rank holds, its bytes, growth of this process's peak RSS during
    the sampling pass and merge, the codebook range held)."""
    from kvb_dist.bench.core import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    data = probe_data(rank, num_codebooks)
    gc.collect()
    measured = reset_peak_rss()
    before = current_rss_bytes()
    plan = kmeans_module._sampling_plan(data, kmeans_module._identity, layout, 3, PROBE["sample"], PROBE["sample"],
                                        None, torch.device("cpu"))
    grown = peak_rss_bytes() - before if measured else None
    sample = plan.sample
    return dict(shape=tuple(sample.shape), bytes=sample.numel() * sample.element_size(), grown=grown,
                range=layout.codebook_range(num_codebooks), first_rows=sample[:, :3].clone())


def kmeans_worker(rank, world_size, folder):
    from kvb_dist.distributed.layout import ParallelLayout
    from kvb_dist.distributed.sharded import ShardedKeyValueBottleneck

    layouts = {num_shards: ParallelLayout.build(num_shards) for num_shards in (1, world_size)}
    # First, while this process has allocated little: C codebooks on every rank (all replicas),
    # then world_size x C codebooks sharded over all ranks (the same C per rank).
    out = {"probe": [sampling_memory_probe(layouts[1], rank, PROBE["codebooks_per_rank"]),
                     sampling_memory_probe(layouts[world_size], rank, world_size * PROBE["codebooks_per_rank"])]}
    for num_shards in (world_size, 1):  # codebooks sharded over all ranks; all ranks replicas
        layout = layouts[num_shards]
        for name, args in KMEANS_RUNS.items():
            result = run_kmeans(folder, layout, rank, world_size, batch_size=16 + 7 * rank, **args)
            # Each rank hands its codebooks to its part of the sharded bottleneck.
            bottleneck = ShardedKeyValueBottleneck(NUM_CODEBOOKS, PAIRS, DIM, 3, layout=layout, seed=0)
            result.install_(bottleneck)
            assert torch.equal(bottleneck.keys, result.means) and torch.equal(bottleneck.cluster_size, result.counts)
            out[num_shards, name] = dict(
                means=result.means, initial=result.initial_means, counts=result.counts,
                first=result.first_codebook, sse=result.sse_history, queries=result.num_queries,
                training=result.num_training_queries, splits=result.num_split,
            )
    return out


def write_kmeans_shards(folder) -> int:
    # 260 samples in shards of 23: 12 shards, uneven over 2 and 3 ranks (and a short last shard).
    x = blobs(260, seed=1)
    write_arrays(folder, x.numpy(), np.zeros(260, dtype=np.int64), samples_per_shard=23)
    return 260


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 3])
def test_kmeans_on_ranks_equals_one_process(tmp_path, world_size):
    num = write_kmeans_shards(str(tmp_path))
    results = run_ranks(world_size, kmeans_worker, str(tmp_path), timeout=150)
    for name, args in KMEANS_RUNS.items():
        single = run_kmeans(str(tmp_path), None, 0, 1, batch_size=50, **args)
        # All ranks replicas: each holds every codebook, identical (bitwise) on all ranks.
        for r in results:
            replica = r[1, name]
            assert torch.equal(replica["initial"], results[0][1, name]["initial"])  # the shared sample
            assert torch.equal(replica["means"], results[0][1, name]["means"])
            assert replica["queries"] == num and replica["training"] == single.num_training_queries
        assert torch.equal(results[0][1, name]["initial"], single.initial_means)
        assert torch.allclose(results[0][1, name]["means"], single.means, atol=1e-5)
        assert torch.equal(results[0][1, name]["counts"], single.counts)  # nothing dropped or duplicated
        # Codebooks sharded: the ranks' slices put together are the one-process result.
        sharded = sorted((r[world_size, name] for r in results), key=lambda o: o["first"])
        assert torch.equal(torch.cat([o["initial"] for o in sharded]), single.initial_means)
        assert torch.allclose(torch.cat([o["means"] for o in sharded]), single.means, atol=1e-5)
        assert torch.equal(torch.cat([o["counts"] for o in sharded]), single.counts)
        for o in sharded:
            assert np.allclose(o["sse"], single.sse_history, rtol=1e-5)
            assert o["splits"] == single.num_split
    assert single.num_split >= 4 * NUM_CODEBOOKS  # the "split" run did split (the last one run)
    assert math.isclose(float(single.counts.sum()), NUM_CODEBOOKS * single.num_training_queries)
    check_sampling_memory(results, world_size)


def check_sampling_memory(results, world_size):
    """A rank holds the sample of its own codebooks only, [C_mine, L, k], in the merge and after
    it: its memory does not grow with the codebooks other ranks hold."""
    per_rank, length, dim = PROBE["codebooks_per_rank"], PROBE["sample"], PROBE["dim"]
    for rank, r in enumerate(results):
        replicated, sharded = r["probe"]
        assert replicated["shape"] == sharded["shape"] == (per_rank, length, dim)
        assert sharded["range"] == (rank * per_rank, (rank + 1) * per_rank)
        if replicated["grown"] is not None:  # /proc/self/clear_refs writable (Linux >= 4.0)
            # A sample of all codebooks ([C, L, k] on every rank, as before) adds (world_size - 1) x 8 MiB, twice.
            assert sharded["grown"] - replicated["grown"] < 0.5 * sharded["bytes"], (replicated, sharded)
            assert sharded["grown"] < 3 * sharded["bytes"], sharded
    # All replicas hold the same sample; its first rows are the queries of smallest priority,
    # of the owner's codebooks.
    for r in results:
        assert torch.equal(r["probe"][0]["first_rows"], results[0]["probe"][0]["first_rows"])
    ids = torch.arange(world_size * PROBE["samples_per_rank"])
    first_ids = ids[query_priorities(3, ids, 1).argsort()[:3]].tolist()
    rows = {int(i): h for rank in range(world_size) for x, batch_ids in probe_data(rank, world_size * per_rank)
            for h, i in zip(x, batch_ids) if int(i) in first_ids}
    first = torch.stack([rows[i] for i in first_ids])  # [3, C, k]
    for r in results:
        start, stop = r["probe"][1]["range"]
        assert torch.equal(r["probe"][1]["first_rows"], first[:, start:stop].transpose(0, 1))


def test_streamed_kmeans_calls_after_pass_once_per_pass(tmp_path):
    # The launcher's progress bar over a data set too large to hold: one update per Lloyd pass.
    write_kmeans_shards(str(tmp_path))
    passes = []
    result = run_kmeans(str(tmp_path), None, 0, 1, batch_size=50, num_iters=3, after_pass=lambda: passes.append(1))
    assert len(passes) == len(result.sse_history) == 3
