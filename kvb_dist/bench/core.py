"""Speed and memory of one KeyValueBottleneck step against the GEMM roofline, a floor and vector-quantize-pytorch.

    python -m kvb_dist.bench.core                          # paper and small sizes, 1-3 min on 2 cores
    python -m kvb_dist.bench.core --sizes small --json out.json --threads 2
    python -m kvb_dist.bench.core --device cuda --no-vq    # the same steps on a GPU

Measured with a fixed torch.set_num_threads, timings as the median (and min) of --repeats
runs after --warmup runs, implementations interleaved round by round:
1. ema_step: one forward while keys learn (lookup + EMA update + fetch), under no_grad;
2. frozen_fwd_bwd: frozen keys, forward + backward of values.mean() (values get grads);
3. kmeans_pass: a k-means assignment pass (nearest mean + float64 counts and sums) over the batch;
4. peak_rss (CPU): a fresh process imports torch, builds the module, runs one step of each kind
   and reports its peak RSS, the RSS right after `import torch`, and the steps' own peak.
Each against
- roofline: the step's multiply-adds (batch x codebooks x pairs x dim_keys for the distances) at
  the rate of a large square sgemm measured in the same run (the best of a few, before and after
  the steps): no exact lookup by distances computes fewer;
- floor: a bare chunked GEMM + argmax of the same shapes and chunking (the lookup alone);
- vq: vector-quantize-pytorch's multi-head EMA codebook (one codebook per head), if installed;
  its frozen row is its nearest analogue: frozen codebook, gradient to the input.
The issue's targets (at the paper size) are printed as PASS/MISS. On a machine shared with
other work the load average is printed too: read the timings against it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from kvb_dist.codebook import _chunk_sizes, default_chunk_elements
from kvb_dist.core import KeyValueBottleneck
from kvb_dist.kmeans import accumulate_assignments_, chunk_threads

MiB = 1 << 20


@dataclass(frozen=True)
class BenchSize:
    num_codebooks: int
    num_pairs: int
    dim_keys: int
    dim_values: int
    batch: int
    threshold_ema_dead_code: float = 0.0

    @property
    def multiply_adds(self) -> int:
        """Of the distances of every head to every key: the lookup's arithmetic."""
        return self.batch * self.num_codebooks * self.num_pairs * self.dim_keys


PAPER = dict(num_codebooks=256, num_pairs=4096, dim_keys=14, dim_values=10, batch=256)
SIZES = {
    # The paper's configuration: dead pairs below 0.1 x batch / pairs are replaced (about 80 % of
    # the pairs every step at this size).
    "paper": BenchSize(**PAPER, threshold_ema_dead_code=0.1 * PAPER["batch"] / PAPER["num_pairs"]),
    "paper-no-dead": BenchSize(**PAPER),
    "small": BenchSize(num_codebooks=16, num_pairs=512, dim_keys=16, dim_values=8, batch=256),
}

# Targets from the issue, checked at the paper size (other sizes: the table's ratios only).
TARGET_SIZE = "paper"
OVER_ROOFLINE_MAX = 1.6  # EMA step and frozen forward + backward / the sgemm roofline
VQ_OVER_EMA_STEP_MIN = 10.0  # vq's EMA step / ours
PAPER_PEAK_RSS_MAX_GB = 0.6  # peak RSS of a fresh process (torch included), 1 GB = 1e9 bytes


# ---------------------------------------------------------------------------------------------
# The measured steps. Each builder returns a closure that runs one step.


DEVICE = torch.device("cpu")  # --device sets it for the whole run


