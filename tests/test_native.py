"""The native kernels: the fused lookup and the EMA step agree with torch (and float64 brute force),
and their build: $CC split like a shell word, a cache shared by processes and keyed by the
sources (and flags, compiler, CPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvb_dist import codebook
from kvb_dist.native import build as native

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")

LOAD = "from kvb_dist.native import build; build.build(); print('loaded')"


def test_cc_is_split_like_a_shell_word(monkeypatch):
    monkeypatch.setenv("CC", "ccache gcc -m64")
    assert native.compiler_command() == ["ccache", "gcc", "-m64"]
    monkeypatch.setenv("CC", "'/opt/my compilers/cc'")
    assert native.compiler_command() == ["/opt/my compilers/cc"]
    monkeypatch.delenv("CC")
    assert len(native.compiler_command()) == 1


@needs_compiler
def test_a_wrapper_in_cc_builds_a_working_kernel(monkeypatch, tmp_path):
    monkeypatch.setenv("KVB_DIST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", f"env {shutil.which('cc') or shutil.which('gcc')}")  # a wrapper, as ccache is
    kernel = native.build()
    queries = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    means = torch.tensor([[0.0, 0.1], [3.0, 2.9], [9.0, 9.0]])
    index, distance = torch.empty(2, dtype=torch.int64), torch.empty(2)
    kernel.nearest_means(queries, means, index, distance)
    assert index.tolist() == [0, 1]


@needs_compiler
def test_the_library_is_cached_across_processes_and_rebuilt_when_the_source_changes(monkeypatch, tmp_path):
    env = dict(os.environ, KVB_DIST_CACHE_DIR=str(tmp_path))
    env.pop("CC", None)
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == "loaded", done.stderr
    libraries = list(tmp_path.glob(f"*/{native.LIBRARY_NAME}"))
    assert len(libraries) == 1  # the second process compiled nothing
    built_at = libraries[0].stat().st_mtime_ns
    # Another process loads the same file, without writing it again.
    subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert libraries[0].stat().st_mtime_ns == built_at

    changed = tmp_path / "changed" / "fused_nearest.c"
    changed.parent.mkdir()
    changed.write_text(native.SOURCES[0].read_text() + "\n/* a change */\n")
    monkeypatch.setattr(native, "SOURCES", (changed, *native.SOURCES[1:]))
    monkeypatch.setenv("KVB_DIST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    native.build()
    assert len(list(tmp_path.glob(f"*/{native.LIBRARY_NAME}"))) == 2  # a new key, a new build
    assert not list(tmp_path.rglob(".*.tmp-*"))  # no temporary file left behind


# ---------------------------------------------------------------------------------------------
# The kernels against torch and float64 brute force

needs_kernels = pytest.mark.skipif(native.native_kernels() is None, reason="the native kernels did not build")


def brute_force_topk(queries_cik, keys_cjk, topk):
    """Float64 distances, stable sort: ties to the smaller index."""
    distances = (queries_cik.double()[:, :, None] - keys_cjk.double()[:, None]).pow(2).sum(-1)
    return torch.from_numpy(np.argsort(distances.numpy(), axis=-1, kind="stable")[..., :topk].copy()), distances


def integer_data(shape, generator):
    # Small integers: every distance is exact in float32, so ties are exact ties.
    return torch.randint(-3, 4, shape, generator=generator).float()


@needs_kernels
@pytest.mark.parametrize("num_pairs,dim,topk", [(37, 2, 1), (200, 14, 1), (33, 128, 1), (300, 16, 3), (65, 5, 32)])
@pytest.mark.parametrize("strided", [False, True])
def test_fused_lookup_equals_gemm_and_float64_brute_force(num_pairs, dim, topk, strided):
    generator = torch.Generator().manual_seed(num_pairs * dim)
    num_codebooks, num_queries = 3, 45  # neither a multiple of the kernel's blocks
    keys = integer_data((num_codebooks, num_pairs, dim), generator)
    keys[:, 7] = keys[:, 3]  # duplicate keys: exact ties between pairs 3 and 7
    if strided:  # a [i, c, 2k] buffer viewed as [c, i, k]: strided rows and codebooks
        queries = integer_data((num_queries, num_codebooks, 2 * dim), generator)[:, :, :dim].transpose(0, 1)
    else:
        queries = integer_data((num_codebooks, num_queries, dim), generator)
    queries[:, :5] = keys[:, 3:8]  # queries on a key, one on the duplicated pair
    queries[:, 20:25] = keys[:, 3:8]  # the same in the second block of a two-block pass
    expected, distances = brute_force_topk(queries, keys, topk)
    indices, scores = codebook.nearest_keys(queries, keys, topk=topk)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(scores.double(), -distances.gather(-1, expected))
    if topk == 1:
        by_gemm, _ = codebook._nearest_keys_by_gemm(
            queries, keys, keys.pow(2).sum(-1), 1, 0.0, None, None, None, None, codebook.DEFAULT_CHUNK_ELEMENTS
        )
        assert torch.equal(by_gemm, expected)


@needs_kernels
def test_fused_lookup_on_real_valued_data_and_excluded_pairs():
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(4, 70, 14, generator=generator), torch.randn(4, 1000, 14, generator=generator)
    expected, _ = brute_force_topk(queries, keys, 1)
    assert torch.equal(codebook.nearest_keys(queries, keys)[0], expected)
    excluded = torch.zeros(4, 1000, dtype=torch.bool)
    excluded.view(-1)[expected.flatten() + torch.arange(4).repeat_interleave(70) * 1000] = True
    again, _ = codebook.nearest_keys(queries, keys, excluded_cj=excluded)
    assert not excluded.gather(1, again[..., 0]).any()  # the nearest ones excluded: never fetched


def random_codebook_state(generator, num_codebooks=3, num_pairs=50, dim=6):
    keys = torch.randn(num_codebooks, num_pairs, dim, generator=generator)
    cluster_size = torch.rand(num_codebooks, num_pairs, generator=generator) * 0.2
    return keys, keys * cluster_size[..., None], cluster_size


@needs_kernels
@pytest.mark.parametrize("threshold,num_queries", [(0.0, 80), (0.15, 80), (0.15, 64)])  # 64: the power-of-two draw
def test_native_ema_step_equals_the_torch_one(monkeypatch, threshold, num_queries):
    generator = torch.Generator().manual_seed(1)
    num_codebooks, num_pairs, dim = 3, 50, 6
    # The global batch as the module passes it: [i, c, k] strided views.
    queries = torch.randn(num_codebooks, num_queries, 2 * dim, generator=generator)[:, :, :dim].transpose(0, 1)
    indices = torch.randint(0, num_pairs, (num_codebooks, num_queries), generator=generator).transpose(0, 1)
    results = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(codebook, "native_kernels", lambda: None)
        state = tuple(t.clone() for t in random_codebook_state(torch.Generator().manual_seed(2)))
        replaced = codebook.ema_step_(
            *state, queries, indices, 0.9, 1e-5, threshold, torch.tensor(123), first_codebook=5
        )
        results.append((state, int(replaced)))
    (native_state, native_replaced), (torch_state, torch_replaced) = results
    assert native_replaced == torch_replaced
    assert (native_replaced > 10) == (threshold > 0)  # the test replaces pairs where it should
    for ours, theirs in zip(native_state, torch_state):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    if threshold > 0:  # the same query drawn for every replaced pair: the same key exactly
        replaced_pairs = native_state[2] == threshold
        assert torch.equal(native_state[0][replaced_pairs], torch_state[0][replaced_pairs])


@needs_kernels
@pytest.mark.parametrize(
    "num_pairs,dim,num_queries",
    [(50, 6, 80), (37, 1, 45), (200, 14, 64), (33, 16, 100), (64, 17, 33), (300, 33, 20)],  # 100 > 33 pairs
)
def test_fused_lookup_and_ema_step_is_the_two_calls_bit_for_bit(monkeypatch, num_pairs, dim, num_queries):
    generator = torch.Generator().manual_seed(num_pairs + dim)
    num_codebooks = 5
    queries = torch.randn(num_queries, num_codebooks, 2 * dim, generator=generator)[:, :, :dim].transpose(0, 1)
    queries[:, 1] = queries[:, 0]  # a pair chosen twice: its sum adds queries in batch order
    state = random_codebook_state(torch.Generator().manual_seed(3), num_codebooks, num_pairs, dim)
    fused, separate = (tuple(t.clone() for t in state) for _ in range(2))
    for step in range(3):  # later steps start from replaced pairs (cluster_size = threshold)
        seed = torch.tensor(50 + step)
        indices, replaced = codebook.nearest_keys_and_ema_step_(queries, *fused, 0.9, 1e-5, 0.15, seed, 7)
        expected, _ = codebook.nearest_keys(queries, separate[0])
        expected_replaced = codebook.ema_step_(
            *separate, queries.transpose(0, 1), expected[..., 0].transpose(0, 1), 0.9, 1e-5, 0.15, seed, first_codebook=7
        )
        assert torch.equal(indices, expected) and int(replaced) == int(expected_replaced) > 0
        for ours, theirs in zip(fused, separate):
            assert torch.equal(ours, theirs)
    # Without the kernels: the torch path, the same within rounding.
    monkeypatch.setattr(codebook, "native_kernels", lambda: None)
    in_torch = tuple(t.clone() for t in state)
    _, replaced_in_torch = codebook.nearest_keys_and_ema_step_(queries, *in_torch, 0.9, 1e-5, 0.15, torch.tensor(50), 7)
    again = tuple(t.clone() for t in state)
    monkeypatch.undo()
    _, replaced_natively = codebook.nearest_keys_and_ema_step_(queries, *again, 0.9, 1e-5, 0.15, torch.tensor(50), 7)
    assert int(replaced_in_torch) == int(replaced_natively)
    for ours, theirs in zip(again, in_torch):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_an_empty_batch_decays_the_state_and_replaces_nothing(monkeypatch):
    queries, indices = torch.empty(0, 3, 6), torch.empty(0, 3, dtype=torch.int64)
    results = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(codebook, "native_kernels", lambda: None)
        state = tuple(t.clone() for t in random_codebook_state(torch.Generator().manual_seed(2)))
        replaced = codebook.ema_step_(*state, queries, indices, 0.9, 1e-5, 0.15, torch.tensor(1), first_codebook=0)
        results.append((state, int(replaced)))
    (native_state, native_replaced), (torch_state, torch_replaced) = results
    assert native_replaced == torch_replaced == 0
    torch.testing.assert_close(native_state[2], random_codebook_state(torch.Generator().manual_seed(2))[2] * 0.9)
    for ours, theirs in zip(native_state, torch_state):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_the_dense_value_gradient_is_index_adds_bit_for_bit(monkeypatch):
    from kvb_dist import core

    generator = torch.Generator().manual_seed(3)
    bottleneck = core.KeyValueBottleneck(3, 40, 4, 5, seed=0).freeze_keys()
    heads = torch.randn(64, 3, 4, generator=generator)
    heads[32:] = heads[:32]  # every fetched row twice: additions in batch order decide the bits
    weights = torch.randn(64, 3, 1, 5, generator=generator)  # values [b, c, t, v]
    grads = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(core, "native_kernels", lambda: None)
        (values,) = bottleneck(heads)
        (values * weights).sum().backward()
        grads.append(bottleneck.values.grad)
        bottleneck.values.grad = None
    assert torch.equal(grads[0], grads[1])
    assert grads[0].abs().sum() > 0 and (grads[0] == 0).any()  # fetched rows only


@needs_kernels
@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_the_lookup_threads_work_in_a_forked_child():
    queries, keys = torch.randn(4, 20, 6), torch.randn(4, 50, 6)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the kernels use their pool from 2 threads on (earlier tests may set 1)
    try:
        expected, _ = codebook.nearest_keys(queries, keys)  # the parent's pool now exists
        pid = os.fork()
        if pid == 0:  # the child: a pool inherited without threads would hang here
            os._exit(0 if torch.equal(codebook.nearest_keys(queries, keys)[0], expected) else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        torch.set_num_threads(threads)
    assert os.waitstatus_to_exitcode(status) == 0
