"""Splitters, encoder wrappers and decoders; the last tests use the real offline EfficientNet-Lite0.

Shape legend: b batch, n positions, d channels, C codebooks, t topk, k key dim, v value dim.
"""

import sys

import numpy as np
import pytest
import torch
from torch import nn

from kvb_dist import (
    MLP,
    BottleneckedEncoder,
    Chunker,
    CodebookVoting,
    DinoBottleneckedEncoder,
    EfficientNetBottleneckedEncoder,
    EfficientNetLite0Encoder,
    LearnedDownProjection,
    LinearProbe,
    RandomDownProjection,
    imagenet_preprocess,
)

pytestmark = pytest.mark.timeout(120)


def make_wrapper(num_channels=12, num_codebooks=3, pairs=8, dim_keys=4, dim_values=5, **kwargs):
    kwargs.setdefault("splitting_mode", "chunk")
    return BottleneckedEncoder(
        nn.Identity(), num_channels, num_codebooks, pairs, dim_keys, dim_values, **kwargs
    )


# ----------------------------------------------------------------------------------------------
# Splitters


def test_chunker_cuts_consecutive_channels():
    x = torch.randn(2, 5, 12)  # [b, n, (C k)]
    heads = Chunker(num_codebooks=3, num_channels=12)(x)
    assert heads.shape == (2, 3, 5, 4)
    for c in range(3):
        torch.testing.assert_close(heads[:, c], x[..., 4 * c : 4 * c + 4])


def test_chunker_rejects_channels_that_do_not_split():
    with pytest.raises(ValueError, match="num_channels"):
        Chunker(num_codebooks=3, num_channels=10)
    with pytest.raises(ValueError, match="num_channels == num_codebooks \\* dim_keys"):
        Chunker(num_codebooks=3, num_channels=12, dim_keys=5)
    with pytest.raises(ValueError, match="num_channels=12"):
        Chunker(num_codebooks=3, num_channels=12)(torch.randn(2, 5, 11))


def test_random_projection_is_a_fixed_normalized_buffer():
    torch.manual_seed(0)
    splitter = RandomDownProjection(num_codebooks=3, num_channels=10, dim_keys=4)
    assert list(splitter.state_dict()) == ["rand_proj"]
    assert not list(splitter.parameters())
    assert splitter.rand_proj.shape == (3, 10, 4)  # [C, d, k]
    torch.testing.assert_close(splitter.rand_proj.norm(dim=1), torch.ones(3, 4))
    x = torch.randn(2, 5, 10)
    heads = splitter(x)
    assert heads.shape == (2, 3, 5, 4)
    for c in range(3):
        torch.testing.assert_close(heads[:, c], x @ splitter.rand_proj[c])


def test_learned_projection_layout_is_keys_outer_codebooks_inner():
    splitter = LearnedDownProjection(num_codebooks=3, num_channels=10, dim_keys=4)
    assert list(splitter.state_dict()) == ["proj.weight"]
    assert splitter.proj.weight.shape == (12, 10) and splitter.proj.bias is None
    x = torch.randn(2, 5, 10)
    heads = splitter(x)
    flat = x @ splitter.proj.weight.T  # [b, n, (k C)]
    assert heads.shape == (2, 3, 5, 4)
    for c in range(3):
        for k in range(4):
            torch.testing.assert_close(heads[:, c, :, k], flat[..., k * 3 + c])
    heads.sum().backward()
    assert splitter.proj.weight.grad is not None


# ----------------------------------------------------------------------------------------------
# BottleneckedEncoder: shapes and layouts


