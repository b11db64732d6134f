"""Users' encoders: import paths with encoder.kwargs, torchvision / timm model names and their
weight caches, mixed precision in the freeze phase; one import-path run through the launcher."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

import encoder_factories
from kvb_dist.encoders import FrozenEmbedder, autocast_dtype, resize_crop_normalize
from kvb_dist.run import builders
from kvb_dist.run.config import load_config
from test_launcher import ENTRY, LAUNCH_TIMEOUT, REPO, environment

pytestmark = pytest.mark.timeout(120)
TESTS = Path(__file__).resolve().parent


def importable(package: str) -> bool:
    """False also for an installed build that fails to import (a CUDA torchvision beside a CPU torch)."""
    try:
        importlib.import_module(package)
    except Exception:  # noqa: BLE001
        return False
    return True


def encoder_config(name: str, *overrides: str):
    return load_config(None, [f"encoder.name={name}", *overrides])


# ----------------------------------------------------------------------------------------------
# Config: encoder.name forms and encoder.kwargs


def test_kwargs_come_from_yaml_or_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("encoder:\n  name: encoder_factories:small_convnet\n  kwargs:\n    channels: 4\n    seed: 1\n")
    assert load_config(path).encoder.kwargs == {"channels": 4, "seed": 1}
    # One entry (the value read as YAML: 3 is an int), or the whole mapping as YAML / JSON text.
    entry = load_config(path, ["encoder.kwargs.channels=3", "encoder.kwargs.note=abc", "encoder.kwargs.sizes=[1, 2]"])
    assert entry.encoder.kwargs == {"channels": 3, "seed": 1, "note": "abc", "sizes": [1, 2]}
    assert load_config(path, ['encoder.kwargs={"channels": 2}']).encoder.kwargs == {"channels": 2}
    assert load_config(path, ["encoder.kwargs={}"]).encoder.kwargs == {}
    assert load_config(None).encoder.kwargs == {}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["encoder.name=resnet"], r"encoder.name='resnet' is not valid; choose from .*torchvision/<model>.*package.module:factory"),
        (["encoder.name=torchvision/"], r"'' is not a torchvision model name; write torchvision/<model>"),
        (["encoder.name=timm/a b"], r"'a b' is not a timm model name"),
        (["encoder.name=torch.nn:Flatten", "encoder.kwargs=[1, 2]"], r"encoder.kwargs must be a mapping with string keys"),
        (["encoder.name=torch.nn:Flatten", "encoder.kwargs={a: [}"], r"encoder.kwargs='\{a: \[\}' is not a YAML / JSON value"),
        (["encoder.kwargs.hidden=3"], r"encoder.kwargs=\{'hidden': 3\} applies to import-path, torchvision/ and timm/"),
        (["encoder.batch_size.x=1"], r"unknown config key 'encoder.batch_size.x'"),
    ],
)
def test_bad_encoder_names_and_kwargs_are_clear_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_a_yaml_kwargs_that_is_not_a_mapping_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("encoder:\n  name: torch.nn:Flatten\n  kwargs: 3\n")
    with pytest.raises(ValueError, match="encoder.kwargs must be a mapping"):
        load_config(path)


# ----------------------------------------------------------------------------------------------
# Import paths


def test_import_path_encoder_gets_the_inputs_as_they_are_and_returns_flat_float32():
    images = torch.rand(5, 8, 8)
    encoder = builders.build_encoder(encoder_config("encoder_factories:pooled_pixels", "encoder.kwargs.size=2"))
    embeddings = encoder(images)
    assert embeddings.shape == (5, 4) and embeddings.dtype == torch.float32  # [b, 1, 2, 2] flattened
    torch.testing.assert_close(embeddings, nn.functional.adaptive_avg_pool2d(images[:, None], 2).flatten(1))
    # A class is a factory too; an encoder's float64 output comes back as float32.
    assert builders.build_encoder(encoder_config("torch.nn:Flatten"))(images).shape == (5, 64)
    doubled = builders.build_encoder(encoder_config("encoder_factories:double_precision"))(images.double())
    assert doubled.dtype == torch.float32 and doubled.shape == (5, 64)


def test_import_path_encoder_is_frozen_in_eval_mode():
    encoder = builders.build_encoder(encoder_config("encoder_factories:small_convnet"))
    encoder.train()  # the frozen network stays in eval mode (batch norm running statistics)
    batch_norm = encoder.network[2]
    assert not batch_norm.training and not any(p.requires_grad for p in encoder.parameters())
    before = batch_norm.running_mean.clone()
    encoder(torch.rand(4, 8, 8))
    assert torch.equal(batch_norm.running_mean, before)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("no_such_package.models:make", [], r"encoder.name='no_such_package.models:make': cannot import module 'no_such_package.models' \(ModuleNotFoundError.*PYTHONPATH"),
        ("encoder_factories:missing", [], r"module 'encoder_factories' has no attribute 'missing'"),
        ("encoder_factories:CALLS", [], r"CALLS is a list, not callable"),
        ("encoder_factories:not_a_module", [], r"not_a_module\(\*\*encoder.kwargs\) returned a int, not a torch.nn.Module"),
        ("encoder_factories:pooled_pixels", ["encoder.kwargs.width=3"], r"pooled_pixels\(\*\*encoder.kwargs\) with encoder.kwargs=\{'width': 3\} failed: TypeError"),
    ],
)
def test_import_path_errors_name_the_key_and_what_was_found(name, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        builders.build_encoder(encoder_config(name, *kwargs))
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------
# Mixed precision


def test_bf16_on_cpu_gives_float32_close_to_fp32():
    torch.set_num_threads(1)
    config = encoder_config("encoder_factories:small_convnet", "encoder.kwargs.channels=16")
    images = torch.rand(6, 8, 8)
    full = builders.build_encoder(config, "no", device="cpu")(images)
    half = builders.build_encoder(config, "bf16", device="cpu")(images)
    assert half.dtype == torch.float32 and half.shape == full.shape == (6, 64)
    assert not torch.equal(half, full)  # it did run in bf16 ...
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.02)  # ... with bf16's 8 bits of mantissa


@pytest.mark.parametrize(
    "precision, message",
    [
        ("fp16", r"mixed_precision='fp16' runs the encoder under CUDA autocast, but it runs on 'cpu'"),
        ("fp8", r"mixed_precision='fp8' cannot apply to the frozen encoder"),
        ("int4", r"mixed_precision='int4' is not valid; choose from \['no', 'bf16', 'fp16', 'fp8'\]"),
    ],
)
def test_a_precision_that_cannot_apply_fails_before_the_encoder_is_built(precision, message):
    encoder_factories.CALLS.clear()
    with pytest.raises(ValueError, match=message):
        builders.build_encoder(encoder_config("encoder_factories:small_convnet"), precision, device="cpu")
    assert encoder_factories.CALLS == []  # nothing built, nothing downloaded
    with pytest.raises(ValueError, match=message):  # identity too: the setting is wrong whatever the encoder
        builders.build_encoder(encoder_config("identity"), precision, device="cpu")


def test_fp16_needs_cuda_even_when_the_inputs_arrive_on_the_cpu_later():
    embedder = FrozenEmbedder(nn.Flatten(), autocast_dtype=torch.float16)  # built for CUDA
    with pytest.raises(ValueError, match="runs on 'cpu'"):
        embedder(torch.rand(2, 3, 3))
    assert autocast_dtype("BF16", "cpu") is torch.bfloat16 and autocast_dtype("no", "cuda") is None


# ----------------------------------------------------------------------------------------------
# Preprocessing of library weights


def test_resize_crop_normalize_is_the_evaluation_recipe():
    gray = torch.full((2, 10, 20), 0.5)
    out = resize_crop_normalize(gray, resize_size=8, crop_size=6, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    assert out.shape == (2, 3, 6, 6)  # shorter side to 8 (8 x 16), center 6 x 6
    torch.testing.assert_close(out[:, 0], torch.zeros(2, 6, 6))
    torch.testing.assert_close(out[:, 1], torch.ones(2, 6, 6))
    torch.testing.assert_close(out[:, 2], torch.full((2, 6, 6), 0.5))
    ramp = torch.arange(16.0).repeat(16, 1)[None, None].expand(1, 3, 16, 16) / 15  # columns 0..15
    cropped = resize_crop_normalize(ramp, 16, 8, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(cropped[0, 0, 0], torch.arange(4.0, 12.0) / 15)  # the center, untouched
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\]"):
        resize_crop_normalize(torch.full((1, 3, 4, 4), 255.0), 4, 4)


# ----------------------------------------------------------------------------------------------
# torchvision / timm: the real libraries where they import, stand-ins with their API otherwise


class TinyNet(nn.Module):
    """A classifier laid out as torchvision's: features -> hidden -> fc (10 ImageNet-like classes)."""

    def __init__(self, hidden: int = 6):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(4, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc(self.hidden(self.features(x)))


TINY_URL = "https://download.example.org/models/tiny_net-0123abcd.pth"


def stand_in_torchvision() -> types.ModuleType:
    """torchvision's model API as the encoder uses it; the weights load through torch hub's real cache."""
    recipe = types.SimpleNamespace(
        resize_size=[20], crop_size=[16], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
        interpolation=types.SimpleNamespace(value="bilinear"),
    )
    weights = types.SimpleNamespace(url=TINY_URL, meta={"categories": [f"c{i}" for i in range(10)]}, transforms=lambda: recipe)

    def get_model(name, weights=None, **kwargs):
        network = TinyNet(**kwargs)
        if weights is not None:  # as torchvision's builders do
            network.load_state_dict(torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True))
        return network

    models = types.ModuleType("torchvision.models")
    models.list_models = lambda module=None: ["tiny_net"]
    models.get_model_weights = lambda name: types.SimpleNamespace(DEFAULT=weights)
    models.get_model = get_model
    package = types.ModuleType("torchvision")
    package.models = models
    return package


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache, and no network: a download fails as it does offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_torchvision_weights_missing_offline_then_found_in_the_torch_hub_cache(torch_home, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", stand_in_torchvision())
    config = encoder_config("torchvision/tiny_net")
    with pytest.raises(RuntimeError, match=r"could not load the pretrained torchvision weights .*URLError.*"
                       r"put the weights file tiny_net-0123abcd.pth .* into '.*torch/hub/checkpoints'.*TORCH_HOME") as error:
        builders.build_encoder(config)
    assert "\n" not in str(error.value)

    torch.manual_seed(3)
    reference = TinyNet()
    torch_home.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), torch_home / "tiny_net-0123abcd.pth")  # the file torch hub looks for
    encoder = builders.build_encoder(config)
    assert isinstance(encoder.network.fc, nn.Identity)  # the head is gone: penultimate features
    images = torch.rand(3, 12, 12)
    embeddings = encoder(images)
    normalized = resize_crop_normalize(images, 20, 16)
    assert embeddings.shape == (3, 6) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, reference.hidden(reference.features(normalized)))
    with pytest.raises(ValueError, match=r"torchvision has no classification model 'resnet5'"):
        builders.build_encoder(encoder_config("torchvision/resnet5"))
    with pytest.raises(ValueError, match=r"encoder.kwargs=\{'depth': 2\} do not fit tiny_net"):
        builders.build_encoder(encoder_config("torchvision/tiny_net", "encoder.kwargs.depth=2"))


