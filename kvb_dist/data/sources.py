"""Users' data for the freeze phase: WebDataset URL patterns, image folders, arrays in memory.

A source is read in parts, and each rank reads its own parts, so no rank holds the whole data
set: a WebDataset pattern's parts are its shards, an image folder's are runs of
samples_per_shard files (rank r reads parts r, r + W, ...; sample keys `{split}_{part}_{n}`);
arrays in memory (the built-in data sets) have one contiguous range of rows per rank (keys
`{split}_{row}`). Either way the keys do not depend on the number of ranks, and the same
images as WebDataset shards or as a folder (in the same order, as many per shard) get the same
keys. Every part yields batches of (inputs [b, ...] float32, labels [b] int64, keys), and its
name sorts in the order of its keys: the embedding shards written from part `name` are
`name-000000.tar`, ..., so the embedding set's shards sorted by name list the samples in key
order, whatever the number of ranks that wrote them (the train phase reads a rank's rows in
that order).

WebDataset conventions: a sample is the tar members sharing a key (`{key}.{field}`); the image
is the first of `image_keys` present (decoded to RGB in [0, 1], resized to image_size x
image_size), or a precomputed feature array under `feature_key` (`.npy`); the label is
`label_key` (`cls`: an integer as text). URLs are local paths, `pipe:COMMAND`, or what
webdataset's gopen reads (http, s3 through pipe:); patterns expand braces, and several are
joined with `::`.
"""

from __future__ import annotations

import glob
import io
import os
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

Batch = Tuple[torch.Tensor, torch.Tensor, List[str]]


@dataclass
class Part:
    """What one rank reads and writes as one group of embedding shards."""

    name: str  # sorts in key order; the prefix of the embedding shards written from it
    number: int  # unique within the split: the index part written from it
    batches: Callable[[int], Iterator[Batch]]  # batch size -> batches


def expand_pattern(pattern: str) -> List[str]:
    """A WebDataset URL pattern -> shard URLs: braces expanded, `::` joins patterns, and a local
    glob (`/data/train-*.tar`) is expanded and sorted."""
    from webdataset.shardlists import expand_urls

    urls: List[str] = []
    for url in expand_urls(pattern.strip()):
        if _is_local(url) and glob.has_magic(url):
            matches = sorted(glob.glob(url))
            if not matches:
                raise ValueError(f"no files match {url!r}")
            urls.extend(matches)
        else:
            urls.append(url)
    if not urls:
        raise ValueError(f"the pattern {pattern!r} names no shards")
    missing = [url for url in urls if _is_local(url) and not os.path.exists(url)]
    if missing:
        raise ValueError(f"{len(missing)} of the {len(urls)} shards of {pattern!r} do not exist, e.g. {missing[0]!r}")
    return urls


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Image file bytes -> float32 [3, image_size, image_size] in [0, 1] (gray and CMYK become RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32)
    return array.transpose(2, 0, 1) / 255.0


def parse_label(value, key: str, url: str) -> int:
    text = value.decode() if isinstance(value, bytes) else str(value)
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"sample {key!r} of {url}: its label {text.strip()[:40]!r} is not an integer") from None


Sample = Tuple[np.ndarray, int]  # one input (float32) and its label


class PartedSource:
    """A split read in numbered parts (a WebDataset pattern's shards, runs of image files);
    rank r of W reads parts r, r + W, ..."""

    def __init__(self, split: str, num_parts: int, samples_of: Callable[[int], Iterator[Sample]],
                 where: Callable[[int], str], class_names: Optional[List[str]] = None):
        self.split, self.num_parts, self.samples_of, self.where = split, num_parts, samples_of, where
        self.class_names = class_names  # label -> name, where known (image folders)

    def parts(self, rank: int, world_size: int) -> List[Part]:
        return [
            Part(f"part{part:06d}", part, lambda batch_size, part=part: self._batches(part, batch_size))
            for part in range(rank, self.num_parts, world_size)
        ]

    def _batches(self, part: int, batch_size: int) -> Iterator[Batch]:
        inputs, labels, keys = [], [], []
        for position, (x, label) in enumerate(self.samples_of(part)):
            inputs.append(x)
            labels.append(label)
            keys.append(f"{self.split}_{part:06d}_{position:09d}")
            if len(keys) == batch_size:
                yield _stack(inputs, labels, keys, self.where(part))
                inputs, labels, keys = [], [], []
        if keys:
            yield _stack(inputs, labels, keys, self.where(part))


