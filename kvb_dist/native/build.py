"""The fused nearest-mean kernel (fused_nearest.c) for k-means on the CPU, compiled on first use.

A plain C file built with the machine's C compiler (`$CC`, split like a shell word, so
`CC="ccache gcc"` works; else `cc`) with -march=native, because it runs where it was built. The
library is cached in `$KVB_DIST_CACHE_DIR` (default `~/.cache/kvb_dist`, or `$XDG_CACHE_HOME/kvb_dist`)
under a hash of the source, the flags and the compiler's identity (`--version`), so the next
process loads it instead of compiling (about 0.2 s), and a changed source or compiler builds anew.
Where the cache cannot be written, it builds into a temporary folder per process. Without a
compiler, or with KVB_DIST_NATIVE=0, `fused_nearest_means()` returns None and k-means assigns
with GEMM + row argmin instead: same results up to float rounding, slower for narrow heads.
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
from typing import Callable, List, Optional

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_nearest.c")
_lock = threading.Lock()
_loaded: dict = {}  # "kernel": the callable or None, once tried


LIBRARY_NAME = "libkvb_fused_nearest.so"
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
    """A hash of what decides the library's bytes: source, flags, compiler and its version, CPU."""
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"{shlex.join(compiler)}: {error}") from error
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (*compiler, *flags, *COMMON_FLAGS, version, _cpu_identity()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _compile(compiler: List[str], flags: List[str], library: Path) -> Optional[str]:
    """Builds library (through a temporary name, so a reader never sees half a file); the error or None."""
    temporary = library.with_name(f".{library.name}.tmp-{os.getpid()}")
    command = [*compiler, *flags, *COMMON_FLAGS, str(SOURCE), "-o", str(temporary)]
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
    """The kernel, from the cache or compiled into it (raises RuntimeError where it cannot be built)."""
    folder = cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if os.access(folder, os.W_OK):
        return _wrap(_build_in(folder))
    temporary = tempfile.mkdtemp(prefix="kvb_dist_native_")
    try:
        return _wrap(_build_in(Path(temporary)))
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # the loaded library stays mapped


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