def make_heads(size: BenchSize, seed: int = 0) -> torch.Tensor:
    """Encoder output already split into heads: [batch, codebooks, dim_keys] (no spatial dims)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size.batch, size.num_codebooks, size.dim_keys, generator=generator).to(DEVICE)


def build_bottleneck(size: BenchSize) -> KeyValueBottleneck:
    return KeyValueBottleneck(
        size.num_codebooks, size.num_pairs, size.dim_keys, size.dim_values, decay=0.95, seed=0,
        threshold_ema_dead_code=size.threshold_ema_dead_code,
    ).to(DEVICE)


def ours_ema_step(size: BenchSize) -> Callable[[], None]:
    bottleneck, heads = build_bottleneck(size), make_heads(size)

    @torch.no_grad()  # keys learn without gradients
    def step():
        bottleneck(heads)

    return step


def ours_kmeans_pass(size: BenchSize) -> Callable[[], None]:
    """One k-means assignment pass over the batch's heads: nearest mean, counts and sums (float64)."""
    queries_cik = make_heads(size).transpose(0, 1).contiguous()
    means_cjk = build_bottleneck(size).keys
    counts = torch.zeros(size.num_codebooks, size.num_pairs, dtype=torch.float64, device=DEVICE)
    sums = torch.zeros(size.num_codebooks, size.num_pairs, size.dim_keys, dtype=torch.float64, device=DEVICE)
    sse = torch.zeros(size.num_codebooks, dtype=torch.float64, device=DEVICE)
    threads = torch.get_num_threads()

    def step():
        with chunk_threads(threads if DEVICE.type == "cpu" else 1) as pool:
            accumulate_assignments_(queries_cik, means_cjk, counts, sums, sse, pool=pool)

    return step


def ours_frozen_fwd_bwd(size: BenchSize) -> Callable[[], None]:
    bottleneck, heads = build_bottleneck(size).freeze_keys(), make_heads(size)

    def step():
        (values,) = bottleneck(heads)
        values.mean().backward()
        bottleneck.values.grad = None

    return step


def floor_lookup(queries_cik: torch.Tensor, keys_cjk: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """The least work any exact lookup does: scores 2 q.key - |key|^2 per chunk, then argmax.

    The chunk's scores go into one buffer allocated once: a fresh 16 MiB tensor per chunk can
    cost more in first-touch page faults than the GEMM itself (measured at the paper size: 170k
    minor faults and 2x the time per step), depending on what the allocator hands back.
    """
    num_codebooks, num_queries, _ = queries_cik.shape
    num_pairs = keys_cjk.shape[1]
    indices_ci = torch.empty(num_codebooks, num_queries, dtype=torch.long, device=queries_cik.device)
    key_sq_cj = torch.einsum("cjk,cjk->cj", keys_cjk, keys_cjk)  # 4x faster than pow(2).sum(-1) here
    keys_ckj = keys_cjk.transpose(1, 2)
    codebooks_per_chunk, queries_per_chunk = _chunk_sizes(num_codebooks, num_queries, num_pairs, chunk_elements)
    scores_buffer = queries_cik.new_empty(codebooks_per_chunk * queries_per_chunk * num_pairs)
    for c0 in range(0, num_codebooks, codebooks_per_chunk):
        c1 = min(c0 + codebooks_per_chunk, num_codebooks)
        for i0 in range(0, num_queries, queries_per_chunk):
            i1 = min(i0 + queries_per_chunk, num_queries)
            scores = scores_buffer[: (c1 - c0) * (i1 - i0) * num_pairs].view(c1 - c0, i1 - i0, num_pairs)
            torch.baddbmm(
                key_sq_cj[c0:c1, None], queries_cik[c0:c1, i0:i1], keys_ckj[c0:c1], beta=-1, alpha=2, out=scores
            )
            indices_ci[c0:c1, i0:i1] = scores.argmax(-1)
    return indices_ci


def floor_step(size: BenchSize, chunk_elements: Optional[int] = None) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(1)
    keys_cjk = torch.randn(size.num_codebooks, size.num_pairs, size.dim_keys, generator=generator).to(DEVICE)
    queries_cik = make_heads(size).transpose(0, 1).contiguous()  # the layout the lookup wants, for free
    chunk_elements = chunk_elements or default_chunk_elements(DEVICE)

    def step():
        floor_lookup(queries_cik, keys_cjk, chunk_elements)

    return step


def vq_available() -> bool:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def build_vq(size: BenchSize):
    from vector_quantize_pytorch import VectorQuantize

    # One EMA codebook per head, random init, no extra losses: the same job as our EMA step.
    # codebook_dim must be the head dim: its default (dim) would give every head a codebook of
    # the full input width and a projection in front, 256x too big at the paper size.
    return VectorQuantize(
        dim=size.num_codebooks * size.dim_keys,
        codebook_size=size.num_pairs,
        codebook_dim=size.dim_keys,
        heads=size.num_codebooks,
        separate_codebook_per_head=True,
        decay=0.95,
        kmeans_init=False,
        threshold_ema_dead_code=size.threshold_ema_dead_code,
        commitment_weight=0.0,
        rotation_trick=False,
    ).train()


VQ_HEAVY_BYTES = 1 << 30  # above this estimate vq runs --vq-repeats times without warm-up


def vq_estimated_bytes(size: BenchSize) -> int:
    """Rough peak of vq's steps: they materialise [heads, batch, pairs] distances and one-hots
    (measured at the paper size: 6.2 GiB over one EMA and one frozen step, 24 bytes per
    element), plus its codebook and EMA average."""
    return 24 * size.num_codebooks * size.batch * size.num_pairs + 8 * size.num_codebooks * size.num_pairs * size.dim_keys


def vq_ema_step(size: BenchSize) -> Callable[[], None]:
    vq, heads = build_vq(size), make_heads(size).reshape(size.batch, 1, -1)

    @torch.no_grad()
    def step():
        vq(heads)

    return step


def vq_frozen_fwd_bwd(size: BenchSize) -> Callable[[], None]:
    """The nearest analogue vq offers: frozen codebook, gradient to the input (straight-through)."""
    vq = build_vq(size)
    heads = make_heads(size).reshape(size.batch, 1, -1).requires_grad_()

    def step():
        quantized, _, _ = vq(heads, freeze_codebook=True)
        quantized.mean().backward()
        heads.grad = None

    return step


STEPS = {
    "ema_step": {"ours": ours_ema_step, "floor": floor_step, "vq": vq_ema_step},
    "frozen_fwd_bwd": {"ours": ours_frozen_fwd_bwd, "floor": floor_step, "vq": vq_frozen_fwd_bwd},
    "kmeans_pass": {"ours": ours_kmeans_pass, "floor": floor_step},
}


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def gemm_rate(repeats: int = 3) -> float:
    """Multiply-adds per second of a large square float32 matmul on DEVICE (the best of repeats)."""
    n = 4096 if DEVICE.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    a @ b
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10 if DEVICE.type == "cuda" else 1):
            a @ b
        synchronize()
        best = min(best, (time.perf_counter() - start) / (10 if DEVICE.type == "cuda" else 1))
    return n**3 / best


