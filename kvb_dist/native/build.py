"""The native CPU kernels, compiled on first use: fused nearest keys for k-means and the bottleneck's
lookup (fused_nearest.c), the bottleneck's EMA step with dead-pair replacement, alone or right
after each codebook's lookup (ema_step.c), and the dense gradient of its values (rows.c).

Plain C files built with the machine's C compiler (`$CC`, split like a shell word, so
`CC="ccache gcc"` works; else `cc`) with -march=native, because it runs where it was built. The
library is cached in `$KVB_DIST_CACHE_DIR` (default `~/.cache/kvb_dist`, or `$XDG_CACHE_HOME/kvb_dist`)
under a hash of the source, the flags and the compiler's identity (`--version`), so the next
process loads it (about 3 ms) instead of compiling (about 1 s), and a changed source or compiler builds anew.
Where the cache cannot be written, it builds into a temporary folder per process. Without a
compiler, or with KVB_DIST_NATIVE=0, `native_kernels()` returns None and the callers use torch
(GEMM + row arg-max, dense EMA passes): same results up to float rounding, slower on the CPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("fused_nearest.c", "ema_step.c", "rows.c"))
_lock = threading.Lock()
_loaded: dict = {}  # "kernels": NativeKernels or None, once tried


LIBRARY_NAME = "libkvb_native.so"
FLAG_CHOICES = (["-O3", "-march=native"], ["-O3"])  # -march=native first; some compilers (or targets) lack it
COMMON_FLAGS = ["-Wno-psabi", "-shared", "-fPIC"]


def compiler_command() -> List[str]:
    """$CC as a shell word list (`ccache gcc`, `gcc -m64`), else cc / gcc on the PATH."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    return [shutil.which("cc") or "gcc"]


def cache_folder() -> Path:
    if os.environ.get("KVB_DIST_CACHE_DIR"):
        return Path(os.environ["KVB_DIST_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvb_dist"


def _cpu_identity() -> str:
    """What -march=native builds for: a home folder shared by different machines must not hand
    one machine's library to another (illegal instructions)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def build_key(compiler: List[str], flags: List[str]) -> str:
    """A hash of what decides the library's bytes: sources, flags, compiler and its version, CPU."""
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"{shlex.join(compiler)}: {error}") from error
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes() + b"\0")
    for part in (*compiler, *flags, *COMMON_FLAGS, version, _cpu_identity()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _compile(compiler: List[str], flags: List[str], library: Path) -> Optional[str]:
    """Builds library (through a temporary name, so a reader never sees half a file); the error or None."""
    temporary = library.with_name(f".{library.name}.tmp-{os.getpid()}")
    command = [*compiler, *flags, *COMMON_FLAGS, *map(str, SOURCES), "-o", str(temporary)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"{shlex.join(compiler)}: {error}") from error
    if done.returncode != 0:
        temporary.unlink(missing_ok=True)
        return done.stderr.strip()[-500:]
    os.replace(temporary, library)
    return None


def _load(library: Path, compiler: List[str]) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(library))
    except OSError as error:
        raise RuntimeError(f"cannot load what {shlex.join(compiler)} built: {error}") from error


def _build_in(folder: Path) -> ctypes.CDLL:
    """The kernel from the cache in folder (built there first if it is not)."""
    compiler, errors = compiler_command(), []
    for flags in FLAG_CHOICES:
        library = folder / build_key(compiler, flags) / LIBRARY_NAME
        if library.is_file():
            logger.debug("loading the cached %s", library)
            return _load(library, compiler)
        library.parent.mkdir(parents=True, exist_ok=True)
        error = _compile(compiler, flags, library)
        if error is None:
            return _load(library, compiler)
        errors.append(error)
    raise RuntimeError(f"{shlex.join(compiler)} failed: {errors[-1]}")


def _address(tensor, dtype, shape) -> Optional[int]:
    if tensor is None:
        return None
    assert tensor.device.type == "cpu" and tensor.is_contiguous(), "contiguous CPU tensors only"
    assert tensor.dtype == dtype and tuple(tensor.shape) == tuple(shape), (tensor.dtype, tuple(tensor.shape), shape)
    return tensor.data_ptr()


