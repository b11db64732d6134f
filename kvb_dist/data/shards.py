"""Writing WebDataset shards and the index that lets readers plan epochs without opening them.

A shard set is a folder of tar shards plus ``index.json``:

    out/
      shard-000000.tar      samples "{key_prefix}{n:09d}" with x.npy (float32) or an image, and cls
      shard-000001.tar
      index.json            kind, feature shape, dtype, per-shard sample counts and class histograms

Sample format (one tar member per field, WebDataset naming ``{__key__}.{field}``):

- ``x.npy``: features (one sample, any shape, float32) for ``kind="features"``;
- ``jpg`` / ``png`` / ...: the original image file bytes for ``kind="images"``;
- ``cls``: the integer label as ASCII (-1 for unlabelled data).

Keys are unique within a shard set and contain no dot (WebDataset splits member names at the
first dot). Readers derive stable per-sample random numbers from them (k-means sampling), so a
key must not change when the data is rewritten.

Shards are written under a temporary name and renamed when complete, and the index is written
last: a crashed writer leaves no plausible-looking truncated shard and no index that promises it.
Tar members carry a fixed mtime, so writing the same data twice gives identical bytes.

Several processes can write one set together (the freeze phase embeds its part of the data on
every rank): each writes its shards with its own ``shard_prefix``, its own ``key_prefix`` and an
index part (``index_name=index_part_name(rank)``); after a barrier one process calls
``merge_index_parts``.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import numbers
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_VERSION = 1
FEATURES, IMAGES = "features", "images"
KINDS = (FEATURES, IMAGES)
FEATURE_FIELD = "x.npy"
LABEL_FIELD = "cls"
UNLABELLED = -1
MAX_LABEL = 2**31 - 1  # labels are stored as text, but readers and collectives use int32 / int64
DEFAULT_SAMPLES_PER_SHARD = 4096
# Image file suffix -> WebDataset field name (what decoders key on).
IMAGE_FIELDS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".bmp": "bmp", ".gif": "gif", ".webp": "webp",
                ".ppm": "ppm", ".pgm": "pgm", ".tif": "tif", ".tiff": "tif"}
_FIXED_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member
_VALID_NAME = re.compile(r"^[A-Za-z0-9_\-]*$")


# ---------------------------------------------------------------------------------------------
# Pure helpers


def shard_file_name(shard_prefix: str, shard_number: int) -> str:
    return f"{shard_prefix}-{shard_number:06d}.tar"


def sample_key(key_prefix: str, sample_number: int) -> str:
    return f"{key_prefix}{sample_number:09d}"


def index_part_name(part: int) -> str:
    """Index file of one writer among several (see merge_index_parts)."""
    return f"index.part-{part:05d}.json"


def encode_features(features: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(features), allow_pickle=False)
    return buffer.getvalue()


def decode_features(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not _VALID_NAME.match(value):
        raise ValueError(f"{what} must contain only letters, digits, '_' and '-' (no dots), got {value!r}")


def check_shard_name(name: Any, folder: str = "") -> None:
    """An index names its shards by plain file names inside its folder, nothing else.

    An index is data, possibly from elsewhere: a `pipe:` name would run a command, a URL would
    fetch, an absolute or '..' name would open files outside the shard set. Readers that want
    such sources pass urls to read_shard themselves.
    """
    problem = None
    if not isinstance(name, str) or not name:
        problem = "not a non-empty string"
    elif "/" in name or "\\" in name or name in (".", ".."):
        problem = "a path, not a file name"
    elif ":" in name:  # URL schemes, pipe:, drive letters
        problem = "has a ':' (URL, pipe: or drive)"
    elif "\0" in name:
        problem = "has a NUL character"
    if problem is not None:
        raise ValueError(
            f"shard name {name!r} in the index{' of ' + folder if folder else ''} is {problem}: indexes hold "
            "plain file names of shards in the index's folder (no path separators, '..', absolute paths, "
            "URLs or pipe: commands)"
        )


def check_label(label: Any, key: str) -> int:
    """The label as an int: a whole number in [UNLABELLED, MAX_LABEL] (bools and 1.5 are refused)."""
    if getattr(label, "ndim", None) == 0 and hasattr(label, "item"):  # 0-d numpy array / torch tensor
        label = label.item()
    value = None  # stays None for anything but a whole number
    if isinstance(label, (bool, np.bool_)):
        pass  # an int to Python, but a mask passed as labels is a mistake
    elif isinstance(label, numbers.Integral):
        value = int(label)
    elif isinstance(label, numbers.Real) and float(label).is_integer():  # labels read from a float .npy
        value = int(label)
    if value is None or not UNLABELLED <= value <= MAX_LABEL:
        raise ValueError(
            f"sample {key} has label {label!r}: labels must be integers in [{UNLABELLED}, {MAX_LABEL}] "
            f"({UNLABELLED} = unlabelled)"
        )
    return value


# ---------------------------------------------------------------------------------------------
# The index


@dataclass
class ShardInfo:
    name: str  # plain file name in the index's folder (check_shard_name)
    num_samples: int
    class_counts: Dict[int, int]  # label -> samples with that label in this shard

    def count_of(self, classes: Optional[Sequence[int]] = None) -> int:
        """Samples of this shard whose label is in classes (all samples if classes is None)."""
        if classes is None:
            return self.num_samples
        return sum(self.class_counts.get(int(c), 0) for c in classes)


@dataclass
class ShardIndex:
    """What readers need to plan epochs: per-shard counts and class histograms, feature layout."""

    kind: str
    shards: List[ShardInfo]
    feature_shape: Optional[List[int]] = None  # per-sample shape of x.npy (features only)
    dtype: Optional[str] = None
    class_names: Optional[List[str]] = None  # label -> name, where known (image folders)
    metadata: Dict[str, Any] = field(default_factory=dict)
    root: str = ""  # folder holding the index; not stored

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def class_histogram(self) -> Dict[int, int]:
        total: Counter = Counter()
        for s in self.shards:
            total.update(s.class_counts)
        return dict(sorted(total.items()))

    def urls(self) -> List[str]:
        return [self.url_of(s) for s in self.shards]

    def url_of(self, shard: ShardInfo) -> str:
        check_shard_name(shard.name, self.root)  # also for indexes built in code, not loaded
        # "./" for an index without a root: a bare "-" would be stdin to webdataset's gopen.
        return os.path.join(self.root or ".", shard.name)

    def check_shards(self) -> None:
        """ValueError for a shard name that is not a plain file name, or a shard listed twice
        (its samples would be delivered twice in every epoch)."""
        seen = set()
        for shard in self.shards:
            check_shard_name(shard.name, self.root)
            if shard.name in seen:
                raise ValueError(f"shard {shard.name!r} is listed twice in the index of {self.root or 'a shard set'}")
            seen.add(shard.name)

    def to_json(self) -> Dict[str, Any]:
        return {
            "version": INDEX_VERSION,
            "kind": self.kind,
            "num_samples": self.num_samples,
            "num_shards": self.num_shards,
            "feature_shape": self.feature_shape,
            "dtype": self.dtype,
            "class_histogram": {str(k): v for k, v in self.class_histogram.items()},
            "class_names": self.class_names,
            "metadata": self.metadata,
            "shards": [
                {"name": s.name, "num_samples": s.num_samples,
                 "class_counts": {str(k): v for k, v in sorted(s.class_counts.items())}}
                for s in self.shards
            ],
        }

    @classmethod
    def from_json(cls, data: Dict[str, Any], root: str = "") -> "ShardIndex":
        if data.get("version") != INDEX_VERSION or data.get("kind") not in KINDS:
            raise ValueError(f"not a kvb_dist shard index (version {INDEX_VERSION}, kind in {KINDS}): {root or data}")
        shards = [
            ShardInfo(s["name"], int(s["num_samples"]), {int(k): int(v) for k, v in s["class_counts"].items()})
            for s in data["shards"]
        ]
        index = cls(
            kind=data["kind"],
            shards=shards,
            feature_shape=data.get("feature_shape"),
            dtype=data.get("dtype"),
            class_names=data.get("class_names"),
            metadata=data.get("metadata") or {},
            root=root,
        )
        index.check_shards()
        return index

    def save(self, folder: Optional[str] = None, name: str = INDEX_NAME) -> str:
        self.check_shards()  # never write an index that loading would refuse
        folder = self.root if folder is None else folder
        path = os.path.join(folder, name)
        temporary = path + ".tmp"
        try:
            with open(temporary, "w") as f:
                json.dump(self.to_json(), f, indent=1)
            os.replace(temporary, path)
        except BaseException:  # a full disk or an interrupt: no partial file left behind
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        return path

    @classmethod
    def load(cls, path: str) -> "ShardIndex":
        """From a shard folder (its index.json) or an index file."""
        if os.path.isdir(path):
            path = os.path.join(path, INDEX_NAME)
        if not os.path.exists(path):
            raise ValueError(f"no shard index at {path}: write shards first (python -m kvb_dist.data --help)")
        with open(path) as f:
            return cls.from_json(json.load(f), root=os.path.dirname(os.path.abspath(path)))

    def summary(self) -> str:
        hist = self.class_histogram
        lines = [
            f"{self.kind} shards in {self.root}: {self.num_samples} samples in {self.num_shards} shards",
            f"feature shape {self.feature_shape}, dtype {self.dtype}" if self.kind == FEATURES else "images",
            f"classes ({len(hist)}): {hist}",
        ]
        if self.num_shards:
            sizes = [s.num_samples for s in self.shards]
            lines.append(f"samples per shard: min {min(sizes)}, max {max(sizes)}")
        if self.metadata:
            lines.append(f"metadata: {json.dumps(self.metadata, sort_keys=True)}")
        return "\n".join(lines)


def merge_index_parts(folder: str, parts: Optional[Sequence[str]] = None, metadata: Optional[Dict] = None) -> ShardIndex:
    """Combine the index parts of several writers (index.part-*.json) into index.json.

    Call it on one process after every writer closed (a barrier). The parts must agree on kind,
    feature shape and dtype; shards keep the order of the parts (sorted by name).
    """
    if parts is None:
        parts = sorted(glob.glob(os.path.join(folder, "index.part-*.json")))
    if not parts:
        raise ValueError(f"no index parts (index.part-*.json) in {folder}")
    loaded = [ShardIndex.load(p) for p in parts]
    first = loaded[0]
    for part, path in zip(loaded[1:], parts[1:]):
        if (part.kind, part.feature_shape, part.dtype) != (first.kind, first.feature_shape, first.dtype):
            raise ValueError(
                f"index part {path} has kind/shape/dtype {(part.kind, part.feature_shape, part.dtype)}, "
                f"but {parts[0]} has {(first.kind, first.feature_shape, first.dtype)}"
            )
    non_empty = [p for p in loaded if p.num_shards]
    merged = ShardIndex(
        kind=first.kind,
        shards=[s for p in loaded for s in p.shards],
        feature_shape=next((p.feature_shape for p in non_empty), first.feature_shape),
        dtype=next((p.dtype for p in non_empty), first.dtype),
        class_names=first.class_names,
        metadata={**first.metadata, **(metadata or {})},
        root=os.path.abspath(folder),
    )
    merged.save()
    return merged


# ---------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Writes samples into shards of `samples_per_shard` and, on close, the index.

    Use as a context manager; an exception inside the block removes the unfinished shard and
    writes no index.
    """

    def __init__(
        self,
        folder: str,
        *,
        kind: str = FEATURES,
        samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
        shard_prefix: str = "shard",
        key_prefix: str = "",
        index_name: str = INDEX_NAME,
        class_names: Optional[Sequence[str]] = None,
        metadata: Optional[Dict[str, Any]] = None,
        allow_nonfinite: bool = False,
        overwrite: bool = False,
    ):
        import webdataset  # noqa: F401  (fail early with a clear ImportError)

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be a positive integer, got {samples_per_shard!r}")
        _check_name("shard_prefix", shard_prefix)
        _check_name("key_prefix", key_prefix)
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(os.path.join(folder, index_name)) and not overwrite:
            raise ValueError(f"{os.path.join(folder, index_name)} exists; pass overwrite=True to replace the shard set")
        self.folder = os.path.abspath(folder)
        self.kind = kind
        self.samples_per_shard = samples_per_shard
        self.shard_prefix = shard_prefix
        self.key_prefix = key_prefix
        self.index_name = index_name
        self.allow_nonfinite = allow_nonfinite
        self.index = ShardIndex(
            kind=kind, shards=[], class_names=list(class_names) if class_names is not None else None,
            metadata=dict(metadata or {}), root=self.folder,
        )
        self._tar = None
        self._shard_counts: Counter = Counter()
        self._shard_samples = 0
        self._num_written = 0
        self._given_keys: set = set()
        self._closed = False

    # -- shard files

    def _open_shard(self) -> None:
        import webdataset as wds

        name = shard_file_name(self.shard_prefix, len(self.index.shards))
        self._path = os.path.join(self.folder, name)
        self._tar = wds.TarWriter(self._path + ".tmp", encoder=False, mtime=_FIXED_MTIME)
        self._shard_counts = Counter()
        self._shard_samples = 0

    def _finish_shard(self) -> None:
        self._tar.close()
        self._tar = None
        os.replace(self._path + ".tmp", self._path)
        self.index.shards.append(ShardInfo(os.path.basename(self._path), self._shard_samples, dict(self._shard_counts)))

    # -- samples

    def write(
        self,
        label: int,
        features: Optional[np.ndarray] = None,
        image: Optional[bytes] = None,
        image_field: str = "jpg",
        key: Optional[str] = None,
    ) -> str:
        """Writes one sample; returns its key. Features for kind="features", image bytes otherwise."""
        if self._closed:
            raise ValueError("the writer is closed")
        given_key = key is not None
        if not given_key:
            key = sample_key(self.key_prefix, self._num_written)
        elif not isinstance(key, str) or not key or "." in key or "/" in key:
            raise ValueError(f"sample keys must be non-empty strings without '.' or '/', got {key!r}")
        elif key in self._given_keys:
            # Readers derive per-sample random numbers from keys: they must be unique in the set.
            raise ValueError(f"duplicate sample key {key!r}")
        label = check_label(label, key)
        if given_key:
            self._given_keys.add(key)
        sample = {"__key__": key, LABEL_FIELD: str(label).encode()}
        if self.kind == FEATURES:
            if features is None:
                raise ValueError("a features shard set needs features for every sample")
            features = np.asarray(features, dtype=np.float32)
            if self.index.feature_shape is None:
                self.index.feature_shape, self.index.dtype = list(features.shape), str(features.dtype)
            elif list(features.shape) != self.index.feature_shape:
                raise ValueError(
                    f"sample {key} has feature shape {list(features.shape)}, the shard set has {self.index.feature_shape}"
                )
            if not self.allow_nonfinite and not np.isfinite(features).all():
                raise ValueError(f"sample {key} (shard {shard_file_name(self.shard_prefix, len(self.index.shards))}) "
                                 "has NaN or infinite features")
            sample[FEATURE_FIELD] = encode_features(features)
        else:
            if image is None:
                raise ValueError("an images shard set needs image bytes for every sample")
            if image_field not in set(IMAGE_FIELDS.values()):
                raise ValueError(f"image_field must be one of {sorted(set(IMAGE_FIELDS.values()))}, got {image_field!r}")
            sample[image_field] = bytes(image)
        if self._tar is None:
            self._open_shard()
        self._tar.write(sample)
        self._shard_counts[label] += 1
        self._shard_samples += 1
        self._num_written += 1
        if self._shard_samples >= self.samples_per_shard:
            self._finish_shard()
        return key

    def write_batch(self, features: np.ndarray, labels: Optional[Sequence[int]] = None, keys: Optional[Sequence[str]] = None) -> None:
        """Features [n, *shape] with labels [n] (UNLABELLED where None) and optional keys [n]."""
        features = np.asarray(features)
        num = features.shape[0]
        labels = np.full(num, UNLABELLED) if labels is None else np.asarray(labels).reshape(-1)
        if labels.shape[0] != num or (keys is not None and len(keys) != num):
            raise ValueError(f"features ({num}), labels ({labels.shape[0]}) and keys must have the same length")
        for i in range(num):
            # labels[i] unconverted: write checks it (int() would turn 1.5 into 1 and True into 1).
            self.write(labels[i], features=features[i], key=None if keys is None else keys[i])

    def close(self) -> ShardIndex:
        """Finishes the last shard and writes the index; returns it."""
        if not self._closed:
            if self._tar is not None:
                self._finish_shard()
            self.index.save(self.folder, self.index_name)
            self._closed = True
            logger.info("wrote %d samples in %d shards to %s", self.index.num_samples, self.index.num_shards, self.folder)
        return self.index

    def abort(self) -> None:
        """Drops the unfinished shard and writes no index."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            if os.path.exists(self._path + ".tmp"):
                os.remove(self._path + ".tmp")
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------
# Sources


def write_arrays(
    folder: str, features: np.ndarray, labels: Optional[Sequence[int]] = None, **writer_args
) -> ShardIndex:
    """Features [n, *shape] and labels [n] as a features shard set."""
    features = np.asarray(features)
    if features.ndim < 1 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty array [n, *shape], got shape {features.shape}")
    with ShardWriter(folder, kind=FEATURES, **writer_args) as writer:
        writer.write_batch(features, labels)
    return writer.index


def write_digits(folder: str, classes: Optional[Sequence[int]] = None, **writer_args) -> ShardIndex:
    """scikit-learn's 8x8 digits (1797 samples, 10 classes) as 64 features in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    features, labels = digits.data.astype(np.float32) / 16.0, digits.target
    if classes is not None:
        keep = np.isin(labels, list(classes))
        features, labels = features[keep], labels[keep]
    metadata = {"source": "sklearn.datasets.load_digits", "scale": "pixel / 16", **writer_args.pop("metadata", {})}
    return write_arrays(folder, features, labels, metadata=metadata, **writer_args)


