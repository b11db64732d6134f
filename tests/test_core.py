"""KeyValueBottleneck against naive references written from the formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kvb_dist import KeyValueBottleneck
from kvb_dist.codebook import counter_uniform, nearest_keys, smoothed_cluster_size


def naive_step(keys, keys_avg, cluster_size, heads_cik, decay, eps):
    """One EMA step of the original formulation: full distance matrix and one-hot sums."""
    dist = (heads_cik[:, :, None, :] - keys[:, None, :, :]).pow(2).sum(-1)  # [c, i, j]
    indices = dist.argmin(-1)
    onehot = F.one_hot(indices, keys.shape[1]).float()  # [c, i, j]
    cluster_size = cluster_size * decay + onehot.sum(1) * (1 - decay)
    keys_avg = keys_avg * decay + torch.einsum("cik,cij->cjk", heads_cik, onehot) * (1 - decay)
    total = cluster_size.sum(-1, keepdim=True)
    smoothed = (cluster_size + eps) / (total + keys.shape[1] * eps) * total
    return indices, keys_avg / smoothed[..., None], keys_avg, cluster_size


def heads(batch, num_codebooks, dim, *spatial, seed=0):
    return torch.randn(batch, num_codebooks, *spatial, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spatial", [(), (5,), (2, 3, 4)])
def test_output_shapes(spatial):
    module = KeyValueBottleneck(3, 20, 4, 6, return_values_only=False)
    out = module(heads(2, 3, 4, *spatial))
    values, keys, indices, distances = out
    counts = out.counts
    assert values.shape == (2, 3, 1, *spatial, 6)
    assert keys.shape == (2, 3, 1, *spatial, 4)
    for extra in (indices, distances, counts):
        assert extra.shape == (2, 3, 1, *spatial, 1)
    assert indices.dtype == torch.int64
    (values_only,) = KeyValueBottleneck(3, 20, 4, 6)(heads(2, 3, 4, *spatial))
    assert values_only.shape == (2, 3, 1, *spatial, 6)


def test_outputs_and_ema_match_the_formulas():
    torch.manual_seed(0)
    module = KeyValueBottleneck(4, 32, 3, 5, decay=0.9, eps=1e-5, return_values_only=False, chunk_elements=50)
    keys, keys_avg = module.keys.clone(), module.keys_avg.clone()
    cluster_size = module.cluster_size.clone()
    for step in range(5):
        x = heads(8, 4, 3, 2, seed=step)
        queries = x.permute(1, 0, 2, 3).reshape(4, 16, 3)
        ref_indices, ref_keys, ref_avg, ref_size = naive_step(keys, keys_avg, cluster_size, queries, 0.9, 1e-5)
        values, fetched_keys, indices, distances = module(x)
        got_indices = indices[..., 0, :, 0].permute(1, 0, 2).reshape(4, 16)
        assert torch.equal(got_indices, ref_indices)
        # Fetched keys are the keys before the update; distances are -||head - key||^2.
        ref_fetched = keys[torch.arange(4)[:, None], ref_indices]  # [c, i, k]
        got_fetched = fetched_keys[:, :, 0].permute(1, 0, 2, 3).reshape(4, 16, 3)
        torch.testing.assert_close(got_fetched, ref_fetched)
        got_dist = distances[:, :, 0, :, 0].permute(1, 0, 2).reshape(4, 16)
        torch.testing.assert_close(got_dist, -(queries - ref_fetched).pow(2).sum(-1), rtol=1e-5, atol=1e-5)
        ref_values = module.values.detach()[torch.arange(4)[:, None], ref_indices]
        torch.testing.assert_close(values[:, :, 0].permute(1, 0, 2, 3).reshape(4, 16, 5), ref_values)
        torch.testing.assert_close(module.keys, ref_keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.keys_avg, ref_avg, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.cluster_size, ref_size)
        keys, keys_avg, cluster_size = ref_keys, ref_avg, ref_size


def test_chunked_and_unchunked_lookups_agree():
    queries = torch.randn(6, 300, 5)
    keys = torch.randn(6, 70, 5)
    excluded = torch.rand(6, 70) < 0.3
    seed = torch.tensor(3)
    common = dict(topk=3, excluded_cj=excluded, noise_seed=seed, codebook_ids=torch.arange(6), query_ids=torch.arange(300))
    for temperature in (0.0, 0.7):
        whole = nearest_keys(queries, keys, temperature=temperature, chunk_elements=10**9, **common)
        for chunk in (7, 71, 1000, 6 * 300 * 70 - 1):
            part = nearest_keys(queries, keys, temperature=temperature, chunk_elements=chunk, **common)
            assert torch.equal(whole[0], part[0])
            torch.testing.assert_close(whole[1], part[1])
        assert not excluded.gather(1, whole[0].reshape(6, -1)).any()


def test_topk_returns_the_nearest_keys_in_order():
    module = KeyValueBottleneck(2, 10, 3, 4, topk=4, return_values_only=False).freeze_keys()
    x = heads(5, 2, 3)
    _, _, indices, distances = module(x)
    assert indices.shape == (5, 2, 4, 1)
    dist = (x[:, :, None, :] - module.keys[None]).pow(2).sum(-1)  # [b, c, j]
    expected = dist.topk(4, dim=-1, largest=False).indices
    assert torch.equal(indices[..., 0], expected)
    assert (distances[:, :, :-1] >= distances[:, :, 1:]).all()  # nearest first (scores are -distance)


def test_temperature_samples_and_is_reproducible():
    module = KeyValueBottleneck(1, 8, 2, 3, sample_codebook_temperature=5.0, return_values_only=False, seed=5)
    module.freeze_keys()
    x = heads(400, 1, 2)
    first = module(x)[2].flatten()
    second = module(x)[2].flatten()
    nearest = (x[:, :, None] - module.keys[None]).pow(2).sum(-1).argmin(-1).flatten()
    assert (first != nearest).any()  # sampling, not argmin
    assert (first != second).any()  # a new step draws new noise
    again = KeyValueBottleneck(1, 8, 2, 3, sample_codebook_temperature=5.0, return_values_only=False, seed=5)
    assert torch.equal(again.freeze_keys()(x)[2].flatten(), first)
    uniform = counter_uniform(torch.tensor(1), torch.arange(100000))
    assert 0 < float(uniform.min()) and float(uniform.max()) < 1 and abs(float(uniform.mean()) - 0.5) < 0.01


def test_dead_pairs_are_replaced_by_batch_heads_with_their_state_reset():
    module = KeyValueBottleneck(2, 16, 3, 4, threshold_ema_dead_code=0.5, decay=0.9)
    x = heads(6, 2, 3) + 100.0  # far from every initial key: only a few pairs get chosen
    module(x)
    queries = x.permute(1, 0, 2).reshape(2, 6, 3)
    replaced = module.cluster_size == 0.5
    assert replaced.sum() >= 10
    assert int(module.num_replaced_pairs) == int(replaced.sum())
    for c, j in replaced.nonzero().tolist():
        assert any(torch.equal(module.keys[c, j], q) for q in queries[c])  # a real head of the batch
        torch.testing.assert_close(module.keys_avg[c, j], module.keys[c, j] * 0.5)
    # The reset state derives (almost exactly) the new key: the next step does not pull it back.
    derived = module.keys_avg / smoothed_cluster_size(module.cluster_size, module.eps)[..., None]
    torch.testing.assert_close(derived[replaced], module.keys[replaced], rtol=1e-3, atol=1e-3)


def test_the_combined_lookup_and_ema_step_learns_what_the_separate_calls_learn():
    # return_values_only=False copies the fetched keys before the EMA step changes them, so that
    # module takes the separate lookup and EMA calls; the other one does both per codebook.
    combined, separate = (
        KeyValueBottleneck(3, 40, 5, 4, threshold_ema_dead_code=0.3, decay=0.9, seed=2, return_values_only=only)
        for only in (True, False)
    )
    for step in range(3):
        x = heads(24, 3, 5, seed=step)
        (values,) = combined(x)
        assert torch.equal(values, separate(x).values)
    for name in ("keys", "keys_avg", "cluster_size", "num_replaced_pairs", "random_state"):
        assert torch.equal(getattr(combined, name), getattr(separate, name)), name
    assert int(combined.num_replaced_pairs) > 0


def test_kmeans_init_sets_consistent_ema_state():
    data = torch.cat([torch.randn(50, 1, 2) * 0.1 + torch.tensor([5.0, 5.0]), torch.randn(50, 1, 2) * 0.1 - 5.0])
    module = KeyValueBottleneck(1, 2, 2, 3, init_mode="kmeans", kmeans_iters=5, decay=0.99)
    module(data)
    centers = module.keys[0].sort(dim=0).values
    torch.testing.assert_close(centers, torch.tensor([[-5.0, -5.0], [5.0, 5.0]]), atol=0.1, rtol=0)
    assert module.keys_avg.abs().min() > 1.0  # not left at zero (the original's defect)
    derived = module.keys_avg / smoothed_cluster_size(module.cluster_size, module.eps)[..., None]
    torch.testing.assert_close(derived, module.keys, rtol=1e-4, atol=1e-4)


def test_unused_pairs_are_masked_when_counting_stops():
    module = KeyValueBottleneck(1, 50, 2, 3, return_values_only=False).freeze_keys()
    module(heads(3, 1, 2))
    used = module.cluster_size_counter[0] > 0
    assert 0 < int(used.sum()) <= 3
    assert module.fraction_of_unused_keys() == pytest.approx(1 - int(used.sum()) / 50)
    module.deactivate_counts()
    counter = module.cluster_size_counter.clone()
    indices = module(heads(200, 1, 2, seed=9))[2].flatten()
    assert used[indices].all()
    assert torch.equal(module.cluster_size_counter, counter)  # no counting while deactivated
    module.activate_counts()
    module.reset_cluster_size_counter()
    assert module.fraction_of_unused_keys() == 1.0


def test_gradients_reach_only_fetched_values():
    module = KeyValueBottleneck(3, 40, 2, 5, topk=2, return_values_only=False).freeze_keys()
    values, _, indices, _ = module(heads(4, 3, 2))
    values.sum().backward()
    fetched = torch.zeros(3, 40, dtype=torch.bool)
    for c in range(3):
        fetched[c, indices[:, c].flatten()] = True
    assert torch.equal(module.values.grad.abs().sum(-1) > 0, fetched)


def test_the_dense_value_gradient_reuses_its_memory_only_once_no_tensor_holds_it():
    import copy
    import io

    module = KeyValueBottleneck(3, 40, 2, 5, seed=0).freeze_keys()
    batch, weights = heads(16, 3, 2), torch.randn(16, 3, 1, 5)

    def gradient():
        (values,) = module(batch)
        (values * weights).sum().backward()
        grad, module.values.grad = module.values.grad, None
        return grad

    first = gradient()
    expected = first.clone()
    module.return_values_only = False
    flat = module(batch).indices.flatten(2) + torch.arange(3).view(1, 3, 1) * 40  # rows of the [c * j] table
    module.return_values_only = True
    reference = torch.zeros(3 * 40, 5).index_add_(0, flat.flatten(), weights.reshape(-1, 5)).view(3, 40, 5)
    torch.testing.assert_close(expected, reference)
    second = gradient()  # `first` is still held: fresh memory, `first` untouched
    assert second.data_ptr() != first.data_ptr() and torch.equal(first, expected) and torch.equal(second, expected)
    row_view, second_address = second[1], second.data_ptr()  # a view keeps the memory lent as well
    del first, second
    third = gradient()
    assert torch.equal(row_view, expected[1]) and third.data_ptr() != second_address
    address = third.data_ptr()
    del third, row_view
    fourth = gradient()  # nothing holds the memory any more: the same memory, zeroed again
    assert fourth.data_ptr() == address and torch.equal(fourth, expected)
    assert module._gradient_memory.zeros((0, 5), torch.float32).shape == (0, 5)  # a rank holding no codebooks

    del fourth
    (values,) = module(batch)
    (values * weights).sum().backward()
    (values,) = module(batch)
    (values * weights).sum().backward()  # accumulated into the gradient autograd already holds
    assert torch.equal(module.values.grad, expected + expected)

    buffer = io.BytesIO()  # a module whose memory is lent still copies and pickles
    torch.save(module, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(module), torch.load(buffer, weights_only=False)):
        other.values.grad = None
        (values,) = other(batch)
        (values * weights).sum().backward()
        assert torch.equal(other.values.grad, expected)


def test_heads_that_require_grad_leave_the_key_state_out_of_the_graph():
    module = KeyValueBottleneck(2, 8, 3, 4, init_mode="kmeans", threshold_ema_dead_code=0.5, return_values_only=False)
    x = heads(6, 2, 3).requires_grad_()
    for _ in range(2):
        values, _, _, distances = module(x)
        (values.sum() + distances.sum()).backward()
    for name in ("keys", "keys_avg", "cluster_size"):
        buffer = getattr(module, name)
        assert not buffer.requires_grad and buffer.grad_fn is None, name
    assert x.grad is not None  # distances stay differentiable w.r.t. the heads, as in the original


def test_state_dict_round_trip_and_original_checkpoints():
    module = KeyValueBottleneck(2, 8, 3, 4, threshold_ema_dead_code=0.1)
    for step in range(3):
        module(heads(5, 2, 3, seed=step))
    state = module.state_dict()
    assert set(state) == {"keys", "keys_avg", "cluster_size", "cluster_size_counter", "initted", "values", "random_state"}
    clone = KeyValueBottleneck(2, 8, 3, 4, threshold_ema_dead_code=0.1)
    clone.load_state_dict(state)
    x = heads(5, 2, 3, seed=42)
    for a, b in zip(module(x), clone(x)):
        torch.testing.assert_close(a, b)
    # The original code's checkpoints: no random_state, initted a float [1] tensor.
    original = {k: v for k, v in state.items() if k != "random_state"}
    original["initted"] = torch.Tensor([True])
    KeyValueBottleneck(2, 8, 3, 4).load_state_dict(original)
    with pytest.raises(ValueError, match="key_value_pairs_per_codebook"):
        KeyValueBottleneck(2, 9, 3, 4).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(topk=9), "topk"),
        (dict(init_mode="faiss"), "init_mode"),
        (dict(decay=1.5), "decay"),
        (dict(num_codebooks=0), "num_codebooks"),
        (dict(eps=0.0), "eps"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(num_codebooks=2, key_value_pairs_per_codebook=8, dim_keys=3, dim_values=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        KeyValueBottleneck(**args)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(4, 2), "shape"),
        (torch.randn(4, 3, 3), "num_codebooks=2"),
        (torch.randn(4, 2, 5), "dim_keys=3"),
        (torch.tensor([[[1.0, float("inf"), 0.0]] * 2]), "NaN or infinite"),
        (torch.ones(4, 2, 3, dtype=torch.int64), "floating point"),
    ],
)
def test_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        KeyValueBottleneck(2, 8, 3, 4)(x)


def test_autocast_and_half_inputs_use_fp32_codebook_math():
    module = KeyValueBottleneck(2, 8, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (values,) = module(heads(3, 2, 3).bfloat16())
    assert values.dtype == torch.float32 and module.keys.dtype == torch.float32


@pytest.mark.parametrize("topk", [0, 9, -1, 1.0, 2.5, True, "2"])
def test_topk_is_checked_on_assignment(topk):
    module = KeyValueBottleneck(2, 8, 3, 4, topk=2)
    with pytest.raises(ValueError, match=r"topk must be an integer in \[1, key_value_pairs_per_codebook=8\]"):
        module.topk = topk
    assert module.topk == 2  # a rejected value leaves the module as it was


def test_topk_assignment_is_used_and_survives_copies():
    import copy
    import io

    module = KeyValueBottleneck(2, 8, 3, 4, return_values_only=False).freeze_keys()
    module.topk = 3
    assert module(heads(4, 2, 3)).indices.shape == (4, 2, 3, 1)
    assert "topk=3" in repr(module) and "topk" not in module.state_dict()
    assert copy.deepcopy(module).topk == 3
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).topk == 3


@pytest.mark.parametrize("seed", [1.5, "3", True, 2**64])
def test_seed_must_be_an_integer(seed):
    with pytest.raises(ValueError, match="seed must be None or an integer"):
        KeyValueBottleneck(2, 8, 3, 4, seed=seed)


def test_integer_seeds_of_any_kind_are_accepted():
    import numpy as np

    first = KeyValueBottleneck(2, 8, 3, 4, seed=np.int64(3))
    assert torch.equal(first.keys, KeyValueBottleneck(2, 8, 3, 4, seed=3).keys)
    assert KeyValueBottleneck(2, 8, 3, 4, seed=None).random_state.dtype == torch.int64


@pytest.mark.parametrize(
    "bad, match",
    [
        (float("nan"), "cluster_size contains NaN or infinite values"),
        (float("inf"), "cluster_size contains NaN or infinite values"),
        (-1.0, "cluster_size contains negative values"),
    ],
)
def test_set_keys_rejects_bad_cluster_sizes(bad, match):
    module = KeyValueBottleneck(2, 8, 3, 4)
    cluster_size = torch.ones(2, 8)
    cluster_size[1, 3] = bad
    before = module.keys.clone()
    with pytest.raises(ValueError, match=match):
        module.set_keys_(torch.randn(2, 8, 3), cluster_size)
    assert torch.equal(module.keys, before)


@pytest.mark.parametrize(
    "name, bad, match",
    [
        ("keys", float("nan"), "'keys' contains NaN or infinite values"),
        ("keys", float("-inf"), "'keys' contains NaN or infinite values"),
        ("keys_avg", float("inf"), "'keys_avg' contains NaN or infinite values"),
        ("cluster_size", float("nan"), "'cluster_size' contains NaN or infinite values"),
        ("cluster_size", -0.5, "'cluster_size' contains negative values"),
        ("cluster_size_counter", -1.0, "'cluster_size_counter' contains negative values"),
    ],
)
def test_loading_corrupt_codebook_state_names_the_entry(name, bad, match):
    state = KeyValueBottleneck(2, 8, 3, 4, seed=0).state_dict()
    state[name] = state[name].clone()
    state[name].view(-1)[5] = bad
    target = KeyValueBottleneck(2, 8, 3, 4, seed=1)
    before = target.keys.clone()
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    assert torch.equal(target.keys, before)
    # Under a prefix (the bottleneck inside a model) the message names the full entry.
    wrapper = nn.Sequential(KeyValueBottleneck(2, 8, 3, 4, seed=1))
    with pytest.raises(ValueError, match=f"'0.{name}'"):
        wrapper.load_state_dict({f"0.{k}": v for k, v in state.items()})


def test_loading_good_state_still_works_after_the_checks():
    module = KeyValueBottleneck(2, 8, 3, 4, seed=0)
    module(heads(5, 2, 3))
    clone = KeyValueBottleneck(2, 8, 3, 4, seed=1)
    clone.load_state_dict(module.original_state_dict())
    assert torch.equal(clone.keys, module.keys) and torch.equal(clone.cluster_size, module.cluster_size)


def test_initted_is_read_from_its_buffer_only_after_it_changed(monkeypatch):
    # A step does not read the flag every time (a GPU would wait for it), but every change counts.
    module = KeyValueBottleneck(2, 8, 3, 4, init_mode="kmeans", kmeans_iters=1, seed=0)
    fits, reads = [], []
    fit = module._kmeans_init_
    monkeypatch.setattr(module, "_kmeans_init_", lambda *args: (fits.append(1), fit(*args)))
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: (reads.append(t is module.initted), item(t))[1])
    x = heads(16, 2, 3)
    for _ in range(3):
        module(x)
    assert len(fits) == 1 and sum(reads) == 2  # read before and after the fit, not at every step
    module.initted.zero_()  # an in-place write
    module(x)
    assert len(fits) == 2
    state = module.state_dict()
    state["initted"] = torch.zeros(1)
    module.load_state_dict(state)  # a checkpoint of a module not fitted yet
    module(x)
    assert len(fits) == 3