@pytest.mark.parametrize("spatial", [(), (1, 1), (3, 4)])
@pytest.mark.parametrize("channel_last", [True, False])
@pytest.mark.parametrize("concat", [False, True])
def test_wrapper_output_layouts(spatial, channel_last, concat):
    torch.manual_seed(0)
    C, d, k, v, topk, b = 3, 12, 4, 5, 2, 2
    model = make_wrapper(
        d, C, 8, k, v, topk=topk, encoder_is_channel_last=channel_last, concat_values_from_all_codebooks=concat
    )
    features = torch.randn(b, *spatial, d) if channel_last or not spatial else torch.randn(b, d, *spatial)
    for t in (1, topk):  # keys learning fetch 1 pair, frozen keys fetch topk
        if t == topk:
            model.freeze_keys()
        values = model(features)
        if concat:
            expected = (b, *spatial, C * t * v) if channel_last else (b, C * t * v, *spatial)
        else:
            expected = (b, C, t, *spatial, v) if channel_last else (b, C, t, v, *spatial)
        assert values.shape == expected


def test_concatenation_orders_features_codebook_topk_value():
    torch.manual_seed(0)
    model = make_wrapper(topk=2, encoder_is_channel_last=True).freeze_keys()
    features = torch.randn(2, 3, 4, 12)  # [b, h, w, d]
    separate = model(features)  # [b, C, t, h, w, v]
    model.concat_values_from_all_codebooks = True
    concatenated = model(features)  # [b, h, w, (C t v)]
    torch.testing.assert_close(concatenated, separate.permute(0, 3, 4, 1, 2, 5).reshape(2, 3, 4, -1))


def test_channel_first_values_equal_channel_last_values_moved():
    torch.manual_seed(0)
    last = make_wrapper(topk=2).freeze_keys()
    first = make_wrapper(topk=2, encoder_is_channel_last=False).freeze_keys()
    first.load_state_dict(last.state_dict())
    features = torch.randn(2, 3, 4, 12)  # [b, h, w, d]
    torch.testing.assert_close(first(features.permute(0, 3, 1, 2)), last(features).movedim(-1, 3))


@pytest.mark.parametrize("channel_last", [True, False])
def test_wrapper_extra_outputs(channel_last):
    torch.manual_seed(0)
    C, d, k, v, t, b, h, w = 3, 12, 4, 5, 2, 2, 3, 4
    model = make_wrapper(
        d, C, 8, k, v, topk=t, return_values_only=False, encoder_is_channel_last=channel_last,
        concat_values_from_all_codebooks=True,
    ).freeze_keys()
    features = torch.randn(b, h, w, d) if channel_last else torch.randn(b, d, h, w)
    values, keys, indices, distances, counts, heads, encoder_output = model(features)
    if channel_last:
        assert values.shape == (b, h, w, C * t * v)
        assert keys.shape == (b, C, t, h, w, k)
        assert indices.shape == distances.shape == counts.shape == (b, C, t, h, w, 1)
        assert heads.shape == (b, C, h, w, k)
    else:
        assert values.shape == (b, C * t * v, h, w)
        assert keys.shape == (b, C, t, k, h, w)
        assert indices.shape == distances.shape == counts.shape == (b, C, t, 1, h, w)
        assert heads.shape == (b, C, k, h, w)
    assert encoder_output is features or torch.equal(encoder_output, features)
    assert indices.dtype == torch.int64
    # distances are -||head - key||^2 of the fetched keys
    key_axis = -1 if channel_last else 3
    torch.testing.assert_close(distances, -((heads[:, :, None] - keys) ** 2).sum(key_axis, keepdim=True))
    model.return_values_only = True
    assert model.bottleneck.return_values_only
    assert isinstance(model(features), torch.Tensor)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="splitting_mode must be one of .*'chunk'.*got 'sparse'"):
        make_wrapper(splitting_mode="sparse")
    with pytest.raises(ValueError, match="num_channels == num_codebooks \\* dim_keys = 3 \\* 4 = 12"):
        make_wrapper(num_channels=10)
    model = make_wrapper()
    with pytest.raises(ValueError, match="num_channels=12 .* d=7"):
        model(torch.randn(2, 7))
    with pytest.raises(ValueError, match="num_codebooks to divide"):
        DinoBottleneckedEncoder(num_codebooks=3, key_value_pairs_per_codebook=8, input_is_embedding=True)
    with pytest.raises(ValueError, match="backbone must be one of"):
        DinoBottleneckedEncoder(num_codebooks=4, key_value_pairs_per_codebook=8, backbone="resnet", input_is_embedding=True)


