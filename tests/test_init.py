"""Initial state: built on the module's device, identical in any layout, or not built at all (meta).

Every check runs in one process: a ParallelLayout with no process groups but a rank and a shard
count stands for one rank of a larger layout (its collectives are no-ops), which is what lets a
rank's slice be compared with the single-process module without starting processes.
"""

from __future__ import annotations

import time

import pytest
import torch

from kvb_dist import KeyValueBottleneck
from kvb_dist.codebook import counter_hash
from kvb_dist.core import seeded_normal
from kvb_dist.distributed import checkpoint as dcp_checkpoint
from kvb_dist.distributed.layout import ParallelLayout
from kvb_dist.distributed.sharded import ShardedKeyValueBottleneck
from kvb_dist.run import builders
from kvb_dist.run.config import Config

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Every tensor a bottleneck holds: the original's state-dict entries and random_state.
ORIGINAL_AND_RANDOM_STATE = ("initted", "cluster_size", "cluster_size_counter", "keys_avg", "keys", "values", "random_state")


def tensors(module):
    return {**dict(module.named_buffers()), **dict(module.named_parameters())}


def heads(batch, num_codebooks, dim, seed=0):
    return torch.randn(batch, num_codebooks, dim, generator=torch.Generator().manual_seed(seed))


def rank_of(world_size: int, num_shards: int, rank: int) -> ParallelLayout:
    """Rank `rank` of a world_size / num_shards layout, without processes (collectives are no-ops)."""
    return ParallelLayout(world_size=world_size, rank=rank, num_shards=num_shards)


def earlier_seeded_normal(seed, tag, first_codebook, shape):
    """seeded_normal as first released: one hash and one torch.randn per codebook."""
    out = torch.empty(shape)
    generator = torch.Generator()
    for i in range(shape[0]):
        codebook_seed = counter_hash(torch.tensor(seed), torch.tensor(tag), torch.tensor(first_codebook + i))
        generator.manual_seed(int(codebook_seed) & ((1 << 63) - 1))
        out[i] = torch.randn(*shape[1:], generator=generator)
    return out


# ---------------------------------------------------------------------------------------------
# The device keyword


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta", torch.device("meta")])
@pytest.mark.parametrize("init_mode", ["random", "kmeans"])
def test_every_tensor_is_built_on_the_given_device(device, init_mode):
    module = KeyValueBottleneck(3, 16, 4, 5, init_mode=init_mode, seed=2, device=device)
    assert {name: t.device.type for name, t in tensors(module).items()} == {
        name: torch.device(device).type for name in ORIGINAL_AND_RANDOM_STATE
    }
    assert isinstance(module.values, torch.nn.Parameter) and module.values.requires_grad
    assert module.keys.dtype == module.values.dtype == torch.float32 and module.random_state.dtype == torch.int64
    assert module.num_replaced_pairs.device.type == torch.device(device).type  # no buffer, but with the state
    # The sharded module takes it through **kwargs.
    sharded = ShardedKeyValueBottleneck(3, 16, 4, 5, init_mode=init_mode, layout=rank_of(2, 2, 1), seed=2, device=device)
    assert {t.device.type for t in tensors(sharded).values()} == {torch.device(device).type}


def test_cpu_state_is_what_it_was_before_the_device_keyword():
    default = KeyValueBottleneck(3, 16, 4, 5, seed=11)
    on_cpu = KeyValueBottleneck(3, 16, 4, 5, seed=11, device="cpu")
    for name, t in tensors(default).items():
        assert torch.equal(t, tensors(on_cpu)[name]), name
    # The numbers of the first release: checkpoints and results stay comparable.
    assert torch.equal(default.keys, earlier_seeded_normal(11, 1, 0, (3, 16, 4)))
    assert torch.equal(default.values, earlier_seeded_normal(11, 2, 0, (3, 16, 5)))


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_numbers_do_not_depend_on_the_thread_count(threads):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        drawn = seeded_normal(5, 1, 2, (7, 33, 6))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(drawn, earlier_seeded_normal(5, 1, 2, (7, 33, 6)))


@pytest.mark.parametrize("device", ["nonsense", 1.5, object()])
def test_a_bad_device_is_a_value_error(device):
    with pytest.raises(ValueError, match="device must be None, a torch.device or a device string"):
        KeyValueBottleneck(2, 8, 3, 4, device=device)


# ---------------------------------------------------------------------------------------------
# Any layout holds the slice one process builds


@pytest.mark.parametrize("num_codebooks, num_shards", [(7, 3), (5, 2), (4, 4), (3, 1)])
def test_every_split_of_codebooks_draws_the_single_process_slice(num_codebooks, num_shards):
    full = KeyValueBottleneck(num_codebooks, 16, 3, 4, seed=21)
    for num_replicas in (1, 2):
        world_size = num_shards * num_replicas
        for rank in range(world_size):
            part = ShardedKeyValueBottleneck(num_codebooks, 16, 3, 4, layout=rank_of(world_size, num_shards, rank), seed=21)
            start, stop = part.layout.codebook_range(num_codebooks)
            assert part.first_codebook == start
            for name in ("keys", "keys_avg", "values", "cluster_size"):
                assert torch.equal(getattr(part, name), getattr(full, name)[start:stop]), (rank, name)
            assert torch.equal(part.random_state, full.random_state)


