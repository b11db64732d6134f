"""The fused nearest-mean kernel (fused_nearest.c) for k-means on the CPU, compiled on first use.

A plain C file built with the machine's C compiler (`$CC`, else `cc`) into a temporary folder,
once per process (about 0.2 s), with -march=native because it runs where it was built. Without
a compiler, or with KVB_DIST_NATIVE=0, `fused_nearest_means()` returns None and k-means
assigns with GEMM + row argmin instead: same results up to float rounding, slower for narrow heads.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_nearest.c")
_lock = threading.Lock()
_loaded: dict = {}  # "kernel": the callable or None, once tried


def _compile(folder: str) -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or "gcc"
    library = os.path.join(folder, "libkvb_fused_nearest.so")
    errors = []
    # -march=native first; some compilers (or targets) lack it.
    for flags in (["-O3", "-march=native"], ["-O3"]):
        command = [compiler, *flags, "-Wno-psabi", "-shared", "-fPIC", str(SOURCE), "-o", library]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise RuntimeError(f"{compiler}: {error}") from error
        if done.returncode == 0:
            try:
                return ctypes.CDLL(library)
            except OSError as error:
                raise RuntimeError(f"cannot load what {compiler} built: {error}") from error
        errors.append(done.stderr.strip()[-500:])
    raise RuntimeError(f"{compiler} failed: {errors[-1]}")


def _wrap(library: ctypes.CDLL) -> Callable:
    function = library.kvb_nearest_means
    pointer, int64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, int64, int64, int64, pointer, pointer, int64, pointer, pointer, pointer, pointer, pointer]
    function.restype = ctypes.c_int

    def address(tensor, dtype, shape) -> Optional[int]:
        if tensor is None:
            return None
        assert tensor.device.type == "cpu" and tensor.is_contiguous(), "contiguous CPU tensors only"
        assert tensor.dtype == dtype and tuple(tensor.shape) == shape, (tensor.dtype, tuple(tensor.shape), shape)
        return tensor.data_ptr()

    def nearest(queries_nk, minus_two_means_jk, means_sq_j, index_n=None, distance_n=None,
                counts_j=None, sums_jk=None, sse_1=None) -> None:
        """Every query's nearest mean: writes index_n (int64) and distance_n (squared), and/or adds
        the queries to counts_j, sums_jk and sse_1 (float64). Queries: float32 CPU rows with a
        contiguous last dim; the rest contiguous. ctypes releases the GIL meanwhile."""
        (num_queries, dim), num_means = queries_nk.shape, minus_two_means_jk.shape[0]
        assert queries_nk.device.type == "cpu" and queries_nk.dtype == torch.float32
        assert queries_nk.stride(1) == 1 or dim == 1, "queries need a contiguous last dim"
        assert (counts_j is None) == (sums_jk is None) == (sse_1 is None)
        f32, f64 = torch.float32, torch.float64
        status = function(
            queries_nk.data_ptr(), num_queries, dim, queries_nk.stride(0),
            address(minus_two_means_jk, f32, (num_means, dim)), address(means_sq_j, f32, (num_means,)), num_means,
            address(index_n, torch.int64, (num_queries,)), address(distance_n, f32, (num_queries,)),
            address(counts_j, f64, (num_means,)), address(sums_jk, f64, (num_means, dim)), address(sse_1, f64, (1,)),
        )
        if status != 0:
            raise MemoryError("kvb_nearest_means: out of memory")

    return nearest


def build() -> Callable:
    """Compiles and loads the kernel (raises RuntimeError where it cannot)."""
    folder = tempfile.mkdtemp(prefix="kvb_dist_native_")
    try:
        return _wrap(_compile(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the loaded library stays mapped


def fused_nearest_means() -> Optional[Callable]:
    """The kernel (see _wrap), built once per process, or None where it cannot be built."""
    with _lock:
        if "kernel" not in _loaded:
            _loaded["kernel"] = None
            if os.environ.get("KVB_DIST_NATIVE", "1") != "0":
                try:
                    _loaded["kernel"] = build()
                except RuntimeError as error:
                    logger.warning("k-means uses GEMM + argmin (slower for narrow heads): cannot build %s: %s",
                                   SOURCE.name, error)
        return _loaded["kernel"]