# ----------------------------------------------------------------------------------------------
# Switches, phases, checkpoints


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 12)
        self.norm = nn.BatchNorm1d(12)

    def forward(self, x):
        return self.norm(self.linear(x))


def test_frozen_encoder_has_no_grad_and_stays_in_eval_mode():
    torch.manual_seed(0)
    model = BottleneckedEncoder(TinyEncoder(), 12, 3, 8, 4, 5, splitting_mode="learned_projection")
    model.freeze_encoder().freeze_keys()
    model.train()
    assert not model.encoder.training and model.splitter.training
    running_mean = model.encoder.norm.running_mean.clone()
    model(torch.randn(4, 6)).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    assert torch.equal(model.encoder.norm.running_mean, running_mean)
    assert model.bottleneck.values.grad is not None
    # The lookup is discrete: no gradient reaches the heads through the fetched values.
    assert model.splitter.proj.weight.requires_grad and model.splitter.proj.weight.grad is None
    model.freeze_splitter()
    assert not model.splitter.proj.weight.requires_grad
    model.unfreeze_splitter()
    assert model.splitter.proj.weight.requires_grad


def test_initialize_keys_learns_keys_and_restores_the_switch():
    torch.manual_seed(0)
    model = make_wrapper(splitting_mode="random_projection", threshold_ema_dead_code=0.1)
    data = [(torch.randn(16, 12), None) for _ in range(3)]
    keys = model.bottleneck.keys.clone()
    model.freeze_keys()
    model.initialize_keys(data, epochs=2, progress=False)
    assert not torch.equal(model.bottleneck.keys, keys)
    assert not model.bottleneck.update_keys  # frozen before, frozen after
    keys = model.bottleneck.keys.clone()
    model(torch.randn(16, 12))
    assert torch.equal(model.bottleneck.keys, keys)
    # a custom extractor
    model.initialize_keys([{"x": torch.randn(16, 12)}], inputs_extractor=lambda item: item["x"])  # with tqdm
    assert not torch.equal(model.bottleneck.keys, keys)


def test_counter_switches_and_unused_fraction():
    torch.manual_seed(0)
    model = make_wrapper().freeze_keys()
    assert model.fraction_of_unused_keys() == 1.0
    model(torch.randn(32, 12))
    used = model.fraction_of_unused_keys()
    assert used < 1.0
    model.deactivate_counts()
    model(torch.randn(32, 12))
    assert model.fraction_of_unused_keys() == used
    model.activate_counts()
    model.reset_cluster_size_counter()
    assert model.fraction_of_unused_keys() == 1.0


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(num_channels=12, num_codebooks=3, pairs=8, dim_keys=4, dim_values=5, splitting_mode="learned_projection")
    model = make_wrapper(**kwargs)
    model.initialize_keys([(torch.randn(16, 12),)], progress=False)
    model.freeze_keys()
    with torch.no_grad():
        model.bottleneck.values.add_(1.0)
    path = tmp_path / "kvb.pt"
    model.save(path)
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"bottleneck", "splitter"} and "proj.weight" in saved["splitter"]

    restored = make_wrapper(**kwargs).load(path).freeze_keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    x = torch.randn(5, 12)
    torch.testing.assert_close(restored(x), model(x))

    torch.save({"bottleneck": saved["bottleneck"]}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="splitter"):
        restored.load(tmp_path / "partial.pt")


# ----------------------------------------------------------------------------------------------
# DINO (no network here: embeddings, or a clear error)