def shard_samples(url: str) -> Iterator[dict]:
    """The samples of one WebDataset shard, in order (this rank chose the shard: no node or worker split)."""
    import webdataset as wds

    return iter(wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False))


def webdataset_source(split: str, pattern: str, image_size: int, image_keys: Sequence[str] = ("jpg", "png"),
                      feature_key: str = "npy", label_key: str = "cls") -> PartedSource:
    """One split given as a WebDataset URL pattern: a part per shard."""
    urls = expand_pattern(pattern)
    image_keys = [key.lower().lstrip(".") for key in image_keys]
    feature_key, label_key = feature_key.lower().lstrip("."), label_key.lower().lstrip(".")

    def samples_of(part: int) -> Iterator[Sample]:
        url = urls[part]
        for sample in shard_samples(url):  # its order is the key order
            fields = {name.lower(): value for name, value in sample.items() if not name.startswith("__")}
            key = sample.get("__key__")
            if label_key not in fields:
                raise ValueError(f"sample {key!r} of {url} has no label field {label_key!r} (it has {sorted(fields)}); set data.label_key")
            if feature_key in fields:
                x = np.load(io.BytesIO(fields[feature_key]), allow_pickle=False).astype(np.float32)
            else:
                image = next((fields[k] for k in image_keys if k in fields), None)
                if image is None:
                    raise ValueError(
                        f"sample {key!r} of {url} has none of the fields {[feature_key, *image_keys]} "
                        f"(it has {sorted(fields)}); set data.image_keys or data.feature_key"
                    )
                x = decode_image(image, image_size)
            yield x, parse_label(fields[label_key], key, url)

    return PartedSource(split, len(urls), samples_of, urls.__getitem__)


def image_files_source(split: str, files: Sequence[Tuple[str, int]], image_size: int, files_per_part: int,
                       class_names: Optional[List[str]] = None) -> PartedSource:
    """(path, label) of image files, read in parts of files_per_part."""
    def samples_of(part: int) -> Iterator[Sample]:
        for path, label in files[part * files_per_part : (part + 1) * files_per_part]:
            with open(path, "rb") as f:
                yield decode_image(f.read(), image_size), label

    num_parts = -(-len(files) // files_per_part)
    return PartedSource(split, num_parts, samples_of, lambda part: files[part * files_per_part][0], class_names)


def _stack(inputs: List[np.ndarray], labels: List[int], keys: List[str], where: str) -> Batch:
    shapes = {x.shape for x in inputs}
    if len(shapes) > 1:
        raise ValueError(f"samples of {where} have different shapes {sorted(shapes)[:3]}: features must share one shape")
    return torch.from_numpy(np.stack(inputs)), torch.tensor(labels, dtype=torch.int64), keys


class ArraySource:
    """Rows 0..n-1 of arrays in memory (the built-in data sets); a rank reads its contiguous range."""

    class_names = None

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, split: str):
        self.inputs, self.labels, self.split = inputs, labels, split

    def parts(self, rank: int, world_size: int) -> List[Part]:
        from kvb_dist.distributed.layout import shard_ranges

        start, stop = shard_ranges(len(self.labels), world_size)[rank]
        return [Part(f"rows{start:012d}", rank, lambda batch_size: self._batches(start, stop, batch_size))]

    def _batches(self, start: int, stop: int, batch_size: int) -> Iterator[Batch]:
        for first in range(start, stop, batch_size):
            last = min(first + batch_size, stop)
            keys = [f"{self.split}_{i:09d}" for i in range(first, last)]
            yield torch.from_numpy(self.inputs[first:last]), torch.from_numpy(self.labels[first:last]), keys


def count_pattern(pattern: str, label_key: str = "cls") -> dict:
    """Samples and labels per shard of a WebDataset pattern, without decoding inputs: what a
    user plans with (`python -m kvb_dist.data index PATTERN`); the freeze phase needs none of it."""
    shards = []
    for url in expand_pattern(pattern):
        counts: dict = {}
        for sample in shard_samples(url):
            label = parse_label(sample[label_key], sample.get("__key__"), url) if label_key in sample else -1
            counts[label] = counts.get(label, 0) + 1
        shards.append({"url": url, "num_samples": sum(counts.values()), "class_counts": dict(sorted(counts.items()))})
    histogram: dict = {}
    for shard in shards:
        for label, count in shard["class_counts"].items():
            histogram[label] = histogram.get(label, 0) + count
    return {"pattern": pattern, "num_shards": len(shards), "num_samples": sum(s["num_samples"] for s in shards),
            "class_histogram": dict(sorted(histogram.items())), "shards": shards}