def test_a_codebooks_numbers_depend_on_seed_tag_and_index_only():
    full = seeded_normal(3, 2, 0, (9, 10, 4))
    assert torch.equal(seeded_normal(3, 2, 4, (3, 10, 4)), full[4:7])
    assert not torch.equal(seeded_normal(3, 1, 0, (9, 10, 4)), full)  # keys and values are apart
    assert not torch.equal(seeded_normal(4, 2, 0, (9, 10, 4)), full)
    assert seeded_normal(3, 2, 0, (0, 10, 4)).shape == (0, 10, 4)


@CUDA
def test_cuda_draws_on_the_device_and_any_split_gives_the_same_slice():
    full = seeded_normal(3, 2, 0, (9, 100, 40), device="cuda")
    assert full.device.type == "cuda"
    assert torch.equal(seeded_normal(3, 2, 4, (3, 100, 40), device="cuda"), full[4:7])
    module = KeyValueBottleneck(5, 64, 8, 4, seed=1, device="cuda")
    assert {t.device.type for t in tensors(module).values()} == {"cuda"}
    part = ShardedKeyValueBottleneck(5, 64, 8, 4, layout=rank_of(2, 2, 1), seed=1, device="cuda")
    assert torch.equal(part.keys, module.keys[3:]) and torch.equal(part.values, module.values[3:])
    x = heads(6, 5, 8).cuda()
    assert module(x)[0].device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# Meta: nothing allocated or drawn; to_empty + load gives the module back


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_design_size_module_on_meta_is_instant_and_takes_no_memory(monkeypatch):
    def no_random_numbers(*args, **kwargs):
        raise AssertionError("a meta module must draw nothing")

    monkeypatch.setattr("kvb_dist.core.counter_hash", no_random_numbers)
    resident = _resident_bytes()
    started = time.perf_counter()
    # 1024 x 65536 x 128: about 100 GB of state on a real device.
    module = ShardedKeyValueBottleneck(1024, 65536, 128, 128, layout=rank_of(1, 1, 0), seed=0, device="meta")
    elapsed = time.perf_counter() - started
    assert all(t.is_meta for t in tensors(module).values())
    assert module.keys.shape == (1024, 65536, 128)
    assert elapsed < 2.0, elapsed
    assert _resident_bytes() - resident < 64 * 2**20


LEARNING = dict(threshold_ema_dead_code=0.3, return_values_only=False)  # dead pairs get replaced: random_state matters


def _trained(init_mode="random", steps=3):
    module = KeyValueBottleneck(3, 16, 4, 5, init_mode=init_mode, **LEARNING, seed=9)
    for step in range(steps):
        module(heads(12, 3, 4, seed=step))
    return module


