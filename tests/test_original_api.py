"""The original research code's API as its users call it: README examples, k-means init, checkpoints.

The two examples of the original README are kept here verbatim (import path `kvb_dist.core`);
where the DINO example calls placeholders (`get_your_dataloader`, `train`, ...) the test
provides them, and torch hub, which needs the network, is replaced by a small stand-in with
the layout of DINO's ResNet-50.
"""

from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import kvb_dist
from kvb_dist.codebook import smoothed_cluster_size
from kvb_dist.core import ORIGINAL_STATE_NAMES, BottleneckOutput, KeyValueBottleneck

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent

ORIGINAL_README_BOTTLENECK = '''
import torch
from kvb_dist.core import KeyValueBottleneck

batch_size = 256
num_books = 64
dim_keys = 32
dim_values = 64
num_pairs = 200

bottleneck = KeyValueBottleneck(
    num_codebooks=num_books,
    key_value_pairs_per_codebook=num_pairs,
    dim_keys=dim_keys,
    dim_values=dim_values,
    return_values_only=False,
)
shape = (4, 8, 16)
x = torch.randn(batch_size, num_books, *shape, dim_keys)
quantized_values, quantized_keys, keys_ind, dists = bottleneck(x)
'''

ORIGINAL_README_WRAPPERS = '''
import torch
import torch.nn as nn
from kvb_dist.core import BottleneckedEncoder, DinoBottleneckedEncoder

batch_size = 128
num_codebooks = 16
num_channels = 1024

# Step 1 (Option A): Wrap custom encoder with bottleneck
encoder = torch.hub.load("facebookresearch/dino:main", "dino_resnet50")
pretrain_layer = 3
encoder = nn.Sequential(*([*encoder.children()][:4+pretrain_layer]))

bottlenecked_encoder = BottleneckedEncoder(
    encoder,
    encoder_is_channel_last=False,
    num_channels=num_channels,
    num_codebooks=num_codebooks,
    key_value_pairs_per_codebook=100,
    splitting_mode="chunk",
    dim_keys=num_channels // num_codebooks,
    dim_values=2,
    decay=0.8,
    eps=1e-5,
    threshold_ema_dead_code=0.2,
)

# Step 1 (Option B): Use predefined DinoBottleneckedEncoder
bottlenecked_encoder = DinoBottleneckedEncoder(
    extracted_layer=3,
    pool_embedding=True,
    num_codebooks=num_codebooks,
    key_value_pairs_per_codebook=100,
    concat_values_from_all_codebooks=False,
    init_mode="kmeans",
    kmeans_iters=10,
    splitting_mode="chunk",
    decay=0.8,
    eps=1e-5,
    threshold_ema_dead_code=0.2,
    return_values_only=False,
    )

# Step 2: Prepare Encoder and Bottleneck for training under distribution shifts
dataloader_for_initialization = get_your_dataloader()
bottlenecked_encoder = bottlenecked_encoder.prepare(loader=dataloader_for_initialization, epochs=0)

# This step is equivalent to
# bottlenecked_encoder.freeze_encoder()
# bottlenecked_encoder.initialize_keys(loader, epochs=epochs)
# bottlenecked_encoder.freeze_keys()

# Step 3: Construct full model
decoder = load_your_favorite_decoder()
model = nn.Sequential(bottlenecked_encoder, decoder)

# Step 4 (Option A): Train in iid setting
dataloader_iid_data = get_your_dataloader()
train(model, dataloader_iid_data, args)

# Step 4 (Option B): Train in ood setting
dataloader_with_distribution_shift = get_your_dataloader()
freeze_decoder_weights(model)
train(model, dataloader_with_distribution_shift, args)
'''


def test_original_readme_bottleneck_example_runs_as_written():
    namespace = {}
    exec(compile(ORIGINAL_README_BOTTLENECK, "original README, bottleneck", "exec"), namespace)
    b, c, t, spatial = 256, 64, 1, (4, 8, 16)
    assert namespace["quantized_values"].shape == (b, c, t, *spatial, 64)
    assert namespace["quantized_keys"].shape == (b, c, t, *spatial, 32)
    assert namespace["keys_ind"].shape == namespace["dists"].shape == (b, c, t, *spatial, 1)