def time_steps(
    steps: Dict[str, Callable[[], None]], warmups: Dict[str, int], repeats: Dict[str, int]
) -> Dict[str, Dict]:
    """Seconds per step of each implementation, interleaved round by round so that load from
    other processes on a shared machine hits every implementation alike."""
    for name, step in steps.items():
        for _ in range(warmups[name]):
            step()
    seconds: Dict[str, List[float]] = {name: [] for name in steps}
    # First-touch page faults on freshly allocated buffers are a large, allocator-dependent
    # part of a step at these sizes; counting them explains timings that differ between runs.
    faults: Dict[str, List[int]] = {name: [] for name in steps}
    for round_index in range(max(repeats.values())):
        for name, step in steps.items():
            if round_index < repeats[name]:
                faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                synchronize()
                start = time.perf_counter()
                step()
                synchronize()
                seconds[name].append(time.perf_counter() - start)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    return {
        name: {
            "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times),
            "minor_page_faults": int(statistics.median(faults[name])),
            "repeats": len(times),
        }
        for name, times in seconds.items()
    }


# ---------------------------------------------------------------------------------------------
# Peak memory, in a fresh process so that nothing measured before inflates it


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(field)


def current_rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak RSS of this process so far (VmHWM).

    Not ru_maxrss: Linux carries the parent's peak into a child across fork + exec, so a probe
    spawned by a benchmark that once held several GB (vq) would report those GB.
    """
    return _status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Restarts VmHWM from the current RSS (Linux >= 4.0), so the next peak is a step's alone."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _one_step_of_each_ours(size: BenchSize) -> Callable[[], None]:
    bottleneck, heads = build_bottleneck(size), make_heads(size)

    def run():
        with torch.no_grad():
            bottleneck(heads)
        bottleneck.freeze_keys()
        bottleneck(heads)[0].mean().backward()

    return run


def _one_step_of_each_floor(size: BenchSize) -> Callable[[], None]:
    return floor_step(size)  # the floor has one kind of step: the lookup


def _one_step_of_each_vq(size: BenchSize) -> Callable[[], None]:
    vq, heads = build_vq(size), make_heads(size).reshape(size.batch, 1, -1)

    def run():
        with torch.no_grad():
            vq(heads)
        vq(heads.requires_grad_(), freeze_codebook=True)[0].mean().backward()

    return run


ONE_STEP_OF_EACH = {"ours": _one_step_of_each_ours, "floor": _one_step_of_each_floor, "vq": _one_step_of_each_vq}


def run_memory_probe(implementation: str, size: BenchSize) -> Dict[str, float]:
    """Inside the fresh process (torch already imported): build one module, run one step of each
    kind. The process peak is what a user sees; the step peak excludes building the module."""
    if implementation == "vq":
        import vector_quantize_pytorch  # noqa: F401  its import (about 80 MB) is not the step's memory
    rss_before_build = current_rss_bytes()
    run = ONE_STEP_OF_EACH[implementation](size)
    build_peak = peak_rss_bytes()
    rss_after_build = current_rss_bytes()
    step_peak_known = reset_peak_rss()
    run()
    step_peak = peak_rss_bytes()
    return {
        "rss_before_build_mb": rss_before_build / MiB,
        "build_peak_mb": build_peak / MiB,
        "rss_after_build_mb": rss_after_build / MiB,
        "step_peak_mb": step_peak / MiB if step_peak_known else float("nan"),
        "peak_mb": max(build_peak, step_peak) / MiB,
    }


# Reads its RSS right after `import torch`, before anything of ours is imported. The address
# space cap turns a runaway allocation into an error instead of a visit from the OOM killer.
_PROBE_SCRIPT = """
import json, os, resource
resource.setrlimit(resource.RLIMIT_AS, ({memory_limit_bytes}, {memory_limit_bytes}))
import torch
torch.set_num_threads({threads})
with open("/proc/self/statm") as statm:
    after_torch = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
