"""Sharded checkpoints (torch.distributed.checkpoint): each rank writes its codebooks, any layout loads.

Save on 1 x 2 ranks after EMA and Adam steps; load on one process, 1 x 3 and 2 x 2: every
tensor (keys, EMA state, counters, values, Adam moments) equals a single-process run of the
same steps. Export to one file and import from one, unsafe metadata, interrupted saves.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

from kvb_dist.__main__ import main as cli
from kvb_dist.core import ORIGINAL_STATE_NAMES, KeyValueBottleneck
from kvb_dist.distributed import checkpoint
from kvb_dist.distributed.layout import ParallelLayout
from kvb_dist.distributed.sharded import ShardedKeyValueBottleneck
from kvb_dist.distributed.spawn import run_ranks
from kvb_dist.run.checkpoint import CheckpointSeries

pytestmark = pytest.mark.timeout(240)

CONFIG = dict(num_codebooks=5, key_value_pairs_per_codebook=16, dim_keys=3, dim_values=4, threshold_ema_dead_code=0.5, seed=3)
GLOBAL_BATCH, STEPS = 12, 3
PER_CODEBOOK = ("keys", "keys_avg", "cluster_size", "cluster_size_counter", "values")


def global_batch(step: int) -> torch.Tensor:
    return torch.randn(GLOBAL_BATCH, 5, 2, 3, generator=torch.Generator().manual_seed(step))


def train(module, rank: int, world_size: int):
    """EMA steps, then Adam steps on the values; each rank takes its slice of every global batch."""
    local = GLOBAL_BATCH // world_size
    optimizer = torch.optim.Adam([module.values], lr=0.05)
    for step in range(STEPS):
        module(global_batch(step)[rank * local : (rank + 1) * local])
    module.freeze_keys()
    weights = torch.linspace(-1, 1, 4)
    for step in range(STEPS, 2 * STEPS):
        optimizer.zero_grad()
        values = module(global_batch(step)[rank * local : (rank + 1) * local])[0]
        (values * weights).flatten(1).sum(1).mean().backward()  # mean over the local batch, as DDP
        optimizer.step()
    return optimizer


def tensors(module, optimizer):
    moments = checkpoint.optimizer_tensors(optimizer, {"values": module.values}, {"values": module.global_view})
    return {**{f"bottleneck.{n}": t for n, t in module.sharded_state_dict().items()}, **{f"optimizer.{n}": t for n, t in moments.items()}}


def reference():
    """One process on the concatenated batches: its full state and Adam moments."""
    module = KeyValueBottleneck(**CONFIG)
    optimizer = train(module, 0, 1)
    state = {f"bottleneck.{n}": t for n, t in module.state_dict().items()}
    state.update({f"optimizer.values.{k}": v for k, v in optimizer.state[module.values].items()})
    return state


def empty_module(layout):
    """A fresh module and optimizer on `layout` whose state a load must fill."""
    module = ShardedKeyValueBottleneck(**{**CONFIG, "seed": 99}, layout=layout).freeze_keys()
    return module, torch.optim.Adam([module.values], lr=0.05)


def local_tensors(state):
    return {name: (t.to_local() if hasattr(t, "to_local") else t).clone() for name, t in state.items()}


def save_worker(rank, world_size, folder):
    layout = ParallelLayout.build(num_shards=world_size)
    module = ShardedKeyValueBottleneck(**CONFIG, layout=layout)
    optimizer = train(module, rank, world_size)
    checkpoint.save(tensors(module, optimizer), folder, layout)
    return layout.codebook_range(5)


def load_worker(rank, world_size, num_shards, folders, save_folder):
    layout = ParallelLayout.build(num_shards=num_shards)
    loaded = {}
    for folder in folders:
        module, optimizer = empty_module(layout)
        saved = checkpoint.saved_tensors(folder)  # an imported file has no optimizer state
        state = {name: t for name, t in tensors(module, optimizer).items() if name in saved}
        checkpoint.load_(state, folder, layout)
        loaded[folder] = local_tensors(state)
    checkpoint.save(state, save_folder, layout)  # the last one again, from this layout
    return layout.codebook_range(5), loaded


def assert_matches(local_state, expected, codebooks, exact=False):
    start, stop = codebooks
    for name, want in expected.items():
        got = local_state[name]
        if name.split(".")[-1] in PER_CODEBOOK or name.endswith(("exp_avg", "exp_avg_sq")):
            want = want[start:stop]
        if exact:
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


def test_save_on_two_ranks_load_on_one_three_and_two_by_two(tmp_path):
    saved_1x2, imported, saved_2x2 = tmp_path / "1x2", tmp_path / "imported", tmp_path / "2x2"
    assert run_ranks(2, save_worker, str(saved_1x2)) == [(0, 3), (3, 5)]
    expected = reference()

    # One process, no process group: the whole state, equal to the single-process run.
    module, optimizer = empty_module(ParallelLayout.single())
    state = tensors(module, optimizer)
    checkpoint.load_(state, saved_1x2, ParallelLayout.single())
    assert_matches(local_tensors(state), expected, (0, 5))
    whole = checkpoint.load_full(saved_1x2)
    assert_matches(whole, local_tensors(state), (0, 5), exact=True)

    # Export -> one file the single-process module loads strictly; import -> a checkpoint again.
    assert cli(["export", str(saved_1x2), str(tmp_path / "kvb.pt"), "--prefix", "bottleneck."]) == 0
    exported = torch.load(tmp_path / "kvb.pt", weights_only=True)
    single = KeyValueBottleneck(**CONFIG)
    single.load_state_dict(exported, strict=True)
    for name, t in single.state_dict().items():
        torch.testing.assert_close(t, expected[f"bottleneck.{name}"], atol=1e-5, rtol=1e-5, msg=name)
    assert cli(["export", str(saved_1x2), str(tmp_path / "original.pt"), "--prefix", "bottleneck.", "--original"]) == 0
    assert set(torch.load(tmp_path / "original.pt", weights_only=True)) == set(ORIGINAL_STATE_NAMES)
    torch.save({"bottleneck": {n: whole[f"bottleneck.{n}"] for n in single.state_dict()}}, tmp_path / "wrapper.pt")
    assert cli(["import", str(tmp_path / "wrapper.pt"), str(imported), "--entry", "bottleneck", "--prefix", "bottleneck."]) == 0

    # 1 x 3 loads both (the second was written by one process), then 2 x 2 saves and 1 x 3 reloads.
    for world, shards, folders, save_to in ((3, 3, [saved_1x2, imported], tmp_path / "again"), (4, 2, [saved_1x2], saved_2x2)):
        for codebooks, loaded in run_ranks(world, load_worker, shards, [str(f) for f in folders], str(save_to)):
            for folder in folders:
                bottleneck_only = {n: t for n, t in whole.items() if folder != imported or n.startswith("bottleneck.")}
                assert_matches(loaded[str(folder)], bottleneck_only, codebooks, exact=True)
    # Replicas are written once: the 2 x 2 checkpoint is as large as the 1 x 2 one, not twice.
    sizes = [sum(f.stat().st_size for f in folder.glob("*.distcp")) for folder in (saved_1x2, saved_2x2)]
    assert sizes[1] < 1.1 * sizes[0], sizes
    assert_matches(checkpoint.load_full(saved_2x2), whole, (0, 5), exact=True)


def test_unsafe_metadata_is_refused_without_running_it(tmp_path):
    checkpoint.save_full({"x": torch.ones(3)}, tmp_path / "ok")
    assert torch.equal(checkpoint.load_full(tmp_path / "ok")["x"], torch.ones(3))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "ok" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(pickle.UnpicklingError, match="not checkpoint metadata"):
        checkpoint.load_full(tmp_path / "ok")
    assert not marker.exists()


def test_an_interrupted_save_is_never_taken_for_a_finished_one(tmp_path):
    layout = ParallelLayout.single()
    value = torch.zeros(4)
    series = CheckpointSeries(tmp_path, "stream", layout)
    for step in (1, 2):
        value.fill_(step)
        series.save({"value": value}, {"step": step})
    # A save killed mid-write: a folder with data but no metadata, and no record naming it.
    partial = tmp_path / "stream-000002"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"torn")
    with pytest.raises(FileNotFoundError, match="not a finished checkpoint"):
        checkpoint.load_full(partial)
    resumed = CheckpointSeries(tmp_path, "stream", layout)
    assert resumed.record["step"] == 2 and not partial.exists()
    value.zero_()
    resumed.load_({"value": value})
    assert torch.equal(value, torch.full((4,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stream-000001", "stream.pt"]


def test_background_saves_record_only_finished_folders(tmp_path):
    layout = ParallelLayout.single()
    value = torch.zeros(1000)
    series = CheckpointSeries(tmp_path, "stream", layout, background=True)
    series.save({"value": value}, {"step": 1}, wait=False)
    value.fill_(7.0)  # training goes on: the background save holds its own copy
    assert series.record is None or series.record["step"] != 1
    series.wait()
    assert series.record["step"] == 1
    assert torch.equal(checkpoint.load_full(tmp_path / series.record["tensors"])["value"], torch.zeros(1000))


def test_the_launcher_phases_never_gather_the_whole_model():
    phases = Path(__file__).resolve().parent.parent / "kvb_dist" / "run"
    for path in phases.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("full_state_dict", "load_full_state_dict", "gather_codebooks"), f"{path}: {node.attr}"


def test_optimizer_state_is_created_without_moving_anything():
    first, second = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(2))
    optimizer = torch.optim.Adam([first, second], lr=0.1)
    first.grad = torch.randn(3, 4)
    optimizer.step()  # only `first` has state now
    moments, before, grad = optimizer.state[first]["exp_avg"].clone(), (first.detach().clone(), second.detach().clone()), first.grad
    state = checkpoint.optimizer_tensors(optimizer, {"first": first, "second": second})
    assert sorted(state) == sorted(f"{n}.{k}" for n in ("first", "second") for k in ("step", "exp_avg", "exp_avg_sq"))
    assert torch.equal(optimizer.state[first]["exp_avg"], moments) and float(optimizer.state[first]["step"]) == 1
    assert torch.equal(first, before[0]) and torch.equal(second, before[1]) and first.grad is grad


def test_rows_are_read_into_place_and_foreign_checkpoints_load_the_dcp_way(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    passed_to_dcp = []
    original = FileSystemReader.read_data

    def counting(self, plan, planner):
        passed_to_dcp.extend(item.storage_index.fqn for item in plan.items)
        return original(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", counting)
    tensors = {"matrix": torch.randn(6, 5), "step": torch.tensor(3.0), "columns": torch.randn(4, 3).t()}
    checkpoint.save_full(tensors, tmp_path / "ours")
    loaded = checkpoint.load_full(tmp_path / "ours")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert passed_to_dcp == ["step"]  # the matrices went straight into place
    passed_to_dcp.clear()
    dcp.save(dict(tensors), checkpoint_id=str(tmp_path / "foreign"), no_dist=True)  # no kvb_dist marker
    loaded = checkpoint.load_full(tmp_path / "foreign")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert sorted(passed_to_dcp) == ["columns", "matrix", "step"]
