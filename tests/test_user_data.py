"""Users' data through the launcher: WebDataset shards (no index) and an image folder, and
class-incremental tasks over labels that are not 0..N-1."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kvb_dist.data.sources import count_pattern, expand_pattern, image_files_source, webdataset_source
from kvb_dist.distributed.checkpoint import load_full
from kvb_dist.run.phases.train import class_order, label_mapping
from test_launcher import ENTRY, LAUNCH_TIMEOUT, REPO, environment

PER_SHARD = 100
SMALL = [
    "--config", str(REPO / "configs" / "digits.yaml"), "--timeout", "60",
    "data.image_size=8", f"data.samples_per_shard={PER_SHARD}", "encoder.name=identity",
    "bottleneck.num_codebooks=8", "bottleneck.key_value_pairs_per_codebook=64", "bottleneck.dim_keys=8",
    "init.kmeans_iters=3", "train.steps_per_task=20", "train.iid_steps=40",
    "train.learners=kvb,linear_probe", "run.tracker=none", "run.checkpoint_every=1000",
]


def label_of_digit(digit: int) -> int:
    return 10 + 3 * digit  # labels that are not 0..N-1


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory):
    """The same digits twice: PNG + cls WebDataset shards, and an image folder root/{train,test}/<class>/.

    Samples are in the folder's order (classes sorted, files sorted), PER_SHARD to a shard, so
    both sources list the same images in the same parts."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits_images")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    rows = {"train": np.arange(0, 400), "test": np.arange(400, 600)}
    for split, chosen in rows.items():
        chosen = sorted(chosen, key=lambda i: (f"c{label_of_digit(digits.target[i])}", i))
        for number, first in enumerate(range(0, len(chosen), PER_SHARD)):
            with tarfile.open(root / f"{split}-{number:03d}.tar", "w") as tar:
                for i in chosen[first : first + PER_SHARD]:
                    key = f"sample{i:05d}"
                    add_member(tar, f"{key}.png", png(images[i]))
                    add_member(tar, f"{key}.cls", str(label_of_digit(digits.target[i])).encode())
        for i in chosen:
            folder = root / "folder" / split / f"c{label_of_digit(digits.target[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:05d}.png").write_bytes(png(images[i]))
    return root