from kvb_dist.bench.core import MiB, BenchSize, run_memory_probe
result = run_memory_probe({implementation!r}, BenchSize(**{size!r}))
result["rss_after_import_torch_mb"] = after_torch / MiB
print("PROBE " + json.dumps(result))
"""


def measure_peak_memory(
    implementation: str, size: BenchSize, threads: int, memory_limit_bytes: int = 20 << 30, timeout_s: float = 300
) -> Dict:
    script = _PROBE_SCRIPT.format(
        threads=threads, implementation=implementation, size=asdict(size), memory_limit_bytes=memory_limit_bytes
    )
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout_s, env=env)
    if completed.returncode != 0:
        return {"error": f"probe exited {completed.returncode}: {completed.stderr.strip()[-500:]}"}
    line = next(line for line in completed.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


# ---------------------------------------------------------------------------------------------
# Running and reporting


def bench_size(
    name: str,
    size: BenchSize,
    *,
    warmup: int,
    repeats: int,
    vq_repeats: int,
    threads: int,
    with_vq: bool,
    with_memory: bool,
    vq_memory_limit_bytes: int,
    log: Callable[[str], None] = print,
) -> Dict:
    implementations = ["ours", "floor"]
    result: Dict = {"size": asdict(size), "skipped": {}}
    if with_vq and not vq_available():
        result["skipped"]["vq"] = "vector-quantize-pytorch not installed"
    elif with_vq and vq_estimated_bytes(size) > vq_memory_limit_bytes:
        result["skipped"]["vq"] = (
            f"estimated {vq_estimated_bytes(size) / 2**30:.1f} GiB > limit {vq_memory_limit_bytes / 2**30:.1f} GiB"
        )
    elif with_vq:
        implementations.append("vq")
    for measure, builders in STEPS.items():
        measured = [implementation for implementation in implementations if implementation in builders]
        log(f"  {name} {measure}: {', '.join(measured)} ...")
        steps = {implementation: builders[implementation](size) for implementation in measured}
        counts = {implementation: repeats for implementation in measured}
        warmups = {implementation: warmup for implementation in measured}
        if "vq" in measured and vq_estimated_bytes(size) > VQ_HEAVY_BYTES:
            # A step of many seconds: one-time costs are noise next to it, repeating it is not. Timed
            # after the others, not between them: its GBs of temporaries slowed the next step of ours
            # by 1.7x (cold caches and page tables), which is vq's cost, not ours.
            heavy = {"vq": steps.pop("vq")}
            result[measure] = time_steps(steps, warmups, counts)
            result[measure].update(time_steps(heavy, {"vq": 0}, {"vq": vq_repeats}))
        else:
            result[measure] = time_steps(steps, warmups, counts)
        del steps
    if with_memory and DEVICE.type == "cpu":
        result["peak_rss"] = {}
        for implementation in implementations:
            log(f"  {name} peak_rss {implementation} (fresh process) ...")
            result["peak_rss"][implementation] = measure_peak_memory(implementation, size, threads, vq_memory_limit_bytes)
    return result


def check_targets(results: Dict[str, Dict]) -> List[Dict]:
    """PASS/MISS for the issue's targets, where the paper size was measured."""
    checks = []
    for name, result in results.items():
        if name != TARGET_SIZE:
            continue
        for measure in ("ema_step", "frozen_fwd_bwd"):
            ratio = result[measure]["ours"]["median_ms"] / result["roofline_ms"]
            checks.append(
                {"size": name, "target": f"{measure} <= {OVER_ROOFLINE_MAX}x roofline", "value": f"{ratio:.2f}x",
                 "passed": ratio <= OVER_ROOFLINE_MAX}
            )
        ema = result["ema_step"]
        if "vq" in ema:
            speedup = ema["vq"]["median_ms"] / ema["ours"]["median_ms"]
            checks.append(
                {"size": name, "target": f"ema_step >= {VQ_OVER_EMA_STEP_MIN:g}x faster than vq",
                 "value": f"{speedup:.1f}x", "passed": speedup >= VQ_OVER_EMA_STEP_MIN}
            )
        peak = result.get("peak_rss", {}).get("ours", {})
        if "peak_mb" in peak:
            gigabytes = peak["peak_mb"] * MiB / 1e9
            checks.append(
                {"size": name, "target": f"peak RSS <= {PAPER_PEAK_RSS_MAX_GB} GB",
                 "value": f"{gigabytes:.2f} GB ({peak['peak_mb']:.0f} MiB)",
                 "passed": gigabytes <= PAPER_PEAK_RSS_MAX_GB}
            )
    return checks


