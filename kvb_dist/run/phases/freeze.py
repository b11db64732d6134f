"""Freeze phase: build the encoder, freeze it, embed every split once into shard sets.

A frozen encoder gives the same embedding every epoch, so the later phases stream small
embedding shards instead of images. Each rank embeds its parts of every split (a contiguous
range of rows, or a WebDataset pattern's shards r, r + W, ...: kvb_dist.data.sources) and
writes its own shards; rank 0 merges the index parts once all are written. No index of the
users' data is needed: the merged index counts what was embedded.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch


from kvb_dist.data.shards import INDEX_NAME, image_folder_samples, index_part_name, merge_index_parts, write_embeddings
from kvb_dist.data.sources import ArraySource, image_files_source, webdataset_source
from kvb_dist.run.builders import build_encoder, embeddings_dir, progress_bar

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


def image_folder_splits(root: str, test_fraction: float, seed: int) -> Tuple[dict, List[str]]:
    """{"train", "test"}: [(path, label)] of an ImageFolder tree, and the class names.

    root/train/<class>/ and root/test/<class>/ when both exist (the usual layout), else
    root/<class>/ split per class by test_fraction (deterministic for a seed).
    """
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")):
        train, names = image_folder_samples(os.path.join(root, "train"))
        test, test_names = image_folder_samples(os.path.join(root, "test"))
        if test_names != names:
            raise ValueError(f"{root}/train and {root}/test have different class folders: {names} vs {test_names}")
        return {"train": train, "test": test}, names
    files, names = image_folder_samples(root)
    train_rows, test_rows = stratified_split(np.array([label for _, label in files]), test_fraction, seed)
    return {"train": [files[i] for i in train_rows], "test": [files[i] for i in test_rows]}, names


def split_sources(config) -> Dict[str, object]:
    """The freeze phase's sources of a config: {"train", "test"[, "init"]}."""
    data = config.data
    if data.dataset == "webdataset":
        keys = dict(image_keys=data.image_keys, feature_key=data.feature_key, label_key=data.label_key)
        patterns = {"train": data.train, "test": data.test, **({"init": data.init} if data.init else {})}
        return {split: webdataset_source(split, pattern, data.image_size, **keys) for split, pattern in patterns.items()}
    if data.dataset == "imagefolder":
        files, names = image_folder_splits(data.root, data.test_fraction, config.run.seed)
        return {
            split: image_files_source(split, rows, data.image_size, data.samples_per_shard, class_names=names)
            for split, rows in files.items()
        }
    return {split: ArraySource(*arrays, split) for split, arrays in raw_splits(config).items()}


def _with_progress(batches: Iterator, bar) -> Iterator:
    for batch in batches:
        yield batch
        bar.update(len(batch[1]))


def embed_split(ctx, name: str, source, encoder) -> None:
    """This rank's parts of a split through the encoder into the split's embedding set (collective)."""
    config, layout = ctx.config, ctx.layout
    folder = embeddings_dir(ctx, name)
    if ctx.is_main and folder.exists():  # an unfinished earlier attempt, maybe on more ranks
        shutil.rmtree(folder)
    layout.barrier()
    parts = source.parts(layout.rank, layout.world_size)
    # A bar for people at a terminal (the sample count: a WebDataset split is counted as it is read).
    bar = progress_bar(ctx, f"freeze: embedding {name}", unit=" samples")

    def embed_parts() -> None:
        for part in parts:
            write_embeddings(
                str(folder),
                _with_progress(part.batches(config.encoder.batch_size), bar),
                encoder,
                device=ctx.device,
                shard_prefix=part.name,
                index_name=index_part_name(part.number),
                samples_per_shard=config.data.samples_per_shard,
                overwrite=True,
                metadata={"split": name, "encoder": config.encoder.name},
                class_names=source.class_names,
            )

    try:
        layout.failed_together(embed_parts)  # a bad sample on one rank stops every rank, none waits
    finally:
        bar.close()
    index = layout.decided_on_rank0(lambda: merge_index_parts(str(folder)))
    if not index.num_samples:
        where = getattr(config.data, name) if config.data.dataset == "webdataset" else config.data.dataset
        raise ValueError(f"the {name} split has no samples ({where})")
    logger.info("freeze: %s: %s", name, index.summary().splitlines()[0])


def run(ctx) -> None:
    config, layout = ctx.config, ctx.layout
    splits = ("train", "test", *(("init",) if config.data.init or config.data.init_dataset != "same" else ()))
    # Decided on rank 0 for everyone: ranks must not disagree on what is done.
    todo = layout.decided_on_rank0(lambda: [name for name in splits if not (embeddings_dir(ctx, name) / INDEX_NAME).is_file()])
    if not todo:
        logger.info("freeze: embeddings already written, skipping")
        return
    # Downloads (data sets, pretrained weights) happen once, on rank 0, before the others look.
    sources = layout.first_on_rank0(lambda: split_sources(config))
    encoder = layout.first_on_rank0(lambda: build_encoder(config, ctx.mixed_precision, device=ctx.device))
    for name in todo:
        embed_split(ctx, name, sources[name], encoder)
