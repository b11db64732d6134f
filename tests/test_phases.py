"""Phase building blocks that need no process group: data splits, encoders, batches, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvb_dist.run import builders
from kvb_dist.run.config import load_config
from kvb_dist.run.phases import evaluate, freeze, train


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = np.repeat(np.arange(5), [10, 20, 30, 5, 7])
    train_rows, test_rows = freeze.stratified_split(labels, 0.2, seed=3)
    assert len(np.intersect1d(train_rows, test_rows)) == 0 and len(train_rows) + len(test_rows) == len(labels)
    for label in range(5):
        assert (labels[test_rows] == label).any() and (labels[train_rows] == label).any()
    again = freeze.stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(again[1], test_rows)


def test_offline_encoder_embeds_digits():
    torch.set_num_threads(1)
    config = load_config(None, ["data.image_size=32"])
    splits = freeze.raw_splits(config)
    images = torch.from_numpy(splits["train"][0][:4])
    embeddings = builders.build_encoder(config)(images)
    assert embeddings.shape == (4, 1280) and torch.isfinite(embeddings).all()
    assert (embeddings[0] - embeddings[1]).abs().max() > 0  # different digits, different embeddings


def test_hub_and_download_encoders_fail_with_instructions(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load", no_network)
    config = load_config(None, ["encoder.name=dino_resnet50"])
    with pytest.raises(RuntimeError, match="could not fetch the pretrained DINO weights.*TORCH_HOME"):
        builders.build_encoder(config)
    cifar = load_config(None, ["data.dataset=cifar10", "data.root=/nonexistent"])
    with pytest.raises((ImportError, RuntimeError), match="torchvision|download it once"):
        freeze.raw_splits(cifar)


def test_global_batches_are_pure_functions_of_the_step():
    pool = torch.arange(100, 200)
    first = train.global_batch(pool, 32, seed=0, stream=11, task=2, step=5)
    assert torch.equal(first, train.global_batch(pool, 32, seed=0, stream=11, task=2, step=5))
    assert not torch.equal(first, train.global_batch(pool, 32, seed=0, stream=11, task=2, step=6))
    assert ((first >= 100) & (first < 200)).all()


def test_summary_metrics():
    record = {"setting": "class_incremental", "learner": "kvb", "accuracy": [[1.0, 0.0], [0.5, 0.9]]}
    summary = evaluate.summarize(record)
    assert summary["average_accuracy"] == pytest.approx(0.7)
    assert summary["forgetting"] == pytest.approx(0.5)
    table = evaluate.format_table({"kvb": {"class_incremental": summary}})
    assert "kvb" in table and "0.700" in table
