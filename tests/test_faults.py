"""Faults on several ranks end on every rank within the timeout: switches or inputs that differ
per rank raise the same ValueError everywhere before any other collective, and stuck
collectives (mismatched, a stopped rank, a background group) fail after the group's timeout."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kvb_dist.distributed.layout import ParallelLayout
from kvb_dist.distributed.sharded import ShardedKeyValueBottleneck
from kvb_dist.distributed.spawn import run_ranks

SHORT = timedelta(seconds=3)  # groups made for one stuck collective
WORLD = timedelta(seconds=8)  # the default group: outlasts a stuck group and a late peer


def _module(layout, **kwargs):
    return ShardedKeyValueBottleneck(5, 16, 3, 4, layout=layout, seed=3, **kwargs)


def _heads(rank, batch=3):
    return torch.randn(batch, 5, 3, generator=torch.Generator().manual_seed(rank))


# Each case changes something on rank 1 only and calls the module on every rank.
def _meta_input(module, rank):
    module(torch.empty(2, 5, 3, device="meta") if rank == 1 else _heads(rank))


def _sparse_input(module, rank):
    module(_heads(rank).to_sparse() if rank == 1 else _heads(rank))


def _return_values_only(module, rank):
    module.return_values_only = rank == 1
    module(_heads(rank))


def _topk(module, rank):
    module.freeze_keys()
    module.topk = 1 + rank
    module(_heads(rank))


def _freeze_on_one_replica(module, rank):
    if rank == 1:
        module.freeze_keys()
    module(_heads(rank))


def _counts_off_on_one_replica(module, rank):
    module.freeze_keys()
    if rank == 1:
        module.deactivate_counts()
    module(_heads(rank))


def _different_calls(module, rank):
    module.freeze_keys()
    module(_heads(rank)) if rank == 0 else module.owned_indices(_heads(rank))


def _cached_rows_with_counts_off_on_one_rank(module, rank):
    module.freeze_keys()
    owned = module.owned_indices(_heads(rank)).movedim(1, 0)
    if rank == 1:
        module.deactivate_counts()
    module.values_at_rows(owned, torch.arange(2))


CASES = {
    "meta input": (_meta_input, "invalid bottleneck input on rank(s) [1]"),
    "sparse input": (_sparse_input, "invalid bottleneck input on rank(s) [1]"),
    "return_values_only": (_return_values_only, "return_values_only (rank 1: 1 vs rank 0: 0)"),
    "topk": (_topk, "topk (rank 1: 2 vs rank 0: 1)"),
    "freeze_keys": (_freeze_on_one_replica, "update_keys (rank 1: 0 vs rank 0: 1)"),
    "deactivate_counts": (_counts_off_on_one_replica, "count_cluster_size (rank 1: 0 vs rank 0: 1)"),
    "call": (_different_calls, "call (rank 1: owned_indices vs rank 0: forward)"),
    "values_at_rows": (_cached_rows_with_counts_off_on_one_rank, "count_cluster_size (rank 1: 0 vs rank 0: 1)"),
}


def disagreement_worker(rank, world_size):
    """Every case on 1x2 and 2x1 in one process group; a healthy call after each proves the ranks stayed in step."""
    outcome = {}
    for num_shards in (2, 1):
        layout = ParallelLayout.build(num_shards)
        for name, (case, _) in CASES.items():
            module = _module(layout)
            started = time.monotonic()
            try:
                case(module, rank)
                error = None
            except ValueError as raised:
                error = str(raised)
            healthy = _module(layout, return_values_only=False)(_heads(rank)).values.shape
            outcome[(num_shards, name)] = (error, time.monotonic() - started, tuple(healthy))
    return outcome


@pytest.mark.timeout(90)
def test_per_rank_disagreements_raise_on_every_rank():
    outcomes = run_ranks(2, disagreement_worker, timeout=60, process_group_timeout=timedelta(seconds=20))
    for key, (_, expected) in ((k, CASES[k[1]]) for k in outcomes[0]):
        for rank, outcome in enumerate(outcomes):
            error, seconds, healthy = outcome[key]
            assert error is not None and expected in error, (rank, key, error)
            assert seconds < 5, (rank, key, seconds)  # raised at once, not after a timeout
            assert healthy == (3, 5, 1, 4)


def _timed(fn):
    started = time.monotonic()
    try:
        fn()
        return None, time.monotonic() - started
    except RuntimeError as error:
        return type(error).__name__, time.monotonic() - started


def stuck_worker(rank, world_size):
    """Stuck collectives, each in a fresh group of its own (a timed-out group is not used again)."""
    layout = ParallelLayout.build()
    pids = layout.all_gather_world(torch.tensor([os.getpid()]))[:, 0].tolist()
    outcome = {}

    group = dist.new_group(backend="gloo", timeout=SHORT)
    outcome["barrier vs all-reduce"] = _timed(
        lambda: dist.barrier(group=group) if rank == 0 else dist.all_reduce(torch.ones(1000), group=group)
    )
    layout.barrier()

    group = dist.new_group(backend="gloo", timeout=SHORT)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # until rank 0 has timed out and sends SIGCONT
    outcome["stopped rank"] = _timed(lambda: dist.all_reduce(torch.ones(3), group=group))
    if rank == 0:
        os.kill(pids[1], signal.SIGCONT)
    layout.barrier()

    # A group made for a background thread gets the default group's timeout (WORLD), not torch's
    # 30-minute default for new groups.
    group = layout.new_cpu_group()
    if rank == 0:
        outcome["background group"] = _timed(lambda: dist.all_reduce(torch.ones(3), group=group))
    else:  # alive, but never joins
        time.sleep(WORLD.total_seconds() + 4)  # a group without the timeout would wait this long
    return outcome


@pytest.mark.timeout(90)
def test_stuck_collectives_fail_within_the_timeout():
    outcomes = run_ranks(2, stuck_worker, timeout=80, process_group_timeout=WORLD)
    for name, timeout in (("barrier vs all-reduce", SHORT), ("stopped rank", SHORT), ("background group", WORLD)):
        error, seconds = outcomes[0][name]
        assert error == "RuntimeError" and seconds < timeout.total_seconds() + 1.5, (name, error, seconds)
    error, seconds = outcomes[1]["barrier vs all-reduce"]
    assert error == "RuntimeError" and seconds < SHORT.total_seconds() + 1.5


# ---------------------------------------------------------------------------------------------
# Phases decide together: shards bad on one rank, the bad-shard limit, too few shards


class _NoTracker:
    def log(self, *args, **kwargs):
        pass


def _context(out_dir, layout, *overrides):
    from kvb_dist.run.config import load_config
    from kvb_dist.run.phases import RunContext

    config = load_config(None, [
        f"run.out_dir={out_dir}", "run.name=r", "run.tracker=none", "bottleneck.num_codebooks=2",
        "bottleneck.key_value_pairs_per_codebook=8", "bottleneck.dim_keys=2", "bottleneck.splitting_mode=chunk",
        "init.batch_size=20", "init.ema_epochs=1", *overrides,
    ])
    return RunContext(config=config, layout=layout, tracker=_NoTracker(), device=torch.device("cpu"))


def _write_embeddings(folder, num_shards, per_shard=10):
    import numpy as np

    from kvb_dist.data import write_arrays

    generator = np.random.default_rng(0)
    n = num_shards * per_shard
    return write_arrays(str(folder), generator.normal(size=(n, 4)).astype(np.float32), np.arange(n) % 10,
                        samples_per_shard=per_shard, overwrite=True)


def phases_worker(rank, world_size, out_dir):
    from kvb_dist.run.phases import initialize, train

    layout = ParallelLayout.build()
    outcome = {}
    # A train shard unreadable on rank 1 only is dropped on both ranks: the same train set
    # everywhere. Each rank reads only its half; without shard 15 rank 1's half starts in shard 9,
    # which it reads after the agreement.
    ctx = _context(out_dir, layout)
    folder = ctx.path("embeddings", "train")
    if rank == 0:
        _write_embeddings(folder, 20)
    layout.barrier()
    unreadable = "shard-000015.tar"
    real_read, urls_read = train.read_shard, []

    def read_shard(url, *args, **kwargs):
        urls_read.append(Path(url).name)
        if rank == 1 and url.endswith(unreadable):
            raise OSError("gone")
        return real_read(url, *args, **kwargs)

    train.read_shard = read_shard
    split = train.load_split(folder, layout)
    train.read_shard = real_read
    assert split["features"].shape == (95, 4)  # this rank's half of the 190 rows only
    outcome["split"] = (split["features"].double().sum().item(), split["labels"].tolist(), split["rows"], split["samples_skipped"])
    outcome["read"] = urls_read

    # EMA key fitting with 3 of 20 shards truncated (over the 10 % limit): an error on every rank.
    ctx = _context(out_dir, layout, "init.method=ema")
    if rank == 0:
        for name in ("shard-000002.tar", "shard-000011.tar", "shard-000015.tar"):
            path = folder / name
            path.write_bytes(path.read_bytes()[:700])
    layout.barrier()
    try:
        initialize.run(ctx)
        outcome["ema"] = None
    except ValueError as error:
        outcome["ema"] = str(error)

    # Fewer shards than ranks (embedded on fewer ranks): the advice names what works.
    if rank == 0:
        _write_embeddings(folder, 1, per_shard=40)
    layout.barrier()
    try:
        initialize.run(ctx)
        outcome["few_shards"] = None
    except ValueError as error:
        outcome["few_shards"] = str(error)
    return outcome


@pytest.mark.timeout(90)
def test_phases_decide_together_on_bad_shards(tmp_path):
    outcomes = run_ranks(2, phases_worker, str(tmp_path), timeout=60)
    import numpy as np

    rows = [i for i in range(200) if i // 10 != 15]  # what is left without shard 15, in key order
    features = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)[rows]
    (sum0, labels0, rows0, skipped0), (sum1, labels1, rows1, skipped1) = outcomes[0]["split"], outcomes[1]["split"]
    assert labels0 == labels1 == [i % 10 for i in rows] and skipped0 == skipped1 == 10
    assert rows0 == (0, 95) and rows1 == (95, 190)
    assert sum0 == pytest.approx(features[:95].astype(np.float64).sum()) and sum1 == pytest.approx(features[95:].astype(np.float64).sum())
    # Each rank read its own half only (rank 1: shard 9 after shard 15 was dropped).
    assert sorted(set(outcomes[0]["read"])) == [f"shard-{i:06d}.tar" for i in range(10)]
    assert sorted(set(outcomes[1]["read"])) == [f"shard-{i:06d}.tar" for i in range(9, 20)]
    for outcome in outcomes:
        assert "3 of 20 shards (30 samples) are unreadable over all ranks" in outcome["ema"]
        assert "--redo freeze" in outcome["few_shards"] and "1 shard(s), fewer than the 2 ranks" in outcome["few_shards"]