class StandInDinoResNet50(nn.Module):
    """Children laid out as torchvision's ResNet-50 (conv1, bn1, relu, maxpool, layer1-4, avgpool,
    fc) with DINO's channel counts per layer, but a single tiny conv per layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 256, 1), nn.BatchNorm2d(256))
        self.layer2 = nn.Sequential(nn.Conv2d(256, 512, 1, stride=2), nn.BatchNorm2d(512))
        self.layer3 = nn.Sequential(nn.Conv2d(512, 1024, 1, stride=2), nn.BatchNorm2d(1024))
        self.layer4 = nn.Sequential(nn.Conv2d(1024, 2048, 1, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()


class VotingHead(nn.Module):
    """The user's decoder: class logits from the fetched values (a tuple with return_values_only=False)."""

    def __init__(self, num_inputs: int, num_classes: int = 10):
        super().__init__()
        self.linear = nn.Linear(num_inputs, num_classes)

    def forward(self, output):
        return self.linear(output.values.flatten(1))


def test_original_readme_wrapper_example_runs_as_written(monkeypatch):
    hub_calls = []

    def stand_in_hub(repo, model, *args, **kwargs):
        hub_calls.append((repo, model))
        return StandInDinoResNet50()

    monkeypatch.setattr(torch.hub, "load", stand_in_hub)
    generator = torch.Generator().manual_seed(0)

    def get_your_dataloader():
        return [(torch.rand(16, 3, 32, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator)) for _ in range(3)]

    losses, states = [], []

    def train(model, loader, args):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bottleneck = model[0].bottleneck
            states.append((float(bottleneck.initted), bottleneck.keys.clone()))

    def freeze_decoder_weights(model):
        for parameter in model[1].parameters():
            parameter.requires_grad = False

    namespace = dict(
        get_your_dataloader=get_your_dataloader,
        load_your_favorite_decoder=lambda: VotingHead(16 * 64),
        train=train,
        freeze_decoder_weights=freeze_decoder_weights,
        args=None,
    )
    exec(compile(ORIGINAL_README_WRAPPERS, "original README, wrappers", "exec"), namespace)

    assert hub_calls == [("facebookresearch/dino:main", "dino_resnet50")] * 2
    model = namespace["model"]
    bottleneck = model[0].bottleneck
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    # prepare(epochs=0) froze the keys before any batch: k-means ran on the first training batch.
    assert all(initted == 1.0 for initted, _ in states)
    assert all(torch.equal(keys, states[0][1]) for _, keys in states)  # frozen afterwards
    assert float(bottleneck.keys.abs().sum()) > 0
    assert not model[0].encoder.training and not bottleneck.update_keys
    assert all(not p.requires_grad for p in model[1].parameters())


def test_original_dino_example_without_network_explains_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: torch.hub needs the network
    with pytest.raises(RuntimeError, match="could not fetch the pretrained DINO weights") as raised:
        kvb_dist.DinoBottleneckedEncoder(num_codebooks=16, key_value_pairs_per_codebook=100, init_mode="kmeans")
    assert "input_is_embedding=True" in str(raised.value) and str(tmp_path) in str(raised.value)


# ----------------------------------------------------------------------------------------------
# The output: four named results, counts as an attribute


def test_output_unpacks_to_the_four_documented_results_and_keeps_counts():
    module = KeyValueBottleneck(3, 8, 4, 5, return_values_only=False, seed=0).freeze_keys()
    x = torch.randn(6, 3, 2, 4)
    module(x)  # counted once, so the next output's counts are not all zero
    counter = module.cluster_size_counter.clone()
    out = module(x)
    assert isinstance(out, BottleneckOutput) and isinstance(out, tuple) and len(out) == 4
    values, keys, indices, distances = out
    assert out.values is values and out.keys is keys and out.indices is indices and out.distances is distances
    assert out.counts.shape == indices.shape == (6, 3, 1, 2, 1)
    assert torch.equal(out.counts, counter[torch.arange(3)[None, :, None, None], indices[..., 0]][..., None])
    assert float(out.counts.min()) >= 1
    for copy in (pickle.loads(pickle.dumps(out)), pytree.tree_unflatten(*pytree.tree_flatten(out))):
        assert isinstance(copy, BottleneckOutput)
        for a, b in zip([*copy, copy.counts], [*out, out.counts]):
            assert torch.equal(a, b)
    module.return_values_only = True
    only = module(x)
    assert isinstance(only, tuple) and len(only) == 1 and torch.equal(only[0], values)