def test_missing_or_broken_libraries_name_the_pip_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r'encoder.name=\'torchvision/resnet50\' needs torchvision: pip install "kvb-dist\[torchvision\]"'):
        builders.build_encoder(encoder_config("torchvision/resnet50"))
    with pytest.raises(ImportError, match=r'needs timm: pip install "kvb-dist\[timm\]"'):
        builders.build_encoder(encoder_config("timm/vit_small_patch16_224"))
    # Installed but broken, as a CUDA torchvision beside a CPU torch fails (timm imports it).
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "timm")
    with pytest.raises(ImportError, match=r"timm is installed but does not import \(RuntimeError: operator torchvision::nms"):
        builders.build_encoder(encoder_config("timm/vit_small_patch16_224"))


def stand_in_timm(fail_download: bool) -> types.ModuleType:
    def create_model(name, pretrained=False, num_classes=1000, **kwargs):
        network = TinyNet(**kwargs)
        if num_classes == 0:
            network.fc = nn.Identity()
        if pretrained and fail_download:  # what huggingface_hub raises offline, an OSError
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files.")
        return network

    timm = types.ModuleType("timm")
    timm.is_model = lambda name: name == "tiny_net"
    timm.list_models = lambda pattern="": ["tiny_net"]
    timm.create_model = create_model
    timm.data = types.ModuleType("timm.data")
    timm.data.resolve_model_data_config = lambda model: {
        "input_size": (3, 14, 14), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.875,
    }
    return timm