def test_dino_with_embeddings_never_touches_the_hub(monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("torch.hub.load must not be called with input_is_embedding=True")

    monkeypatch.setattr(torch.hub, "load", no_hub)
    model = DinoBottleneckedEncoder(num_codebooks=16, key_value_pairs_per_codebook=8, input_is_embedding=True)
    assert isinstance(model.encoder, nn.Identity)
    assert (model.num_channels, model.dim_keys, model.dim_values) == (1024, 64, 64)
    assert model(torch.randn(2, 1024, 1, 1)).shape == (2, 16 * 64, 1, 1)  # concatenated, channel-first

    vit = DinoBottleneckedEncoder(
        num_codebooks=4, key_value_pairs_per_codebook=8, backbone="dino_vits8", dim_values=10,
        concat_values_from_all_codebooks=False, input_is_embedding=True,
    )
    assert vit(torch.randn(2, 384)).shape == (2, 4, 1, 10)
    layer4 = DinoBottleneckedEncoder(num_codebooks=8, key_value_pairs_per_codebook=8, extracted_layer=4, input_is_embedding=True)
    assert layer4.num_channels == 2048


def test_dino_explains_a_failed_download(monkeypatch):
    failure = OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    def offline_hub(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch.hub, "load", offline_hub)
    with pytest.raises(RuntimeError) as raised:
        DinoBottleneckedEncoder(num_codebooks=16, key_value_pairs_per_codebook=8)
    message = str(raised.value)
    assert "could not fetch the pretrained DINO weights" in message
    assert "TORCH_HOME" in message and "input_is_embedding=True" in message and "network" in message
    assert raised.value.__cause__ is failure


# ----------------------------------------------------------------------------------------------
# Decoders


def test_voting_is_the_mean_of_fetched_values():
    values = torch.randn(4, 3, 2, 5, 6, 10)  # [b, C, t, h, w, v]
    voting = CodebookVoting()
    assert list(voting.parameters()) == []
    logits = voting(values)
    assert logits.shape == (4, 10)
    torch.testing.assert_close(logits, values.mean(dim=(1, 2, 3, 4)))
    # channel-first wrapper output [b, C, t, v, h, w]
    torch.testing.assert_close(CodebookVoting(value_axis=3)(values.movedim(-1, 3)), logits)
    # concatenated [b, (C t v)] with num_codebooks and topk given
    pooled = values[:, :, :, 0, 0]  # [b, C, t, v]
    torch.testing.assert_close(CodebookVoting(num_codebooks=3, topk=2)(pooled.flatten(1)), pooled.mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="num_codebooks"):
        voting(pooled.flatten(1))
    with pytest.raises(ValueError, match="num_codebooks=4"):
        CodebookVoting(num_codebooks=4)(values)


def test_probe_and_mlp_shapes():
    values = torch.randn(4, 3, 1, 10)  # [b, C, t, v]
    assert LinearProbe(30, 7)(values).shape == (4, 7)
    mlp = MLP(30, 16, 7, depth=3)
    assert mlp(values).shape == (4, 7)
    assert sum(isinstance(layer, nn.Linear) for layer in mlp.layers) == 3
    assert sum(isinstance(layer, nn.Linear) for layer in MLP(30, 16, 7, depth=1).layers) == 1
    with pytest.raises(ValueError, match="depth"):
        MLP(30, 16, 7, depth=0)


# ----------------------------------------------------------------------------------------------
# The real offline encoder: EfficientNet-Lite0 with ImageNet weights, on scikit-learn's digits


def test_missing_efficientnet_packages_give_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match=r"pip install 'kvb-dist\[offline\]'"):
        EfficientNetLite0Encoder()


def test_imagenet_preprocess():
    gray = np.random.default_rng(0).random((2, 8, 8), dtype=np.float32)
    images = imagenet_preprocess(gray, image_size=16)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    torch.testing.assert_close(images[:, 0] * 0.229 + 0.485, images[:, 1] * 0.224 + 0.456)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        imagenet_preprocess(gray * 16, image_size=16)
    with pytest.raises(ValueError, match="shape"):
        imagenet_preprocess(np.zeros((2, 2, 8, 8), np.float32))


