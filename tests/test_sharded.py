"""Sharded codebooks on gloo ranks compute exactly what one process computes on the global batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kvb_dist.distributed.spawn import run_ranks
from kvb_dist.core import BottleneckOutput, KeyValueBottleneck
from kvb_dist.distributed.layout import ParallelLayout, shard_ranges, shard_sizes
from kvb_dist.distributed.sharded import ShardedKeyValueBottleneck, prepare_for_ddp
from kvb_dist.run.phases.train import BottleneckLearner
from kvb_dist.splitters import Chunker

LOCAL_BATCH = 6
SPATIAL = (2,)
CONFIGS = {
    # 5 codebooks: no layout below divides them evenly. A high threshold forces replacements.
    "random": dict(
        num_codebooks=5, key_value_pairs_per_codebook=16, dim_keys=3, dim_values=4,
        threshold_ema_dead_code=0.6, topk=2, return_values_only=False, seed=1234,
    ),
    "kmeans": dict(
        num_codebooks=5, key_value_pairs_per_codebook=8, dim_keys=3, dim_values=4, init_mode="kmeans",
        kmeans_iters=3, threshold_ema_dead_code=0.3, sample_codebook_temperature=0.3, topk=3,
        return_values_only=False, seed=99,
    ),
}
# Frozen before the first forward: k-means must still fit the keys on the first (global) batch.
FROZEN_FROM_THE_START = {"kmeans_frozen": "kmeans"}
LEARNING_STEPS = 3


def module_config(name: str):
    return CONFIGS[FROZEN_FROM_THE_START.get(name, name)]


def make_module(name: str, layout=None):
    """The sharded module on `layout`, or the single-process reference."""
    config = module_config(name)
    module = KeyValueBottleneck(**config) if layout is None else ShardedKeyValueBottleneck(**config, layout=layout)
    return module.freeze_keys() if name in FROZEN_FROM_THE_START else module


def detached(output):
    """Every output of a forward, usage counts included."""
    return [o.detach() for o in (*output, output.counts)]


def global_batch(step: int, batch_sizes, config) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(sum(batch_sizes), config["num_codebooks"], *SPATIAL, config["dim_keys"], generator=g)


def local_slice(x: torch.Tensor, rank: int, batch_sizes) -> torch.Tensor:
    start = sum(batch_sizes[:rank])
    return x[start : start + batch_sizes[rank]]


def run_protocol(module: KeyValueBottleneck, batches, loss_weights):
    """EMA steps with replacements, then frozen keys with counting, then masking + backward."""
    outputs = []
    for x in batches[:LEARNING_STEPS]:
        outputs.append(detached(module(x)))
    module.freeze_keys()
    frozen = detached(module(batches[LEARNING_STEPS]))
    outputs.append(frozen)
    # Cached indices fetch the same values (and count usage again).
    cached = module.values_at(frozen[2][..., 0]).detach()
    torch.testing.assert_close(cached, frozen[0])
    outputs.append([cached])
    module.deactivate_counts()
    final = module(batches[LEARNING_STEPS + 1])
    outputs.append(detached(final))
    values = final[0]
    # Mean over the local batch of a per-sample loss, as data-parallel training does.
    (values * loss_weights).flatten(1).sum(1).mean().backward()
    return outputs


def sharded_worker(rank, world_size, layouts, batch_sizes):
    results = {}
    for num_shards in layouts:
        layout = ParallelLayout.build(num_shards)
        for name in (*CONFIGS, *FROZEN_FROM_THE_START):
            module = make_module(name, layout=layout)
            config = module_config(name)
            batches = [local_slice(global_batch(s, batch_sizes, config), rank, batch_sizes) for s in range(LEARNING_STEPS + 2)]
            weights = torch.linspace(-1, 1, config["dim_values"])
            outputs = run_protocol(module, batches, weights)
            state = module.full_state_dict()
            start, stop = layout.codebook_range(config["num_codebooks"])
            results[(num_shards, name)] = dict(
                outputs=outputs, state=state, grad=(start, module.values.grad.clone()),
                unused=float(module.fraction_of_unused_keys()),
            )
    return results


def reference(name: str, batch_sizes):
    config = module_config(name)
    module = make_module(name)
    batches = [global_batch(s, batch_sizes, config) for s in range(LEARNING_STEPS + 2)]
    outputs = run_protocol(module, batches, torch.linspace(-1, 1, config["dim_values"]))
    return module, outputs


def check_against_reference(per_rank, layouts, batch_sizes):
    for name in (*CONFIGS, *FROZEN_FROM_THE_START):
        single, ref_outputs = reference(name, batch_sizes)
        assert float(single.initted) == 1.0 and float(single.keys.abs().sum()) > 0, name  # k-means ran
        for num_shards in layouts:
            where = f"config {name}, {len(per_rank) // num_shards} replicas x {num_shards} shards"
            grad = torch.zeros_like(single.values)
            for rank, results in enumerate(per_rank):
                got = results[(num_shards, name)]
                for step, (outs, refs) in enumerate(zip(got["outputs"], ref_outputs)):
                    for out, ref in zip(outs, refs):
                        expected = local_slice(ref, rank, batch_sizes)
                        assert out.shape == expected.shape, where
                        torch.testing.assert_close(out.float(), expected.float(), atol=1e-5, rtol=1e-5, msg=f"{where}, step {step}")
                for key in ("keys", "keys_avg", "cluster_size", "cluster_size_counter", "values", "random_state"):
                    torch.testing.assert_close(got["state"][key], single.state_dict()[key], atol=1e-5, rtol=1e-5, msg=f"{where}: {key}")
                start, g = got["grad"]
                grad[start : start + g.shape[0]] = g
                assert got["unused"] == pytest.approx(float(single.fraction_of_unused_keys()))
            # Like DDP, each rank's mean loss counts 1/W; with an empty rank the global mean is rescaled.
            scale = sum(batch_sizes) / (len(batch_sizes) * max(batch_sizes))
            torch.testing.assert_close(grad, single.values.grad * scale, atol=1e-6, rtol=1e-5, msg=f"{where}: value grads")


def test_shard_sizes_table():
    # torch.chunk's split (what DTensor's Shard(0) places on each rank), checked against torch itself.
    table = {(10, 4): [3, 3, 3, 1], (5, 3): [2, 2, 1], (2, 4): [1, 1, 0, 0], (5, 4): [2, 2, 1, 0], (9, 4): [3, 3, 3, 0], (8, 2): [4, 4], (0, 3): [0, 0, 0]}
    for (n, s), sizes in table.items():
        assert shard_sizes(n, s) == sizes
        chunks = [len(c) for c in torch.arange(n).chunk(s)] if n else []
        assert sizes == chunks + [0] * (s - len(chunks))
    assert shard_ranges(5, 2) == [(0, 3), (3, 5)]
    with pytest.raises(ValueError):
        shard_sizes(4, 0)


def test_world_of_one_is_the_core_module():
    config = CONFIGS["random"]
    sharded = ShardedKeyValueBottleneck(**config, layout=ParallelLayout.single())
    single = KeyValueBottleneck(**config)
    x = torch.randn(4, 5, 2, 3)
    out, expected = sharded(x), single(x)
    assert type(out) is type(expected) is BottleneckOutput
    for a, b in zip([*out, out.counts], [*expected, expected.counts]):
        torch.testing.assert_close(a, b)


@pytest.mark.timeout(150)
def test_equivalence_two_ranks_with_an_empty_local_batch():
    # Layouts (1 replica x 2 shards) and (2 replicas x 1 shard); rank 1 has no samples at all.
    for batch_sizes in ([LOCAL_BATCH, LOCAL_BATCH], [LOCAL_BATCH, 0]):
        per_rank = run_ranks(2, sharded_worker, (2, 1), batch_sizes)
        check_against_reference(per_rank, (2, 1), batch_sizes)


@pytest.mark.timeout(150)
def test_equivalence_three_ranks():
    batch_sizes = [LOCAL_BATCH] * 3
    per_rank = run_ranks(3, sharded_worker, (3,), batch_sizes)
    check_against_reference(per_rank, (3,), batch_sizes)


@pytest.mark.timeout(150)
def test_equivalence_four_ranks():
    batch_sizes = [LOCAL_BATCH] * 4
    per_rank = run_ranks(4, sharded_worker, (2, 4), batch_sizes)
    check_against_reference(per_rank, (2, 4), batch_sizes)


class TinyModel(nn.Module):
    def __init__(self, layout):
        super().__init__()
        self.project = nn.Linear(4, 5 * 3)
        self.bottleneck = ShardedKeyValueBottleneck(5, 16, 3, 4, layout=layout, seed=7)

    def forward(self, x):
        heads = self.project(x).view(x.shape[0], 5, 3)
        return self.bottleneck(heads)[0].mean(dim=(1, 2))


def ddp_and_faults_worker(rank, world_size):
    layout = ParallelLayout.build()
    torch.manual_seed(rank)  # different dense init per rank: DDP must sync it
    model = prepare_for_ddp(TinyModel(layout))
    shard_before = model.bottleneck.values.detach().clone()
    ddp = nn.parallel.DistributedDataParallel(model)
    shard_after_wrap = model.bottleneck.values.detach().clone()
    x = torch.randn(3, 4)
    ddp(x).pow(2).mean().backward()
    report = dict(
        shard_unchanged=bool(torch.equal(shard_before, shard_after_wrap)),
        first_codebook=model.bottleneck.first_codebook,
        dense_weight=model.project.weight.detach().clone(),
        value_grad_finite=bool(torch.isfinite(model.bottleneck.values.grad).all()),
    )
    # Distances stay differentiable w.r.t. the heads through the routing.
    heads = torch.randn(3, 5, 3, requires_grad=True)
    distance_module = ShardedKeyValueBottleneck(5, 16, 3, 4, layout=layout, seed=7, return_values_only=False)
    distance_module.freeze_keys()
    output = distance_module(heads)
    report["output_type"] = type(output).__name__
    output.distances.sum().backward()
    expected_grad = -2 * (heads.detach()[:, :, None, :] - distance_module(heads.detach())[1]).sum(2)
    report["heads_grad_ok"] = bool(torch.allclose(heads.grad, expected_grad, atol=1e-5))
    # Indices cached on the owners (1x2: my shard group is both ranks; 2x1: myself): values_at_rows
    # of my rows fetches what a frozen forward fetches.
    for num_shards in (2, 1):
        frozen = ShardedKeyValueBottleneck(5, 16, 3, 4, layout=ParallelLayout.build(num_shards), seed=7, topk=2).freeze_keys()
        x = torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(rank))
        expected = frozen(x)[0]
        owned = frozen.owned_indices(x).movedim(1, 0).to(torch.int16)  # [shard group's samples, C_mine, t]
        my_rows = torch.arange(3) + (3 * rank if num_shards == 2 else 0)
        report[f"cached_rows_{num_shards}"] = bool(torch.equal(frozen.values_at_rows(owned, my_rows), expected))
        # The trainer's cache: every sample's indices for my codebooks only, in the smallest type.
        learner = BottleneckLearner.__new__(BottleneckLearner)
        learner.ctx = SimpleNamespace(layout=frozen.layout, device=torch.device("cpu"))
        learner.bottleneck, learner.splitter = frozen, Chunker(5, 15, 3)
        features = torch.randn(11, 15, generator=torch.Generator().manual_seed(3))  # the same on every rank
        # A rank holds only its contiguous part of the rows' features (load_split), every row's label.
        first, last = shard_ranges(11, frozen.layout.world_size)[frozen.layout.rank]
        cache = learner.cache_owned_indices({"features": features[first:last], "rows": (first, last), "labels": torch.zeros(11)})
        start, stop = frozen.layout.codebook_range(5)
        single = KeyValueBottleneck(5, 16, 3, 4, seed=7, topk=2, return_values_only=False).freeze_keys()
        everything = single(features.view(11, 5, 3)).indices[..., 0]  # [N, C, t] from one process
        report[f"cache_{num_shards}"] = (tuple(cache.shape), cache.dtype, bool(torch.equal(cache.long(), everything[:, start:stop])))
    # A configuration that differs on one rank is an error everywhere, not a hang.
    try:
        ShardedKeyValueBottleneck(5, 16 + rank, 3, 4, layout=layout)
        report["mismatch_error"] = None
    except ValueError as error:
        report["mismatch_error"] = str(error)
    # Invalid input on one rank only: every rank raises instead of waiting in the all-to-all.
    module = ShardedKeyValueBottleneck(5, 16, 3, 4, layout=layout)
    bad = torch.randn(2, 5, 3) if rank == 0 else torch.full((2, 5, 3), float("nan"))
    try:
        module(bad)
        report["input_error"] = None
    except ValueError as error:
        report["input_error"] = str(error)
    # Frozen keys, counting off, nothing ever counted: every pair is masked; lookups still agree.
    module.freeze_keys()
    module.deactivate_counts()
    report["masked_output"] = module(torch.randn(2, 5, 3))[0].shape
    return report


@pytest.mark.timeout(120)
def test_ddp_wrap_faults_and_mismatched_configuration():
    reports = run_ranks(2, ddp_and_faults_worker)
    assert all(r["shard_unchanged"] for r in reports)
    assert [r["first_codebook"] for r in reports] == [0, 3]
    torch.testing.assert_close(reports[0]["dense_weight"], reports[1]["dense_weight"])  # DDP synced dense params
    assert all(r["value_grad_finite"] for r in reports)
    assert all(r["heads_grad_ok"] for r in reports)
    assert [r["output_type"] for r in reports] == ["BottleneckOutput"] * 2
    assert all(r["cached_rows_2"] and r["cached_rows_1"] for r in reports)
    assert [r["cache_2"] for r in reports] == [((11, 3, 2), torch.uint8, True), ((11, 2, 2), torch.uint8, True)]
    assert [r["cache_1"] for r in reports] == [((11, 5, 2), torch.uint8, True)] * 2
    for r in reports:
        assert r["mismatch_error"] is not None and "key_value_pairs_per_codebook" in r["mismatch_error"]
        assert r["input_error"] is not None and "rank(s) [1]" in r["input_error"]
        assert tuple(r["masked_output"]) == (2, 5, 1, 4)


def submesh_worker(rank, world_size):
    """A 4-rank job with mesh (dp=2, replica=1, shard=2): each dp half carries its own bottleneck."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("dp", "replica", "shard"))
    layout = ParallelLayout.from_mesh(mesh["replica", "shard"])
    module = ShardedKeyValueBottleneck(**CONFIGS["random"], layout=layout)
    dp = rank // 2
    x = global_batch(100 + dp, [LOCAL_BATCH, LOCAL_BATCH], CONFIGS["random"])  # each dp half its own data
    out = module(local_slice(x, layout.rank, [LOCAL_BATCH, LOCAL_BATCH]))
    return dict(layout=(layout.rank, layout.world_size, layout.codebook_range(5)), out=detached(out), state=module.full_state_dict())


@pytest.mark.timeout(120)
def test_a_slice_of_a_larger_jobs_mesh_carries_the_bottleneck():
    reports = run_ranks(4, submesh_worker)
    assert [r["layout"] for r in reports] == [(0, 2, (0, 3)), (1, 2, (3, 5))] * 2
    for dp in (0, 1):
        single = KeyValueBottleneck(**CONFIGS["random"])
        expected = detached(single(global_batch(100 + dp, [LOCAL_BATCH, LOCAL_BATCH], CONFIGS["random"])))
        for position in (0, 1):
            got = reports[2 * dp + position]
            for out, ref in zip(got["out"], expected):
                torch.testing.assert_close(out, local_slice(ref, position, [LOCAL_BATCH, LOCAL_BATCH]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["state"]["keys"], single.keys, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dims"):
        ParallelLayout.from_mesh(SimpleNamespace(ndim=1, mesh_dim_names=("shard",), shape=(2,)))