def write_toy(
    folder: str,
    num_points: int = 10000,
    classes: Optional[Sequence[int]] = None,
    uniform: bool = False,
    seed: int = 0,
    **writer_args,
) -> ShardIndex:
    """Points of the paper's Fig. 2 toy (kvb_dist.toy): labelled class blobs, or unlabelled
    uniform points over the unit square (what the toy fits its keys on)."""
    import torch

    from kvb_dist.toy import NUM_CLASSES, ToyConfig, sample_classes, sample_uniform

    if num_points < 1:
        raise ValueError(f"num_points must be positive, got {num_points}")
    config = ToyConfig(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    if uniform:
        points, labels = sample_uniform(num_points, generator), None
    else:
        classes = tuple(range(NUM_CLASSES)) if classes is None else tuple(int(c) for c in classes)
        if not classes or any(not 0 <= c < NUM_CLASSES for c in classes):
            raise ValueError(f"classes must be a non-empty subset of 0..{NUM_CLASSES - 1}, got {classes}")
        points, labels = sample_classes(classes, num_points, config, generator)
        labels = labels.numpy()
    metadata = {"source": "kvb_dist.toy", "uniform": uniform, "seed": seed, **writer_args.pop("metadata", {})}
    return write_arrays(folder, points.numpy(), labels, metadata=metadata, **writer_args)


def image_folder_samples(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(path, label) of every image under root/<class name>/..., classes in sorted order."""
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root} does not exist")
    class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    samples = []
    for label, name in enumerate(class_names):
        for folder, subdirs, files in sorted(os.walk(os.path.join(root, name))):
            subdirs.sort()
            for file in sorted(files):
                if os.path.splitext(file)[1].lower() in IMAGE_FIELDS:
                    samples.append((os.path.join(folder, file), label))
    if not samples:
        raise ValueError(
            f"no images ({', '.join(sorted(IMAGE_FIELDS))}) found in {root}/<class name>/; "
            "expected one subfolder per class"
        )
    return samples, class_names


def write_image_folder(root: str, folder: str, **writer_args) -> ShardIndex:
    """An ImageFolder-style tree (root/<class name>/<image>) as image shards; the file bytes are
    stored unchanged (no re-encoding), labels follow the sorted class names."""
    samples, class_names = image_folder_samples(root)
    metadata = {"source": os.path.abspath(root), **writer_args.pop("metadata", {})}
    with ShardWriter(folder, kind=IMAGES, class_names=class_names, metadata=metadata, **writer_args) as writer:
        for path, label in samples:
            with open(path, "rb") as f:
                writer.write(label, image=f.read(), image_field=IMAGE_FIELDS[os.path.splitext(path)[1].lower()])
    return writer.index


def write_embeddings(
    folder: str,
    batches: Iterable,
    encoder: Callable,
    *,
    device: Optional[Any] = None,
    **writer_args,
) -> ShardIndex:
    """Runs every batch through a frozen encoder once and writes the embeddings as features.

    batches yields (inputs, labels) or (inputs, labels, keys); keys, when given, are kept (so an
    embedding shard set can be matched with its image shards). The encoder runs without
    gradients; an nn.Module is put in eval mode, as the freeze phase does. Later phases read the
    embeddings instead of running the encoder again.
    """
    import torch

    if isinstance(encoder, torch.nn.Module):
        encoder.eval()
    metadata = {"encoder": type(encoder).__name__, **writer_args.pop("metadata", {})}
    with ShardWriter(folder, kind=FEATURES, metadata=metadata, **writer_args) as writer, torch.no_grad():
        for batch in batches:
            inputs, labels, keys = (*batch, None)[:3] if len(batch) == 2 else batch
            if device is not None:
                inputs = inputs.to(device)
            embeddings = encoder(inputs)
            if isinstance(embeddings, (tuple, list)):
                embeddings = embeddings[0]
            embeddings = embeddings.detach().float().cpu().numpy()
            labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels
            writer.write_batch(embeddings, labels, keys)
    return writer.index