@pytest.fixture
def one_thread():
    """Two intra-op threads on a 2-core machine shared with other jobs stall each other
    (measured 4-8x slower than one thread under load); one thread is as fast when idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


IMAGE_SIZE = 48  # 8x8 digits upsampled; 48 gave the best linear probe of 32 / 48 / 64 here


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.images))
    train, test = order[:500], order[500:800]
    images = data.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    labels = torch.as_tensor(data.target)
    return images[train], labels[train], images[test], labels[test]


def test_efficientnet_unpooled_features(one_thread):
    encoder = EfficientNetLite0Encoder(pool=False).eval()
    with torch.no_grad():
        features = encoder(imagenet_preprocess(np.zeros((2, 8, 8), np.float32), image_size=64))
    assert features.shape == (2, 1280, 2, 2)  # stride 32


def test_prepare_on_digits_with_real_efficientnet(digits, tmp_path, one_thread):
    """Freeze, fit keys by EMA on images, freeze keys; then values with a voting decoder learn the digits.

    Measured here (500 train / 300 held-out digits, 48 px): 0.76-0.80 held-out accuracy over 6
    seeds of this exact test; random init without dead-key replacement gets ~0.58 (most random
    keys are never chosen). The threshold 0.6 (chance 0.1) leaves a wide margin.
    """
    torch.manual_seed(0)
    train_images, train_labels, test_images, test_labels = digits
    config = dict(
        num_codebooks=16, key_value_pairs_per_codebook=64, dim_keys=8, dim_values=10,
        splitting_mode="random_projection", threshold_ema_dead_code=0.5,
        concat_values_from_all_codebooks=False, image_size=IMAGE_SIZE,
    )
    model = EfficientNetBottleneckedEncoder(**config)
    x_train, x_test = model.preprocess(train_images), model.preprocess(test_images)  # [N, 3, 48, 48]
    loader = [(x_train[i : i + 100], train_labels[i : i + 100]) for i in range(0, len(x_train), 100)]

    initial_keys = model.bottleneck.keys.clone()
    model.prepare(loader, epochs=2, progress=False)
    assert (model.bottleneck.keys != initial_keys).any(-1).float().mean() > 0.9  # nearly every key moved
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not model.encoder.training
    keys = model.bottleneck.keys.clone()
    with torch.no_grad():
        values_test = model(x_test[:50])  # [b, C, 1, v, 1, 1]
    assert values_test.shape == (50, 16, 1, 10, 1, 1)
    assert torch.equal(model.bottleneck.keys, keys)  # frozen keys stay put

    # Phase 1 of the design: embed once with the frozen encoder, then train on embeddings with
    # a twin that loads the prepared bottleneck and splitter (and so checks save/load too).
    with torch.no_grad():
        train_embeddings, test_embeddings = model.encoder(x_train), model.encoder(x_test)  # [N, 1280, 1, 1]
    model.save(tmp_path / "digits.pt")
    head = EfficientNetBottleneckedEncoder(input_is_embedding=True, **config).load(tmp_path / "digits.pt")
    head.freeze_splitter().freeze_keys()  # switches are not part of a checkpoint
    with torch.no_grad():
        torch.testing.assert_close(head(test_embeddings[:50]), values_test)

    voting = CodebookVoting(value_axis=3)
    optimizer = torch.optim.Adam([head.bottleneck.values], lr=0.1)
    for step in range(100):
        batch = torch.randint(0, len(train_embeddings), (100,))
        loss = nn.functional.cross_entropy(voting(head(train_embeddings[batch])), train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (voting(head(test_embeddings)).argmax(-1) == test_labels).float().mean().item()
    assert accuracy >= 0.6, f"held-out accuracy {accuracy:.3f} (chance 0.1)"
    assert torch.equal(head.bottleneck.keys, keys)