def _assert_same_module(a, b, steps=3):
    for name, t in tensors(a).items():
        assert torch.equal(t, tensors(b)[name]), name
    for step in range(10, 10 + steps):  # learning steps (dead-pair replacement uses random_state) ...
        x = heads(12, 3, 4, seed=step)
        for u, v in zip(a(x), b(x)):
            assert torch.equal(u, v)
    a.freeze_keys(), b.freeze_keys()  # ... and frozen lookups
    x = heads(7, 3, 4, seed=99)
    for u, v in zip(a(x), b(x)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("init_mode", ["random", "kmeans"])
def test_meta_then_to_empty_then_load_state_dict_is_the_original(init_mode):
    original = _trained(init_mode)
    state = original.state_dict()
    module = KeyValueBottleneck(3, 16, 4, 5, init_mode=init_mode, **LEARNING, seed=1, device="meta")
    assert module.to_empty(device="cpu") is module
    assert not any(t.is_meta for t in tensors(module).values())
    assert module.num_replaced_pairs.device.type == "cpu" and int(module.num_replaced_pairs) == 0
    module.load_state_dict(state)
    _assert_same_module(original, module)


def test_load_state_dict_with_assign_materializes_a_meta_module():
    original = _trained()
    module = KeyValueBottleneck(3, 16, 4, 5, **LEARNING, seed=1, device="meta")
    # assign keeps the entries' dtypes: float64 codebook state comes back float32, as a copy would.
    # (Cloned: assign takes the tensors themselves, which would share memory with the original.)
    state = {name: t.double() if name in ("keys", "cluster_size") else t.clone() for name, t in original.state_dict().items()}
    module.load_state_dict(state, assign=True)
    assert isinstance(module.values, torch.nn.Parameter) and module.values.requires_grad
    assert module.keys.dtype == module.cluster_size.dtype == torch.float32
    _assert_same_module(original, module)


def test_the_seed_survives_to_empty_when_the_checkpoint_has_none():
    original = _trained()
    legacy = original.original_state_dict()  # the original code's names: no random_state
    for materialize in ("to_empty", "assign"):
        module = KeyValueBottleneck(3, 16, 4, 5, **LEARNING, seed=9, device="meta")
        if materialize == "to_empty":
            module.to_empty(device="cpu")
            assert module.random_state.tolist() == [9, 0]
            module.load_state_dict(legacy)
        else:
            module.load_state_dict({name: t.clone() for name, t in legacy.items()}, assign=True)
        assert module.random_state.tolist() == [9, 0], materialize
    # A module built with that seed and loaded the same way continues identically.
    fresh = KeyValueBottleneck(3, 16, 4, 5, **LEARNING, seed=9)
    fresh.load_state_dict(legacy)
    _assert_same_module(fresh, module)


def test_a_forward_before_materializing_raises_a_clear_error():
    module = KeyValueBottleneck(2, 8, 3, 4, seed=0, device="meta")
    with pytest.raises(ValueError, match="built on the meta device.*to_empty"):
        module(heads(2, 2, 3))
    # Copying into meta tensors is a no-op (torch warns): still no state, still the same error.
    with pytest.warns(UserWarning, match="meta"):
        module.load_state_dict(KeyValueBottleneck(2, 8, 3, 4, seed=0).state_dict())
    with pytest.raises(ValueError, match="built on the meta device"):
        module(heads(2, 2, 3))
    sharded = ShardedKeyValueBottleneck(2, 8, 3, 4, layout=ParallelLayout.single(), seed=0, device="meta")
    with pytest.raises(ValueError, match="ShardedKeyValueBottleneck holds no state yet"):
        sharded(heads(2, 2, 3))  # on every rank alike: the problem travels in the call agreement
    with pytest.raises(ValueError, match="holds no state yet"):
        module.values_at(torch.zeros(2, 2, 1, dtype=torch.int64))


def test_sharded_value_gradients_keep_their_replica_hook_through_materialization():
    # Rank 0 of 2 replicas x 1 shard: the hook divides the gradient by the world size (2).
    def build(device=None):
        return ShardedKeyValueBottleneck(3, 16, 4, 5, layout=rank_of(2, 1, 0), seed=4, device=device).freeze_keys()

    reference = build()
    loaded = build("meta").to_empty(device="cpu")
    loaded.load_state_dict(reference.state_dict())
    assigned = build("meta")
    assigned.load_state_dict({name: t.clone() for name, t in reference.state_dict().items()}, assign=True)
    x = heads(6, 3, 4)
    for module in (reference, loaded, assigned):
        module(x)[0].sum().backward()
    plain = KeyValueBottleneck(3, 16, 4, 5, seed=4).freeze_keys()
    plain(x)[0].sum().backward()
    torch.testing.assert_close(reference.values.grad, plain.values.grad / 2)
    assert torch.equal(loaded.values.grad, reference.values.grad)
    assert torch.equal(assigned.values.grad, reference.values.grad)
    assert len(loaded._values_grad_hooks) == 1  # registered again, not added twice


# ---------------------------------------------------------------------------------------------
# Checkpoints and the launcher's builder


def test_a_dcp_load_refuses_meta_tensors_and_fills_a_materialized_module(tmp_path):
    layout = ParallelLayout.single()
    original = ShardedKeyValueBottleneck(3, 16, 4, 5, layout=layout, seed=6, return_values_only=False)
    original(heads(8, 3, 4))
    dcp_checkpoint.save(original.sharded_state_dict(), tmp_path / "ckpt", layout)
    module = ShardedKeyValueBottleneck(3, 16, 4, 5, layout=layout, seed=1, return_values_only=False, device="meta")
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        dcp_checkpoint.load_(module.sharded_state_dict(), tmp_path / "ckpt", layout)
    module.to_empty(device="cpu")
    dcp_checkpoint.load_(module.sharded_state_dict(), tmp_path / "ckpt", layout)
    _assert_same_module(original, module)


def test_the_builder_materializes_from_checkpoint_without_drawing(monkeypatch):
    config = Config()
    config.bottleneck.num_codebooks, config.bottleneck.key_value_pairs_per_codebook = 4, 32
    drawn = builders.build_bottleneck(config, ParallelLayout.single(), device=torch.device("cpu"))
    assert drawn.keys.device.type == "cpu" and drawn.sparse_values and not drawn.return_values_only
    reference = KeyValueBottleneck(4, 32, config.bottleneck.dim_keys, config.bottleneck.dim_values, seed=config.run.seed)
    assert torch.equal(drawn.keys, reference.keys) and torch.equal(drawn.values, reference.values)

    monkeypatch.setattr("kvb_dist.core.counter_hash", lambda *a, **k: pytest.fail("nothing may be drawn"))
    empty = builders.build_bottleneck(config, ParallelLayout.single(), device=torch.device("cpu"), from_checkpoint=True)
    assert {t.device.type for t in tensors(empty).values()} == {"cpu"}
    assert empty.random_state.tolist() == [config.run.seed, 0]
    assert builders.build_bottleneck(config, ParallelLayout.single(), from_checkpoint=True).keys.device.type == "cpu"