def run_launcher(form: str, out_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [ENTRY, *SMALL, f"run.out_dir={out_dir}", *overrides]
    if form == "torchrun":
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=environment(), capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, f"{form} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def outcome(run_dir: Path):
    results = json.loads((run_dir / "results.json").read_text())["results"]
    record = torch.load(run_dir / "checkpoints" / "train-class_incremental-kvb.pt", weights_only=True)
    return results, load_full(run_dir / "checkpoints" / record["tensors"], prefix="bottleneck.")["values"]


@pytest.mark.timeout(300)
def test_webdataset_on_two_ranks_equals_the_image_folder_on_one(digit_images, tmp_path):
    shards = digit_images
    run_launcher("torchrun", tmp_path, "data.dataset=webdataset", "run.name=wds",
                 f"data.train={shards}/train-{{000..003}}.tar", f"data.test={shards}/test-{{000..001}}.tar")
    run_launcher("python", tmp_path, "data.dataset=imagefolder", "run.name=folder", f"data.root={shards}/folder")

    for name in ("wds", "folder"):
        index = json.loads((tmp_path / name / "embeddings" / "train" / "index.json").read_text())
        assert index["num_samples"] == 400 and index["feature_shape"] == [192]  # counted as it embedded
        classes = json.loads((tmp_path / name / "classes.json").read_text())
        assert classes["class_order"] == ([label_of_digit(d) for d in range(10)] if name == "wds" else list(range(10)))
        assert classes["tasks"][0] == classes["class_order"][:2]
    assert json.loads((tmp_path / "folder" / "classes.json").read_text())["class_names"][:2] == ["c10", "c13"]

    results, values = outcome(tmp_path / "wds")
    expected_results, expected_values = outcome(tmp_path / "folder")
    torch.testing.assert_close(values, expected_values, rtol=1e-5, atol=1e-6)
    for learner, by_setting in expected_results.items():
        for setting, metrics in by_setting.items():
            assert results[learner][setting]["average_accuracy"] == pytest.approx(metrics["average_accuracy"], abs=1e-9)
    assert results["kvb"]["iid"]["average_accuracy"] > 0.5  # it learned: 10 classes, chance 0.1


def test_webdataset_source_reads_patterns_pipes_and_feature_arrays(digit_images, tmp_path):
    urls = expand_pattern(f"{digit_images}/train-{{000..001}}.tar::{digit_images}/test-*.tar")
    assert [Path(u).name for u in urls] == ["train-000.tar", "train-001.tar", "test-000.tar", "test-001.tar"]
    with pytest.raises(ValueError, match="do not exist"):
        expand_pattern(f"{digit_images}/train-{{000..009}}.tar")

    local = webdataset_source("train", f"{digit_images}/train-000.tar", 8, image_keys=["png"])
    piped = webdataset_source("train", f"pipe:cat {digit_images}/train-000.tar", 8, image_keys=["png"])
    [(inputs, labels, keys)] = [b for part in local.parts(0, 1) for b in part.batches(1000)]
    [(piped_inputs, piped_labels, piped_keys)] = [b for part in piped.parts(0, 1) for b in part.batches(1000)]
    assert inputs.shape == (PER_SHARD, 3, 8, 8) and torch.equal(inputs, piped_inputs) and keys == piped_keys
    assert keys[0] == "train_000000_000000000" and set(labels.tolist()) <= {label_of_digit(d) for d in range(10)}
    # The folder's first part holds the same images with the same keys.
    files = sorted((digit_images / "folder" / "train").rglob("*.png"))
    folder_source = image_files_source("train", [(str(f), 0) for f in files], 8, PER_SHARD)
    [(folder_inputs, _, folder_keys)] = [b for b in folder_source.parts(0, 4)[0].batches(1000)]
    assert torch.equal(folder_inputs, inputs) and folder_keys == keys

    features = tmp_path / "features-0.tar"
    with tarfile.open(features, "w") as tar:
        for i in range(3):
            array = io.BytesIO()
            np.save(array, np.full(5, i, dtype=np.float64))
            add_member(tar, f"k{i}.emb.npy", array.getvalue())
            add_member(tar, f"k{i}.label", b"7")
    source = webdataset_source("init", str(features), 8, feature_key="emb.npy", label_key="label")
    [(x, y, _)] = list(source.parts(0, 1)[0].batches(10))
    assert x.dtype == torch.float32 and x[:, 0].tolist() == [0, 1, 2] and y.tolist() == [7, 7, 7]
    with pytest.raises(ValueError, match="no label field 'cls'"):
        list(webdataset_source("init", str(features), 8, feature_key="emb.npy").parts(0, 1)[0].batches(10))
    assert source.parts(1, 2) == []  # one shard, two ranks: the second reads nothing

    counts = count_pattern(f"{digit_images}/test-{{000..001}}.tar")
    assert counts["num_samples"] == 200 and counts["num_shards"] == 2
    assert sum(counts["class_histogram"].values()) == 200 and min(counts["class_histogram"]) == label_of_digit(0)


def test_class_order_and_label_mapping():
    from kvb_dist.run.config import load_config

    histogram = {13: 5, 10: 5, 99: 1, -1: 4}
    assert class_order(load_config(None, []), histogram) == [10, 13, 99]
    shuffled = class_order(load_config(None, ["data.class_order=random", "run.seed=3"]), histogram)
    assert sorted(shuffled) == [10, 13, 99] and shuffled == class_order(load_config(None, ["data.class_order=random", "run.seed=3"]), histogram)
    given = load_config(None, ["data.class_order=99,10,13,0,1,2,3,4,5,6"])
    with pytest.raises(ValueError, match=r"labels \[0, 1, 2"):
        class_order(given, histogram)
    label_of = label_mapping([99, 10, 13])
    assert label_of(torch.tensor([10, 13, 99, -1, 42])).tolist() == [1, 2, 0, -1, -1]
    with pytest.raises(ValueError, match="more than once"):
        load_config(None, ["data.class_order=1,1,2,3,4,5,6,7,8,9"])
    with pytest.raises(ValueError, match="fewer than"):
        load_config(None, ["data.class_order=1,2"])
    with pytest.raises(ValueError, match="needs data.train and data.test"):
        load_config(None, ["data.dataset=webdataset"])