def format_table(results: Dict[str, Dict], checks: List[Dict]) -> str:
    lines = [
        f"{'size':<13} {'measure':<15} {'ours':>12} {'roofline':>12} {'ours/roof':>10} {'floor':>12} {'ours/floor':>11}"
        f" {'vq':>12} {'vq/ours':>8}"
    ]
    for name, result in results.items():
        roofline = result["roofline_ms"]
        for measure in STEPS:
            lines.append(_row(name, measure, {impl: t["median_ms"] for impl, t in result[measure].items()}, "ms", roofline))
            # The fastest repeat is the least disturbed by other processes on a shared machine.
            lines.append(_row(name, "  (min)", {impl: t["min_ms"] for impl, t in result[measure].items()}, "ms", roofline))
        for impl, probe in result.get("peak_rss", {}).items():
            if "error" in probe:
                lines.append(f"{name:<13} peak_rss {impl}: {probe['error']}")
        probes = {impl: probe for impl, probe in result.get("peak_rss", {}).items() if "peak_mb" in probe}
        if probes:
            lines.append(_row(name, "peak_rss", {impl: p["peak_mb"] for impl, p in probes.items()}, "MiB"))
            torch_rss = {impl: p["peak_mb"] - p["rss_after_import_torch_mb"] for impl, p in probes.items()}
            lines.append(_row(name, "  - torch RSS", torch_rss, "MiB"))
            step_only = {impl: p["step_peak_mb"] - p["rss_after_build_mb"] for impl, p in probes.items()}
            lines.append(_row(name, "  step above", step_only, "MiB"))
        for implementation, reason in result["skipped"].items():
            lines.append(f"{name:<13} {implementation} skipped: {reason}")
    lines.append("")
    lines.extend(f"{'PASS' if c['passed'] else 'MISS'}  {c['size']:<6} {c['target']:<36} {c['value']}" for c in checks)
    return "\n".join(lines)


