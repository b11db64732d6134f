"""The benchmark keeps working (tiny sizes, seconds). Timings are not asserted: they depend on
the machine and on whatever else runs on it."""

import json

import pytest
import torch

from kvb_dist.bench import core as bench
from kvb_dist.codebook import nearest_keys

TINY = bench.BenchSize(num_codebooks=4, num_pairs=64, dim_keys=4, dim_values=3, batch=8)


@pytest.mark.parametrize("chunk_elements", [100, 1 << 22])
def test_floor_finds_the_same_keys_as_the_bottleneck(chunk_elements):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(5, 37, 6, generator=generator)
    keys = torch.randn(5, 50, 6, generator=generator)
    expected, _ = nearest_keys(queries, keys)
    assert torch.equal(bench.floor_lookup(queries, keys, chunk_elements), expected[..., 0])


def test_every_step_runs_at_a_tiny_size():
    implementations = ["ours", "floor"] + (["vq"] if bench.vq_available() else [])
    for measure, builders in bench.STEPS.items():
        for implementation in set(implementations) & set(builders):
            builders[implementation](TINY)()
    bottleneck_step = bench.ours_frozen_fwd_bwd(TINY)
    bottleneck_step()  # twice: the step must leave the module ready for the next one
    bottleneck_step()


@pytest.mark.timeout(120)
def test_run_reports_timings_memory_and_targets():
    report = bench.run({"paper": TINY}, threads=1, warmup=1, repeats=2, log=lambda line: None)
    json.dumps(report)  # what --json writes
    result = report["results"]["paper"]
    implementations = {"ours", "floor"} | ({"vq"} if bench.vq_available() else set())
    for measure in bench.STEPS:
        assert set(result[measure]) == implementations & set(bench.STEPS[measure])
        assert all(timing["median_ms"] > 0 and timing["repeats"] == 2 for timing in result[measure].values())
    for implementation, probe in result["peak_rss"].items():
        assert "error" not in probe, probe
        # A fresh process: its peak includes torch but nothing of this test process.
        assert probe["rss_after_import_torch_mb"] <= probe["peak_mb"] < 2000
        assert probe["step_peak_mb"] <= probe["peak_mb"]
    targets = {check["target"] for check in report["targets"]}
    assert any("roofline" in target for target in targets) and any("RSS" in target for target in targets)
    assert result["roofline_ms"] > 0 and report["sgemm_multiply_adds_per_second"] > 0
    table = bench.format_table(report["results"], report["targets"])
    assert "ema_step" in table and ("PASS" in table or "MISS" in table)


def test_vq_is_skipped_when_its_estimate_exceeds_the_limit():
    report = bench.run(
        {"small": TINY}, threads=1, repeats=1, with_memory=False, vq_memory_limit_gb=1e-9, log=lambda line: None
    )
    result = report["results"]["small"]
    assert "vq" not in result["ema_step"]
    if bench.vq_available():
        assert "estimated" in result["skipped"]["vq"]


def test_command_line_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--sizes", "small", "--repeats", "1", "--no-memory", "--no-vq", "--threads", "1", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["threads"] == 1 and "small" in written["results"]
    assert "ours/floor" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown sizes"):
        bench.main(["--sizes", "huge"])


@pytest.mark.timeout(120)
def test_checkpoint_benchmark_runs_and_reshards_bit_for_bit():
    from kvb_dist.bench import checkpoint as bench_checkpoint

    result = bench_checkpoint.measure(2, 3, 3, dict(num_codebooks=5, num_pairs=4096, dim=4))
    assert all(row["identical"] for row in result["loads"])
    for row in result["saves"]:  # each rank writes its shard (and a few KiB of file headers)
        assert 1.0 <= row["written_mib"] / row["shard_mib"] < 1.05
    assert "| 1 x 2 -> 1 x 3 |" in bench_checkpoint.report(result)


@pytest.mark.timeout(120)
def test_scale_benchmark_runs_on_ranks_at_a_tiny_size(capsys):
    from kvb_dist.bench import scale

    with pytest.raises(SystemExit):
        scale.main(["--help"])
    assert "VmHWM" in capsys.readouterr().out  # the help says what is measured
    with pytest.raises(ValueError, match="at least --pairs"):
        scale.main(["--pairs", "64", "--samples", "32"])
    result = scale.main(["--ranks", "2", "--codebooks", "3", "--pairs", "16", "--dim-keys", "4", "--dim-values", "3",
                         "--samples", "64", "--batch", "8", "--iters", "1"])
    out = capsys.readouterr().out
    assert [report["codebooks"] for report in result["reports"]] == [(0, 2), (2, 3)]  # uneven shards
    assert result["reports"][0]["state_bytes"] > result["reports"][1]["state_bytes"] > 0
    assert len(result["rows"]) == 2 * len(scale.PHASES)
    for row in result["rows"]:  # numbers, not asserted against the target at this size
        assert row["verdict"] in ("PASS", "MISS") and row["share_mib"] > 0
    for report in result["reports"]:
        assert report["kmeans"]["random"]["training"] == 64 and len(report["kmeans"]["kmeans++"]["sse"]) == 1
    for phase in scale.PHASES:
        assert f"| {phase} | 0 |" in out and f"| {phase} | 1 |" in out
    assert "full/share" in out and "MALLOC_MMAP_THRESHOLD_" in out