# Codebook ranges per thread in the codebook-parallel kernels: small enough to even out threads
# that run at different speeds (the last range taken keeps the others waiting: with 8 per thread the
# caller waited about 3 ms of a 70 ms EMA step at the paper size, 0.4-0.5 ms with 32), large enough that a call's
# overhead (about 10 us) stays negligible.
PARTS_PER_THREAD = 32


def _codebook_ranges(num_codebooks: int, parts: int) -> List[Tuple[int, int]]:
    """At most `parts` contiguous, nearly equal ranges covering 0 .. num_codebooks - 1."""
    step = max(1, -(-num_codebooks // max(1, parts)))
    return [(c0, min(c0 + step, num_codebooks)) for c0 in range(0, num_codebooks, step)]


class NativeKernels:
    """The compiled kernels with tensor arguments checked. ctypes releases the GIL during a call,
    so the codebook-parallel ones split their codebooks over `threads` threads (this one and a pool)."""

    def __init__(self, library: ctypes.CDLL):
        pointer, int64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        self._means = library.kvb_nearest_means
        self._means.argtypes = [pointer, int64, int64, int64, pointer, int64, pointer, pointer, pointer, pointer, pointer]
        self._means.restype = ctypes.c_int
        self._keys = library.kvb_nearest_keys
        self._keys.argtypes = [pointer, int64, int64, int64, int64, int64, pointer, pointer, int64, int64, pointer, pointer]
        self._keys.restype = ctypes.c_int
        self._ema = library.kvb_ema_step
        self._ema.argtypes = [pointer, pointer, pointer, int64, int64, int64, pointer, int64, int64, int64,
                              pointer, int64, int64, f32, f32, f32, f32, int64, int64]
        self._ema.restype = int64
        self._lookup_ema = library.kvb_lookup_ema_step
        self._lookup_ema.argtypes = [pointer, pointer, pointer, int64, int64, int64, pointer, int64, int64, int64,
                                     pointer, pointer, f32, f32, f32, f32, int64, int64]
        self._lookup_ema.restype = int64
        self._add_rows = library.kvb_add_rows
        self._add_rows.argtypes = [pointer, int64, pointer, pointer, int64]
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_pid = os.getpid()

    def _parallel(self, calls: List[Callable[[], Any]], threads: int) -> List[Any]:
        """Runs the calls on this thread and threads - 1 of the pool's, each taking the next call not
        yet taken (a descheduled thread then delays one small call, not half the work); their
        results in order."""
        threads = max(1, min(threads, len(calls)))
        # A forked child inherits the pool object but not its threads: it makes its own.
        if threads > 1 and (self._pool is None or self._pool._max_workers < threads - 1 or self._pool_pid != os.getpid()):
            self._pool, self._pool_pid = ThreadPoolExecutor(threads - 1, thread_name_prefix="kvb_native"), os.getpid()
        results: List[Any] = [None] * len(calls)
        next_call = iter(range(len(calls)))
        lock = threading.Lock()

        def work() -> None:
            while True:
                with lock:
                    n = next(next_call, None)
                if n is None:
                    return
                results[n] = calls[n]()

        others = [self._pool.submit(work) for _ in range(threads - 1)]
        work()
        for future in others:
            future.result()
        return results

    def nearest_means(self, queries_nk, means_jk, index_n=None, distance_n=None,
                      counts_j=None, sums_jk=None, sse_1=None) -> None:
        """Every query's nearest mean (one codebook): writes index_n (int64) and distance_n (squared),
        and/or adds the queries to counts_j, sums_jk and sse_1 (float64). Queries: float32 CPU rows
        with a contiguous last dim; the rest contiguous."""
        (num_queries, dim), num_means = queries_nk.shape, means_jk.shape[0]
        assert queries_nk.device.type == "cpu" and queries_nk.dtype == torch.float32
        assert queries_nk.stride(1) == 1 or dim == 1, "queries need a contiguous last dim"
        assert (counts_j is None) == (sums_jk is None) == (sse_1 is None)
        f32, f64 = torch.float32, torch.float64
        status = self._means(
            queries_nk.data_ptr(), num_queries, dim, queries_nk.stride(0),
            _address(means_jk, f32, (num_means, dim)), num_means,
            _address(index_n, torch.int64, (num_queries,)), _address(distance_n, f32, (num_queries,)),
            _address(counts_j, f64, (num_means,)), _address(sums_jk, f64, (num_means, dim)), _address(sse_1, f64, (1,)),
        )
        if status != 0:
            raise MemoryError("kvb_nearest_means: out of memory")

    def nearest_keys(self, queries_cik, keys_cjk, excluded_cj, topk: int, threads: int = 1):
        """(index [c, i, t] int64, squared distance [c, i, t]) of every query's t nearest keys, nearest
        first, ties to the smaller index. Queries: float32 CPU, last dim contiguous; keys contiguous;
        excluded_cj (bool, or None): keys never to fetch."""
        num_codebooks, num_queries, dim = queries_cik.shape
        num_keys = keys_cjk.shape[1]
        assert queries_cik.dtype == torch.float32 and (queries_cik.stride(2) == 1 or dim == 1)
        _address(keys_cjk, torch.float32, (num_codebooks, num_keys, dim))
        if excluded_cj is not None:
            _address(excluded_cj, torch.bool, (num_codebooks, num_keys))
        index = torch.empty(num_codebooks, num_queries, topk, dtype=torch.int64)
        distance = torch.empty(num_codebooks, num_queries, topk)
        stride_c, stride_i = queries_cik.stride(0), queries_cik.stride(1)

        def part(c0: int, c1: int) -> Callable[[], int]:
            return lambda: self._keys(
                queries_cik[c0:].data_ptr(), c1 - c0, num_queries, dim, stride_c, stride_i, keys_cjk[c0].data_ptr(),
                None if excluded_cj is None else excluded_cj[c0].data_ptr(), num_keys, topk,
                index[c0].data_ptr(), distance[c0].data_ptr(),
            )

        ranges = _codebook_ranges(num_codebooks, PARTS_PER_THREAD * threads)
        if num_codebooks and num_queries and any(self._parallel([part(*r) for r in ranges], threads)):
            raise MemoryError("kvb_nearest_keys: out of memory")
        return index, distance

    @staticmethod
    def _check_ema_state(keys_cjk, keys_avg_cjk, cluster_size_cj) -> None:
        num_codebooks, num_pairs, dim = keys_cjk.shape
        for state in (keys_cjk, keys_avg_cjk):
            _address(state, torch.float32, (num_codebooks, num_pairs, dim))
        _address(cluster_size_cj, torch.float32, (num_codebooks, num_pairs))

    def _replaced(self, calls: List[Callable[[], int]], threads: int, kernel: str) -> int:
        replaced = self._parallel(calls, threads)
        if min(replaced) < 0:
            raise MemoryError(f"{kernel}: out of memory")
        return sum(replaced)

    def ema_step_(self, keys_cjk, keys_avg_cjk, cluster_size_cj, queries_ick, indices_ic, decay: float, eps: float,
                  threshold: float, replace_seed: int, first_codebook: int, threads: int = 1) -> int:
        """The EMA step of codebooks [c] in place (see ema_step.c) from the global batch's queries
        [i, c, k] (last dim contiguous) and the pairs they chose [i, c]; dead pairs (cluster_size <
        threshold, if > 0) take heads of that batch. Returns the number of pairs replaced."""
        num_codebooks, num_pairs, dim = keys_cjk.shape
        if num_codebooks == 0:
            return 0
        self._check_ema_state(keys_cjk, keys_avg_cjk, cluster_size_cj)
        num_queries = queries_ick.shape[0]
        assert queries_ick.dtype == torch.float32 and (queries_ick.stride(2) == 1 or dim == 1)
        assert tuple(queries_ick.shape) == (num_queries, num_codebooks, dim), tuple(queries_ick.shape)
        assert indices_ic.dtype == torch.int64 and tuple(indices_ic.shape) == (num_queries, num_codebooks)

        def part(c0: int, c1: int) -> Callable[[], int]:
            return lambda: self._ema(
                keys_cjk[c0].data_ptr(), keys_avg_cjk[c0].data_ptr(), cluster_size_cj[c0].data_ptr(), c1 - c0,
                num_pairs, dim, queries_ick[:, c0:].data_ptr(), num_queries, queries_ick.stride(0),
                queries_ick.stride(1), indices_ic[:, c0:].data_ptr(), indices_ic.stride(0), indices_ic.stride(1),
                decay, 1.0 - decay, eps, threshold, replace_seed, first_codebook + c0,
            )

        ranges = _codebook_ranges(num_codebooks, PARTS_PER_THREAD * threads)
        return self._replaced([part(*r) for r in ranges], threads, "kvb_ema_step")

    def lookup_and_ema_step_(self, queries_cik, keys_cjk, keys_avg_cjk, cluster_size_cj, decay: float, eps: float,
                             threshold: float, replace_seed: int, first_codebook: int, threads: int = 1):
        """nearest_keys (top-1) and then ema_step_ with the pairs found, codebook by codebook, where
        queries [c, i, k] (last dim contiguous) are the whole global batch: (index [c, i, 1],
        squared distance [c, i, 1], pairs replaced), the results of the two calls bit for bit."""
        num_codebooks, num_queries, dim = queries_cik.shape
        num_pairs = keys_cjk.shape[1]
        assert queries_cik.dtype == torch.float32 and (queries_cik.stride(2) == 1 or dim == 1)
        self._check_ema_state(keys_cjk, keys_avg_cjk, cluster_size_cj)
        index = torch.empty(num_codebooks, num_queries, 1, dtype=torch.int64)
        distance = torch.empty(num_codebooks, num_queries, 1)
        if num_codebooks == 0 or num_queries == 0:
            return index, distance, 0

        def part(c0: int, c1: int) -> Callable[[], int]:
            return lambda: self._lookup_ema(
                keys_cjk[c0].data_ptr(), keys_avg_cjk[c0].data_ptr(), cluster_size_cj[c0].data_ptr(), c1 - c0,
                num_pairs, dim, queries_cik[c0:].data_ptr(), num_queries, queries_cik.stride(1),
                queries_cik.stride(0), index[c0].data_ptr(), distance[c0].data_ptr(),
                decay, 1.0 - decay, eps, threshold, replace_seed, first_codebook + c0,
            )

        ranges = _codebook_ranges(num_codebooks, PARTS_PER_THREAD * threads)
        return index, distance, self._replaced([part(*r) for r in ranges], threads, "kvb_lookup_ema_step")

    def add_rows_(self, out_nv, indices_n, rows_nv) -> torch.Tensor:
        """out_nv[indices_n[r]] += rows_nv[r] in order r = 0, 1, ...: index_add_'s result bit for bit
        (see rows.c)."""
        _address(out_nv, torch.float32, (out_nv.shape[0], rows_nv.shape[-1]))
        _address(indices_n, torch.int64, (rows_nv.shape[0],))
        _address(rows_nv, torch.float32, rows_nv.shape)
        self._add_rows(out_nv.data_ptr(), out_nv.shape[1], indices_n.data_ptr(), rows_nv.data_ptr(), indices_n.shape[0])
        return out_nv


def build() -> NativeKernels:
    """The kernels, from the cache or compiled into it (raises RuntimeError where they cannot be built)."""
    folder = cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if os.access(folder, os.W_OK):
        return NativeKernels(_build_in(folder))
    temporary = tempfile.mkdtemp(prefix="kvb_dist_native_")
    try:
        return NativeKernels(_build_in(Path(temporary)))
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # the loaded library stays mapped


def native_kernels() -> Optional[NativeKernels]:
    """The kernels, built once per process, or None where they cannot be built (or KVB_DIST_NATIVE=0)."""
    with _lock:
        if "kernels" not in _loaded:
            _loaded["kernels"] = None
            if os.environ.get("KVB_DIST_NATIVE", "1") != "0":
                try:
                    _loaded["kernels"] = build()
                except RuntimeError as error:
                    logger.warning("the CPU kernels fall back to torch (slower): cannot build %s: %s",
                                   ", ".join(source.name for source in SOURCES), error)
        return _loaded["kernels"]


def fused_nearest_means() -> Optional[Callable]:
    """k-means' kernel (NativeKernels.nearest_means), or None where it cannot be built."""
    kernels = native_kernels()
    return None if kernels is None else kernels.nearest_means