def _row(name: str, measure: str, values: Dict[str, float], unit: str, roofline: Optional[float] = None) -> str:
    def cell(value):
        return f"{value:>8.1f} {unit:<3}" if value is not None else f"{'-':>12}"

    def ratio(over, under, width):
        return f"{over / under:>{width - 1}.2f}x" if over is not None and under else f"{'-':>{width}}"

    ours, floor, vq = values.get("ours"), values.get("floor"), values.get("vq")
    return (
        f"{name:<13} {measure:<15} {cell(ours)} {cell(roofline)} {ratio(ours, roofline, 10)} {cell(floor)}"
        f" {ratio(ours, floor, 11)} {cell(vq)} {ratio(vq, ours, 8)}"
    )


def run(
    sizes: Dict[str, BenchSize],
    *,
    threads: int,
    warmup: int = 1,
    repeats: int = 5,
    vq_repeats: int = 1,
    with_vq: bool = True,
    with_memory: bool = True,
    vq_memory_limit_gb: float = 20.0,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> Dict:
    global DEVICE
    DEVICE = torch.device(device)
    torch.set_num_threads(threads)
    load_at_start = os.getloadavg()[0]  # other processes on the machine skew timings; say so
    log(f"  sgemm rate on {DEVICE} ...")
    rate_at_start = gemm_rate()
    results = {
        name: bench_size(
            name, size, warmup=warmup, repeats=repeats, vq_repeats=vq_repeats, threads=threads, with_vq=with_vq,
            with_memory=with_memory, vq_memory_limit_bytes=int(vq_memory_limit_gb * 2**30), log=log,
        )
        for name, size in sizes.items()
    }
    # The best rate seen, before or after the steps: the roofline is then the lowest it can be.
    rate = max(rate_at_start, gemm_rate())
    for name, size in sizes.items():
        results[name]["roofline_ms"] = 1e3 * size.multiply_adds / rate
    return {
        "torch": torch.__version__,
        "device": _device_name(),
        "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
        "threads": torch.get_num_threads(),
        "sgemm_multiply_adds_per_second": rate,
        "chunk_elements": default_chunk_elements(DEVICE),
        "warmup": warmup,
        "repeats": repeats,
        "vq_repeats": vq_repeats,
        "results": results,
        "targets": check_targets(results),
    }


def _device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"CPU {model} ({os.cpu_count()} CPUs)"


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="paper,paper-no-dead,small", help=f"comma-separated, from {sorted(SIZES)}")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (peak RSS is measured on the CPU only)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vq-repeats", type=int, default=1, help="repeats of vq where its step is heavy (paper size)")
    parser.add_argument("--vq-memory-limit-gb", type=float, default=20.0, help="skip vq above this estimate")
    parser.add_argument("--no-vq", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.sizes.split(",") if name.strip()]
    unknown = [name for name in names if name not in SIZES]
    if unknown:
        raise ValueError(f"unknown sizes {unknown}; valid: {sorted(SIZES)}")

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (a CPU build of torch?)")
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads}), device {args.device}")
    report = run(
        {name: SIZES[name] for name in names}, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
        vq_repeats=args.vq_repeats, with_vq=not args.no_vq, with_memory=not args.no_memory,
        vq_memory_limit_gb=args.vq_memory_limit_gb, device=args.device,
    )
    print()
    for name in names:
        print(f"{name}: {SIZES[name]}")
    print(format_table(report["results"], report["targets"]))
    load = report["load_average_1min"]
    print(
        f"{report['device']}; sgemm {report['sgemm_multiply_adds_per_second'] / 1e9:.1f} G multiply-adds/s "
        f"(the roofline); threads {report['threads']}; load average (1 min) {load['start']:.1f} at start, "
        f"{load['end']:.1f} at end, on {os.cpu_count()} CPUs: a load above the CPU count means other processes shared them"
    )
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    return report


if __name__ == "__main__":
    main()
