"""Values learn only where they are fetched: sparse value gradients and row-wise optimizers.

With sparse_values the gradient of `values` holds the fetched rows only, so SGD, SparseAdam
(lazy Adam) and Adagrad leave every other row bit for bit as it was; sharded training sums
the rows over replicas and equals one process on the concatenated batch.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvb_dist.core import KeyValueBottleneck
from kvb_dist.distributed.layout import ParallelLayout
from kvb_dist.distributed.sharded import ShardedKeyValueBottleneck
from kvb_dist.distributed.spawn import run_ranks
from kvb_dist.run.phases.train import clip_gradients_

pytestmark = pytest.mark.timeout(180)

CONFIG = dict(num_codebooks=5, key_value_pairs_per_codebook=64, dim_keys=3, dim_values=4, topk=2, seed=11)
OPTIMIZERS = {"sgd": torch.optim.SGD, "sparse_adam": torch.optim.SparseAdam, "adagrad": torch.optim.Adagrad}
GLOBAL_BATCH, STEPS = 8, 4


def batch(task: int, step: int) -> torch.Tensor:
    """Task A's heads sit near +1, task B's near -1: they fetch mostly different pairs."""
    g = torch.Generator().manual_seed(100 * task + step)
    return torch.randn(GLOBAL_BATCH, 5, 3, generator=g) * 0.3 + (1.0 if task == 0 else -1.0)


def train(module, optimizer_name, rank=0, world_size=1):
    """STEPS steps on task A, then STEPS on task B; returns values after A, after B, and the pairs B fetched."""
    local = GLOBAL_BATCH // world_size
    optimizer = OPTIMIZERS[optimizer_name]([module.values], lr=0.1)
    weights = torch.linspace(-1, 1, 4)
    snapshots, fetched_by_b = [], torch.zeros(module.values.shape[:2], dtype=torch.bool)
    for task in (0, 1):
        for step in range(STEPS):
            x = batch(task, step)[rank * local : (rank + 1) * local]
            optimizer.zero_grad()
            out = module(x)
            (out[0] * weights).flatten(1).sum(1).mean().backward()
            optimizer.step()
            if task == 1:  # rows of my codebooks that B fetched, from any rank: where the grad is
                fetched_by_b |= module.values.grad.coalesce().to_dense().abs().sum(-1) > 0
        snapshots.append(module.values.detach().clone())
    return snapshots, fetched_by_b, optimizer


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_rows_only_task_a_fetched_do_not_move_while_task_b_trains(optimizer_name):
    module = KeyValueBottleneck(**CONFIG, sparse_values=True, return_values_only=True).freeze_keys()
    (after_a, after_b), fetched_by_b, _ = train(module, optimizer_name)
    assert module.values.grad.is_sparse
    untouched = ~fetched_by_b
    assert untouched.sum() > 0 and fetched_by_b.sum() > 0
    assert torch.equal(after_b[untouched], after_a[untouched])  # bit for bit
    assert not torch.equal(after_b[fetched_by_b], after_a[fetched_by_b])


def test_dense_adam_moves_rows_it_no_longer_fetches():
    # Why the launcher uses sparse values: Adam's momentum keeps moving task A's rows during B.
    module = KeyValueBottleneck(**CONFIG).freeze_keys()
    optimizer = torch.optim.Adam([module.values], lr=0.1)
    weights = torch.linspace(-1, 1, 4)
    fetched_by_b = torch.zeros(5, 64, dtype=torch.bool)
    for task in (0, 1):
        for step in range(STEPS):
            optimizer.zero_grad()
            (module(batch(task, step))[0] * weights).flatten(1).sum(1).mean().backward()
            optimizer.step()
            if task == 1:
                fetched_by_b |= module.values.grad.abs().sum(-1) > 0
        if task == 0:
            after_a = module.values.detach().clone()
    assert not torch.equal(module.values.detach()[~fetched_by_b], after_a[~fetched_by_b])


def sharded_worker(rank, world_size, layouts):
    results = {}
    for num_shards in layouts:
        for name in OPTIMIZERS:
            layout = ParallelLayout.build(num_shards)
            module = ShardedKeyValueBottleneck(**CONFIG, sparse_values=True, layout=layout).freeze_keys()
            (after_a, after_b), fetched_by_b, optimizer = train(module, name, rank, world_size)
            state = {k: v.clone() for k, v in optimizer.state[module.values].items() if isinstance(v, torch.Tensor) and v.ndim}
            results[(num_shards, name)] = dict(
                codebooks=layout.codebook_range(5), after_a=after_a, after_b=after_b, fetched_by_b=fetched_by_b, state=state
            )
    return results


@pytest.mark.parametrize("world_size, layouts", [(2, (2, 1)), (4, (2,))])
def test_sharded_sparse_training_equals_one_process(world_size, layouts):
    per_rank = run_ranks(world_size, sharded_worker, layouts)
    for name in OPTIMIZERS:
        single = KeyValueBottleneck(**CONFIG, sparse_values=True).freeze_keys()
        (ref_a, ref_b), _, optimizer = train(single, name)
        ref_state = {k: v for k, v in optimizer.state[single.values].items() if isinstance(v, torch.Tensor) and v.ndim}
        for num_shards in layouts:
            for rank, results in enumerate(per_rank):
                got = results[(num_shards, name)]
                start, stop = got["codebooks"]
                where = f"{name}, {world_size // num_shards} x {num_shards}, rank {rank}"
                torch.testing.assert_close(got["after_a"], ref_a[start:stop], atol=1e-6, rtol=1e-6, msg=where)
                torch.testing.assert_close(got["after_b"], ref_b[start:stop], atol=1e-6, rtol=1e-6, msg=where)
                for key, tensor in ref_state.items():
                    torch.testing.assert_close(got["state"][key], tensor[start:stop], atol=1e-6, rtol=1e-6, msg=f"{where}: {key}")
                untouched = ~got["fetched_by_b"]
                assert torch.equal(got["after_b"][untouched], got["after_a"][untouched]), where


def test_clipping_sparse_gradients_equals_the_dense_computation():
    x = batch(0, 0)
    grads, norms = [], []
    for sparse in (True, False):
        module = KeyValueBottleneck(**CONFIG, sparse_values=sparse).freeze_keys()
        (module(x)[0] * 3.0).sum().backward()  # rows fetched several times: duplicates to coalesce
        learner = SimpleNamespace(parameters=lambda: [module.values], sharded=False)
        norms.append(clip_gradients_(learner, max_norm=0.5, layout=ParallelLayout.single()))
        grads.append(module.values.grad.to_dense() if sparse else module.values.grad)
    assert norms[0] == pytest.approx(norms[1], rel=1e-6) and norms[0] > 0.5
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-6)
    assert float(grads[0].norm()) == pytest.approx(0.5, rel=1e-4)


def ema_worker(rank, world_size):
    """2 replicas x 1 shard: the EMA step gathers the replicas' queries and indices in batch order,
    so the keys are bit-identical to one process's on the concatenated batch."""
    layout = ParallelLayout.build(num_shards=1)
    config = dict(seed=2, decay=0.9, threshold_ema_dead_code=0.3)
    module = ShardedKeyValueBottleneck(5, 64, 3, 4, layout=layout, **config)
    one_process = KeyValueBottleneck(5, 64, 3, 4, **config)
    identical = []
    for step in range(3):
        batches = [torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(10 * step + r)) for r in range(world_size)]
        module(batches[rank])
        one_process(torch.cat(batches))
        identical.append(all(
            torch.equal(getattr(module, name), getattr(one_process, name)) for name in ("keys", "keys_avg", "cluster_size")
        ) and int(module.num_replaced_pairs) == int(one_process.num_replaced_pairs) > 0)
    return identical


@pytest.mark.timeout(60)
def test_ema_step_over_replicas_is_bit_identical_to_one_process():
    assert run_ranks(2, ema_worker) == [[True] * 3] * 2