def test_wrappers_import_from_core_as_in_the_original():
    from kvb_dist.core import BottleneckedEncoder, DinoBottleneckedEncoder

    assert BottleneckedEncoder is kvb_dist.BottleneckedEncoder and DinoBottleneckedEncoder is kvb_dist.DinoBottleneckedEncoder
    with pytest.raises(ImportError, match="wrap any pretrained encoder with BottleneckedEncoder"):
        from kvb_dist.core import CLIPBottleneckedEncoder  # noqa: F401
    with pytest.raises(ImportError):
        from kvb_dist.core import NoSuchThing  # noqa: F401


# ----------------------------------------------------------------------------------------------
# k-means init on the first batch, whatever the switches say


def kmeans_module(**kwargs):
    return KeyValueBottleneck(4, 16, 8, 3, init_mode="kmeans", return_values_only=False, seed=5, **kwargs)


def frozen_entry_points():
    """Modules whose first forward runs with keys not updating, each a way users get there."""
    frozen = kmeans_module().freeze_keys()
    disabled = kmeans_module()
    disabled.disable_update_keys()
    wrapper = kvb_dist.BottleneckedEncoder(
        nn.Identity(), 32, 4, 16, 8, 3, init_mode="kmeans", splitting_mode="chunk", return_values_only=False
    )
    wrapper.bottleneck = kmeans_module()
    wrapper.prepare(loader=[], epochs=0)
    never_fitted = kmeans_module().state_dict()  # initted == 0
    loaded = KeyValueBottleneck(4, 16, 8, 3, return_values_only=False, seed=5)  # random keys, initted 1
    loaded.load_state_dict(never_fitted)
    loaded.freeze_keys()
    return {"freeze_keys": frozen, "disable_update_keys": disabled, "prepare(epochs=0)": wrapper, "checkpoint": loaded}


def test_kmeans_fits_the_keys_on_the_first_batch_under_every_frozen_entry_point():
    x = torch.randn(64, 4, 2, 8, generator=torch.Generator().manual_seed(1))
    # Reference: the first step of a module whose keys learn reports the k-means keys it fetched.
    reference = kmeans_module()(x)
    for name, module in frozen_entry_points().items():
        bottleneck = module.bottleneck if name == "prepare(epochs=0)" else module
        assert float(bottleneck.initted) == 0.0, name
        out = module(x if name != "prepare(epochs=0)" else x.movedim(1, 2).flatten(2))
        assert float(bottleneck.initted) == 1.0, name
        assert not bottleneck.update_keys, name
        assert float(bottleneck.keys.abs().sum()) > 0, name
        indices = out.indices
        assert all(indices[:, c].unique().numel() > 1 for c in range(4)), name
        torch.testing.assert_close(out.keys, reference.keys, msg=name)  # channel-last wrapper: the same layout


def test_kmeans_iters_zero_keeps_sampled_heads_and_an_empty_batch_fits_nothing():
    module = kmeans_module(kmeans_iters=0).freeze_keys()
    module(torch.randn(0, 4, 2, 8))
    assert float(module.initted) == 0.0  # nothing to fit on
    x = torch.randn(32, 4, 8)
    out = module(x)
    assert float(module.initted) == 1.0
    # Every key is one of the batch's heads, counted once; the fetched keys are the nearest.
    heads = x.transpose(0, 1)  # [c, b, k]
    distance_to_a_head = (module.keys[:, :, None] - heads[:, None]).abs().amax(-1).amin(-1)  # [c, j]
    assert float(distance_to_a_head.max()) < 1e-5
    assert torch.equal(module.cluster_size, torch.ones(4, 16))
    torch.testing.assert_close(module.keys_avg, module.keys * smoothed_cluster_size(module.cluster_size, module.eps)[..., None])
    assert out.indices.shape == (32, 4, 1, 1)


# ----------------------------------------------------------------------------------------------
# Wrapper API: model_path, export for the original code, frozen batch norm, dtype casts


def test_save_and_load_take_the_original_model_path_keyword(tmp_path):
    torch.manual_seed(0)
    model = kvb_dist.BottleneckedEncoder(nn.Identity(), 12, 3, 8, 4, 5, splitting_mode="learned_projection")
    model.initialize_keys([(torch.randn(16, 12),)], progress=False)
    model.save(model_path=tmp_path / "a.pt")
    model.save(path=tmp_path / "b.pt")
    model.save(tmp_path / "c.pt")
    for name in ("a.pt", "b.pt", "c.pt"):
        restored = kvb_dist.BottleneckedEncoder(nn.Identity(), 12, 3, 8, 4, 5, splitting_mode="learned_projection")
        restored.load(model_path=tmp_path / name)
        for key, tensor in model.state_dict().items():
            assert torch.equal(restored.state_dict()[key], tensor), (name, key)
    restored.load(path=tmp_path / "a.pt")
    with pytest.raises(TypeError, match="exactly once"):
        model.save(tmp_path / "d.pt", path=tmp_path / "e.pt")
    with pytest.raises(TypeError, match="exactly once"):
        model.load()


