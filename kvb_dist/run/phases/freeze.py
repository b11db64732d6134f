"""Freeze phase: build the encoder, freeze it, embed every split once into shard sets.

A frozen encoder gives the same embedding every epoch, so the later phases stream small
embedding shards instead of images. Each rank embeds a contiguous part of every split and
writes its own shards; rank 0 merges the index parts once all are written.
"""

from __future__ import annotations

import logging
import shutil
from typing import Dict, Tuple

import numpy as np
import torch

from kvb_dist.data.shards import INDEX_NAME, index_part_name, merge_index_parts, write_embeddings
from kvb_dist.distributed.layout import shard_ranges
from kvb_dist.run.builders import build_encoder, embeddings_dir

logger = logging.getLogger(__name__)

Split = Tuple[np.ndarray, np.ndarray]  # inputs [n, ...] float32, labels [n] int64


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Train / test row indices with the same class proportions, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        num_test = max(1, int(round(len(rows) * test_fraction)))
        test.append(rows[:num_test])
        train.append(rows[num_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def raw_splits(config) -> Dict[str, Split]:
    """{"train", "test"} and, when keys are fitted on other data, "init"."""
    data = config.data
    if data.dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)  # [n, 8, 8] in [0, 1]
        labels = digits.target.astype(np.int64)
        train, test = stratified_split(labels, data.test_fraction, config.run.seed)
        splits = {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
    elif data.dataset == "toy":
        from kvb_dist import toy

        generator = torch.Generator().manual_seed(config.run.seed)
        toy_config = toy.ToyConfig(seed=config.run.seed)
        per_class = data.toy_samples_per_class
        points, labels = toy.sample_classes(list(range(toy.NUM_CLASSES)), per_class * toy.NUM_CLASSES, toy_config, generator)
        test_points, test_labels = toy.evaluation_set(toy_config)
        splits = {"train": (points.numpy(), labels.numpy()), "test": (test_points.numpy(), test_labels.numpy())}
    else:
        splits = _cifar_splits(data.root, "cifar10")
    if data.init_dataset == "uniform":
        from kvb_dist import toy

        generator = torch.Generator().manual_seed(config.run.seed + 7)
        num = len(splits["train"][1])
        splits["init"] = (toy.sample_uniform(num, generator).numpy(), np.full(num, -1, dtype=np.int64))
    elif data.init_dataset == "cifar100":
        splits["init"] = _cifar_splits(data.root, "cifar100")["train"]
    return splits


def _cifar_splits(root: str, name: str) -> Dict[str, Split]:
    """CIFAR-10 / CIFAR-100 through torchvision (downloads into root; needs network once)."""
    try:
        import torchvision
    except ImportError as error:
        raise ImportError(f"data.dataset={name} needs torchvision: pip install torchvision") from error
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    splits = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(root=root, train=train, download=True)
        except Exception as error:  # no network: say what to do
            raise RuntimeError(
                f"could not load {name} into {root!r} ({error}); download it once with network access "
                f"(torchvision.datasets.{cls.__name__}(root={root!r}, download=True)) and point data.root there"
            ) from error
        images = ds.data.astype(np.float32).transpose(0, 3, 1, 2) / 255.0  # [n, 3, 32, 32]
        splits[split] = (images, np.asarray(ds.targets, dtype=np.int64))
    return splits


def run(ctx) -> None:
    config, layout = ctx.config, ctx.layout
    splits = raw_splits(config)
    # Decided on rank 0 for everyone: ranks must not disagree on what is done.
    todo = layout.decided_on_rank0(lambda: [name for name in splits if not (embeddings_dir(ctx, name) / INDEX_NAME).is_file()])
    if not todo:
        logger.info("freeze: embeddings already written, skipping")
        return
    encoder = build_encoder(config, ctx.mixed_precision)
    for name in todo:
        inputs, labels = splits[name]
        start, stop = shard_ranges(len(labels), layout.world_size)[layout.rank]
        folder = embeddings_dir(ctx, name)
        if ctx.is_main and folder.exists():  # an unfinished earlier attempt, maybe on more ranks
            shutil.rmtree(folder)
        layout.barrier()

        def batches(start=start, stop=stop, inputs=inputs, labels=labels, name=name):
            step = config.encoder.batch_size
            for first in range(start, stop, step):
                last = min(first + step, stop)
                keys = [f"{name}_{i:09d}" for i in range(first, last)]
                yield torch.from_numpy(inputs[first:last]), torch.from_numpy(labels[first:last]), keys

        write_embeddings(
            str(folder),
            batches(),
            encoder,
            device=ctx.device,
            shard_prefix=f"rank{layout.rank:05d}",
            index_name=index_part_name(layout.rank),
            samples_per_shard=config.data.samples_per_shard,
            overwrite=True,
            metadata={"split": name, "encoder": config.encoder.name},
        )
        layout.barrier()
        index = layout.decided_on_rank0(lambda folder=folder: merge_index_parts(str(folder)))
        logger.info("freeze: %s: %s", name, index.summary().splitlines()[0])