def use_stand_in_timm(monkeypatch, fail_download: bool) -> None:
    timm = stand_in_timm(fail_download)
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.data", timm.data)


def test_timm_models_offline_error_names_the_hugging_face_cache_and_loads_with_its_data_config(monkeypatch):
    use_stand_in_timm(monkeypatch, fail_download=True)
    with pytest.raises(RuntimeError, match=r"could not load the pretrained timm weights for encoder.name='timm/tiny_net'.*"
                       r"OSError.*fill the Hugging Face cache .*HF_HUB_CACHE.*HF_HOME"):
        builders.build_encoder(encoder_config("timm/tiny_net"))
    use_stand_in_timm(monkeypatch, fail_download=False)
    encoder = builders.build_encoder(encoder_config("timm/tiny_net", "encoder.kwargs.hidden=5"))
    images = torch.rand(2, 8, 8)
    assert encoder(images).shape == (2, 5)
    normalized = resize_crop_normalize(images, 16, 14, (0.5,) * 3, (0.5,) * 3, "bicubic")  # 14 / 0.875 = 16
    torch.testing.assert_close(encoder(images), encoder.network(normalized))
    with pytest.raises(ValueError, match=r"timm has no model 'vit_tiny'"):
        builders.build_encoder(encoder_config("timm/vit_tiny"))