def test_export_holds_exactly_the_original_state_names_and_shapes(tmp_path):
    C, J, k, v, d = 3, 8, 4, 5, 12
    model = kvb_dist.BottleneckedEncoder(nn.Identity(), d, C, J, k, v, splitting_mode="random_projection")
    model.initialize_keys([(torch.randn(16, d),)], progress=False)
    model.export_original(tmp_path / "original.pt")
    exported = torch.load(tmp_path / "original.pt", weights_only=True)
    # What the original's __init__ registers, in its shapes and dtypes.
    expected = {
        "initted": ((1,), torch.float32),
        "cluster_size": ((C, J), torch.float32),
        "cluster_size_counter": ((C, J), torch.float32),
        "keys_avg": ((C, J, k), torch.float32),
        "keys": ((C, J, k), torch.float32),
        "values": ((C, J, v), torch.float32),
    }
    assert set(exported) == {"bottleneck", "splitter"}
    assert {name: (tuple(t.shape), t.dtype) for name, t in exported["bottleneck"].items()} == expected
    assert set(expected) == set(ORIGINAL_STATE_NAMES)
    assert {name: tuple(t.shape) for name, t in exported["splitter"].items()} == {"rand_proj": (C, d, k)}
    # kvb_dist loads its export, its own save and resumes from either.
    restored = kvb_dist.BottleneckedEncoder(nn.Identity(), d, C, J, k, v, splitting_mode="random_projection")
    restored.load(model_path=tmp_path / "original.pt")
    for name in expected:
        assert torch.equal(restored.bottleneck.state_dict()[name], model.bottleneck.state_dict()[name]), name


def test_frozen_batch_norm_encoder_is_unchanged_by_train():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 12), nn.Sequential(nn.BatchNorm1d(12), nn.Dropout(0.5)))
    wrapper = kvb_dist.BottleneckedEncoder(encoder, 12, 3, 8, 4, 5, splitting_mode="chunk").freeze_encoder().freeze_keys()
    model = nn.Sequential(wrapper, nn.Flatten())
    batch_norm = encoder[1][0]
    statistics = (batch_norm.running_mean.clone(), batch_norm.running_var.clone())
    x = torch.randn(8, 6)
    model.train()
    encoder[1].train()  # even a submodule switched to training on its own runs in eval mode
    first = model(x)
    second = model(x)
    assert torch.equal(batch_norm.running_mean, statistics[0]) and torch.equal(batch_norm.running_var, statistics[1])
    assert not batch_norm.training
    assert wrapper.splitter.training  # only the frozen encoder is kept in eval mode
    assert torch.equal(first, second)  # dropout is off too


@pytest.mark.parametrize("cast", ["double", "half"])
def test_module_dtype_casts_keep_the_codebooks_in_float32(cast):
    module = KeyValueBottleneck(3, 8, 4, 5, return_values_only=False, seed=0)
    reference = KeyValueBottleneck(3, 8, 4, 5, return_values_only=False, seed=0)
    getattr(module, cast)()
    dtype = torch.float64 if cast == "double" else torch.float16
    assert module.values.dtype == dtype
    for name in ("keys", "keys_avg", "cluster_size", "cluster_size_counter", "initted"):
        assert getattr(module, name).dtype == torch.float32, name
        assert torch.equal(getattr(module, name), getattr(reference, name)), name
    x = torch.randn(6, 3, 4)
    out, expected = module(x.to(dtype)), reference(x.to(dtype).float())  # the same heads
    assert out.values.dtype == dtype and out.keys.dtype == torch.float32
    assert torch.equal(out.indices, expected.indices)
    torch.testing.assert_close(module.keys, reference.keys)  # the same EMA step in fp32
    torch.testing.assert_close(out.values.float(), expected.values, atol=1e-2, rtol=1e-2)
    out.values.float().sum().backward()
    assert module.values.grad.dtype == dtype
    module.float()
    assert module.values.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# A fresh clone installs with the README's first command


def test_the_repository_tracks_no_environment():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "--", ".venv", ".ci-venv", "venv"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert tracked == ""
    ignored = subprocess.run(["git", "check-ignore", "--no-index", ".venv", ".ci-venv"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert ignored == [".venv", ".ci-venv"]