@pytest.mark.skipif(not importable("torchvision"), reason="torchvision does not import here")
def test_real_torchvision_resnet18_offline_then_from_a_filled_cache(torch_home):
    import torchvision

    config = encoder_config("torchvision/resnet18")
    with pytest.raises(RuntimeError, match=r"put the weights file resnet18-.*\.pth .*TORCH_HOME"):
        builders.build_encoder(config)
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    torch_home.mkdir(parents=True, exist_ok=True)
    # A randomly initialized state dict under the file name torchvision expects stands in for the download.
    torch.save(torchvision.models.resnet18().state_dict(), torch_home / os.path.basename(weights.url))
    embeddings = builders.build_encoder(config)(torch.rand(2, 32, 32))
    assert embeddings.shape == (2, 512) and torch.isfinite(embeddings).all()


@pytest.mark.skipif(not importable("timm"), reason="timm does not import here")
def test_real_timm_offline_then_from_a_filled_hugging_face_cache(tmp_path):
    # In a fresh process: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported.
    script = """
import sys
from pathlib import Path
import safetensors.torch, timm, torch
from kvb_dist.run import builders
from kvb_dist.run.config import load_config

config = load_config(None, ["encoder.name=timm/resnet18.a1_in1k"])
try:
    builders.build_encoder(config)
    sys.exit("no error without weights")
except RuntimeError as error:
    print(error)
# The Hugging Face cache layout, with random weights standing in for the download.
repo = Path(sys.argv[1]) / "hub" / "models--timm--resnet18.a1_in1k"
snapshot = repo / "snapshots" / ("0" * 40)
snapshot.mkdir(parents=True)
(repo / "refs").mkdir()
(repo / "refs" / "main").write_text(snapshot.name)
safetensors.torch.save_file(timm.create_model("resnet18.a1_in1k").state_dict(), str(snapshot / "model.safetensors"))
print("shape", tuple(builders.build_encoder(config)(torch.rand(2, 32, 32)).shape))
"""
    hf_home = tmp_path / "hf"
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch"))
    result = subprocess.run([sys.executable, "-c", script, str(hf_home)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "could not load the pretrained timm weights" in result.stdout and str(hf_home / "hub") in result.stdout
    assert "shape (2, 512)" in result.stdout


# ----------------------------------------------------------------------------------------------
# End to end


@pytest.mark.timeout(240)
def test_import_path_encoder_through_the_launcher(tmp_path):
    env = environment()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    args = [
        "--config", str(REPO / "configs" / "digits.yaml"), "--timeout", "60", f"run.out_dir={tmp_path}",
        "encoder.name=encoder_factories:pooled_pixels", "encoder.kwargs.size=4", "data.image_size=8",
        "bottleneck.num_codebooks=8", "bottleneck.key_value_pairs_per_codebook=32", "bottleneck.dim_keys=4",
        "init.kmeans_iters=2", "train.steps_per_task=20", "train.iid_steps=60", "train.learners=kvb,linear_probe", "train.baseline_lr=0.01",
        "run.tracker=none", "run.checkpoint_every=1000",
    ]
    result = subprocess.run([sys.executable, ENTRY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    run_dir = tmp_path / "digits"
    index = json.loads((run_dir / "embeddings" / "train" / "index.json").read_text())
    assert index["feature_shape"] == [16]  # [b, 1, 4, 4] pooled digits, flattened
    results = json.loads((run_dir / "results.json").read_text())["results"]
    assert results["kvb"]["iid"]["average_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert results["kvb"]["class_incremental"]["average_accuracy"] > 0.3
    assert results["linear_probe"]["iid"]["average_accuracy"] > 0.3
