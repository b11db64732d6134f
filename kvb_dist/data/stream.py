"""Reading shard sets: split by node and worker, equal steps on every rank, bad shards skipped.

    stream = ShardStream("shards/", batch_size=256, rank=rank, world_size=world_size)
    for batch in stream:            # Batch(x [b, *shape] float32, labels [b], ids [b], keys)
        ...

Splitting. Every epoch the shard list is put in an order that depends on (seed, epoch) only, so
all ranks agree on it; rank r reads shards r, r + W, ... of that order (an explicit rank and
world size, never RANK/WORLD_SIZE from the environment, see DESIGN §5) and DataLoader worker w
of that rank every num_workers-th of those. An epoch therefore covers every sample exactly once
across ranks. Fewer shards than ranks x workers is an error (some reader would get nothing)
unless `resampled=True`, where every reader draws shards with replacement from its own seeded
stream and an epoch is `batches_per_epoch` batches long.

Equal steps. Ranks whose shards hold more samples deliver more batches; collectives inside a
step then hang. Either use resampled shards with a fixed `batches_per_epoch`, or pass
`batches_per_epoch=agreed_num_batches(index, ...)` (computed from the index, identical on every
rank), and wrap the loop in `lockstep(stream, layout.all_reduce_world)` so that a shard lost to
corruption ends the epoch on every rank at once instead of hanging the others.

Faults. Each shard is read whole and checked against the index (sample count, labels, feature
shape, dtype) before any of its samples is used, so a corrupt or truncated shard is skipped
entirely, logged once and counted in `stream.stats` (shards, and their samples from the index);
more than `max_bad_fraction` of the shards bad raises. On several ranks the limit is applied
by `stream.check_bad_shards(all_reduce_sum)` (call it after each epoch, where all ranks are in
step): it counts over all ranks and raises on every rank. A rank never raises over the limit
alone, since the others would wait for it in their next collective. An empty shard (a tar
without members, 0 samples in the index) is read as empty, not as bad. NaN or infinite features
raise with the shard and key they came from (or skip the shard, `nonfinite="skip_shard"`).

Do not pass a ShardStream (or its DataLoader) through accelerator.prepare: it splits the data
itself, and Accelerate's sharding would drop or duplicate samples (DESIGN §5).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import random
import tarfile
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from kvb_dist.data.shards import (
    FEATURE_FIELD,
    FEATURES,
    IMAGE_FIELDS,
    LABEL_FIELD,
    ShardIndex,
    ShardInfo,
    decode_features,
    encode_features,
)

logger = logging.getLogger(__name__)

NONFINITE_POLICIES = ("error", "skip_shard")
_IMAGE_FIELD_NAMES = tuple(sorted(set(IMAGE_FIELDS.values())))


class Batch(NamedTuple):
    x: Any  # features [b, *shape] float32; images: raw bytes per sample, or decode()'s outputs (stacked if tensors)
    labels: torch.Tensor  # [b] int64
    ids: torch.Tensor  # [b] int64, a stable hash of each key (see key_ids)
    keys: List[str]


class ShardProblem(Exception):
    """A shard that cannot be used (missing, corrupt, truncated, or not what the index says)."""


class NonFiniteFeatures(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# Pure helpers (also what agreed_num_batches replays)


def key_ids(keys: Sequence[str]) -> torch.Tensor:
    """Stable signed 64-bit ids [n] of sample keys: the same on every process and every run
    (Python's hash() is salted per process, so it cannot be used)."""
    ids = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little", signed=True) for k in keys]
    return torch.tensor(ids, dtype=torch.int64)


def epoch_shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> List[int]:
    """Order of the shards in an epoch: a function of (seed, epoch) only, so every rank agrees."""
    order = list(range(num_shards))
    if shuffle:
        # A string seed is hashed with SHA-512 by random.Random: stable across processes.
        random.Random(f"kvb_dist-shards-{seed}-{epoch}").shuffle(order)
    return order


def reader_shards(order: Sequence[int], rank: int, world_size: int, worker: int = 0, num_workers: int = 1) -> List[int]:
    """The shards reader (rank, worker) gets: node split, then worker split (round robin).

    >>> reader_shards(list(range(7)), rank=1, world_size=2, worker=0, num_workers=2)
    [1, 5]
    """
    return list(order[rank::world_size][worker::num_workers])


def selected_shards(index: ShardIndex, classes: Optional[Sequence[int]] = None) -> List[ShardInfo]:
    """The shards with at least one sample of the wanted classes (all shards without a filter)."""
    if classes is None:
        return list(index.shards)
    return [s for s in index.shards if s.count_of(classes) > 0]


def check_enough_shards(num_shards: int, world_size: int, num_workers: int) -> None:
    readers = world_size * max(num_workers, 1)
    if num_shards < readers:
        raise ValueError(
            f"{num_shards} shard(s) cannot feed {world_size} rank(s) x {max(num_workers, 1)} worker(s) = {readers} "
            "readers: some would read nothing and the ranks would run different numbers of steps. Write more, "
            "smaller shards (samples_per_shard), use fewer workers, or read with resampled=True and "
            "batches_per_epoch."
        )


def batches_per_rank(
    index: ShardIndex,
    batch_size: int,
    world_size: int,
    *,
    num_workers: int = 0,
    classes: Optional[Sequence[int]] = None,
    drop_last: bool = False,
    seed: int = 0,
    epoch: int = 0,
    shuffle_shards: bool = True,
) -> List[int]:
    """How many batches each rank's ShardStream delivers in an epoch (every worker batches its own
    shards, so each worker's last batch may be short)."""
    shards = selected_shards(index, classes)
    check_enough_shards(len(shards), world_size, num_workers)
    order = epoch_shard_order(len(shards), seed, epoch, shuffle_shards)
    workers = max(num_workers, 1)
    counts = []
    for rank in range(world_size):
        total = 0
        for worker in range(workers):
            n = sum(shards[i].count_of(classes) for i in reader_shards(order, rank, world_size, worker, workers))
            total += n // batch_size if drop_last else math.ceil(n / batch_size)
        counts.append(total)
    return counts


def agreed_num_batches(index: ShardIndex, batch_size: int, world_size: int, **reader_args) -> int:
    """Batches every rank can deliver this epoch: the minimum over ranks of batches_per_rank.

    Read from the index, so every rank computes the same number without communicating; pass it
    as ShardStream(batches_per_epoch=...). Same keyword arguments as batches_per_rank.
    """
    return min(batches_per_rank(index, batch_size, world_size, **reader_args))


def lockstep(batches: Iterable, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> Iterator:
    """Yields batches while every rank has one; all ranks stop at the same step.

    One all-reduce of a "no batch here" flag per step (e.g. layout.all_reduce_world): a rank that
    runs out early (a skipped shard) ends the epoch everywhere instead of leaving the others
    waiting in a collective. The remaining batches of the other ranks are dropped.
    """
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        missing = torch.tensor([1.0 if batch is None else 0.0])
        if float(all_reduce_sum(missing)[0]) > 0:
            return
        yield batch


# ---------------------------------------------------------------------------------------------
# Reading one shard


@dataclass
class ShardData:
    url: str
    keys: List[str]
    labels: np.ndarray  # [n] int64
    features: Optional[np.ndarray]  # [n, *shape] float32 (features kind)
    images: Optional[List[Tuple[str, bytes]]]  # (field, bytes) per sample (images kind)


_ZERO_BLOCK = bytes(512)


def _octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _plain_tar_members(data: bytes) -> Optional[List[Tuple[str, bytes]]]:
    """(name, bytes) of every member of a plain ustar archive (what ShardWriter writes), or None
    for anything else (PAX / GNU headers, bad checksum, truncation): the caller then parses with
    tarfile, which handles every format and says what is wrong.

    Python's tarfile spends ~50 us per member; this loop a few, which makes reading embedding
    shards (two members per sample) an order of magnitude faster.
    """
    members, offset, end = [], 0, len(data)
    try:
        while offset + 512 <= end:
            header = data[offset : offset + 512]
            if header == _ZERO_BLOCK:
                return members
            if header[156:157] not in (b"0", b"\0") or header[257:262] != b"ustar":
                return None
            if _octal(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
                return None
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0]
            size = _octal(header[124:136])
            start = offset + 512
            if start + size > end:
                return None
            members.append(((prefix + b"/" + name if prefix else name).decode(), data[start : start + size]))
            offset = start + (size + 511) // 512 * 512
    except (ValueError, UnicodeDecodeError):
        return None
    return None


def _group_members(members: List[Tuple[str, bytes]]) -> List[Dict[str, Any]]:
    """Members -> samples: consecutive members with the same key (name up to the first dot of its
    last path component), as WebDataset groups them."""
    samples: List[Dict[str, Any]] = []
    for name, payload in members:
        folder, _, base = name.rpartition("/")
        key, dot, field_name = base.partition(".")
        if not dot or not key:
            continue
        key = f"{folder}/{key}" if folder else key
        if not samples or samples[-1]["__key__"] != key:
            samples.append({"__key__": key})
        field_name = field_name.lower()
        if field_name in samples[-1]:
            raise ShardProblem(f"duplicate file {name} in the tar file")
        samples[-1][field_name] = payload
    return samples


def _npy_header(shape: Sequence[int], dtype: str) -> bytes:
    """The .npy header every sample of a features shard set shares (same shape and dtype)."""
    empty = np.zeros(shape, dtype=dtype)
    encoded = encode_features(empty)
    return encoded[: len(encoded) - empty.nbytes]


def read_shard(url: str, info: ShardInfo, index: ShardIndex, nonfinite: str = "error") -> ShardData:
    """Reads a whole shard and checks it against the index; ShardProblem if it is unusable.

    Raises NonFiniteFeatures (naming the shard and the sample key) for NaN / inf features when
    nonfinite="error"; with "skip_shard" they make the shard a ShardProblem instead.
    """
    import webdataset as wds

    try:
        with wds.gopen(url, "rb") as stream:
            data = stream.read()
    except Exception as exc:  # missing file, permission, network: all make the shard unusable
        raise ShardProblem(f"cannot open: {exc}") from exc
    members = _plain_tar_members(data)
    if members is not None:
        samples = _group_members(members)
    else:
        try:
            files = wds.tariterators.tar_file_iterator(io.BytesIO(data))
            samples = list(wds.tariterators.group_by_keys(dict(f, __url__=url) for f in files))
        except (tarfile.TarError, EOFError, OSError, ValueError, KeyError) as exc:
            raise ShardProblem(f"corrupt tar file: {exc}") from exc
    if len(samples) != info.num_samples:
        raise ShardProblem(f"holds {len(samples)} samples, the index says {info.num_samples} (truncated?)")

    keys, labels = [], []
    for sample in samples:
        keys.append(sample["__key__"])
        try:
            labels.append(int(sample[LABEL_FIELD]))
        except (KeyError, ValueError) as exc:
            raise ShardProblem(f"sample {sample['__key__']} has no valid '{LABEL_FIELD}' label") from exc
    labels = np.asarray(labels, dtype=np.int64)
    found = dict(zip(*np.unique(labels, return_counts=True)))
    if {int(k): int(v) for k, v in found.items()} != info.class_counts:
        raise ShardProblem("labels differ from the index's class histogram")
    if not samples:  # an empty shard (a tar with no members) is valid: it has nothing to check or decode
        if index.kind != FEATURES:
            return ShardData(url, [], labels, None, [])
        return ShardData(url, [], labels, np.zeros((0, *(index.feature_shape or [])), dtype=np.float32), None)

    if index.kind != FEATURES:
        images = []
        for sample in samples:
            fields = [f for f in _IMAGE_FIELD_NAMES if f in sample]
            if not fields:
                raise ShardProblem(f"sample {sample['__key__']} has no image ({', '.join(_IMAGE_FIELD_NAMES)})")
            images.append((fields[0], sample[fields[0]]))
        return ShardData(url, keys, labels, None, images)

    features = _decode_all_features(samples, index)
    finite = np.isfinite(features.reshape(len(samples), -1)).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        message = (
            f"non-finite features (NaN or inf) in sample {keys[bad]} of shard {url} "
            f"({int((~finite).sum())} such sample(s) in this shard)"
        )
        if nonfinite == "error":
            raise NonFiniteFeatures(message)
        raise ShardProblem(message)
    return ShardData(url, keys, labels, features, None)


def _decode_all_features(samples: List[Dict[str, Any]], index: ShardIndex) -> np.ndarray:
    """[n, *shape] float32 from the samples' x.npy; ShardProblem for a missing or foreign array."""
    shape = list(index.feature_shape or [])
    try:
        payloads = [sample[FEATURE_FIELD] for sample in samples]
    except KeyError:
        missing = next(s["__key__"] for s in samples if FEATURE_FIELD not in s)
        raise ShardProblem(f"sample {missing} has no '{FEATURE_FIELD}'") from None
    # Fast path: every array carries the same header; decode all payloads at once.
    header = _npy_header(shape, index.dtype)
    size = len(header) + int(np.prod(shape, dtype=np.int64)) * np.dtype(index.dtype).itemsize
    if all(len(p) == size and p.startswith(header) for p in payloads):
        joined = b"".join(p[len(header):] for p in payloads)
        return np.frombuffer(joined, dtype=index.dtype).reshape(len(payloads), *shape).copy()
    rows = []
    for sample, payload in zip(samples, payloads):
        try:
            x = decode_features(payload)
        except Exception as exc:
            raise ShardProblem(f"sample {sample['__key__']} has no readable '{FEATURE_FIELD}': {exc}") from exc
        if list(x.shape) != shape or str(x.dtype) != index.dtype:
            raise ShardProblem(
                f"sample {sample['__key__']} has features {list(x.shape)} {x.dtype}, the index says {shape} {index.dtype}"
            )
        rows.append(x)
    return np.stack(rows) if rows else np.zeros((0, *shape), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Pipeline stages (run in the DataLoader workers when there are any)


@dataclass
class _ShardReport:
    """Passed from the reader (possibly a worker process) to the main process, once per shard."""

    url: str
    num_samples: int
    problem: Optional[str] = None


def _worker_info() -> Tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _identity(x):
    return x


class _ShardList(torch.utils.data.IterableDataset):
    """Yields dict(url=...) in the epoch's order (each reader then takes its part), or, resampled,
    an endless seeded draw with replacement that differs between readers."""

    def __init__(self, urls: List[str], seed: int, epoch: int, shuffle: bool, resampled: bool, rank: int):
        super().__init__()
        self.urls, self.seed, self.epoch, self.shuffle, self.resampled, self.rank = urls, seed, epoch, shuffle, resampled, rank

    def __iter__(self):
        if not self.resampled:
            for i in epoch_shard_order(len(self.urls), self.seed, self.epoch, self.shuffle):
                yield dict(url=self.urls[i])
            return
        worker, _ = _worker_info()
        rng = random.Random(f"kvb_dist-resample-{self.seed}-{self.epoch}-{self.rank}-{worker}")
        while True:
            yield dict(url=self.urls[rng.randrange(len(self.urls))])


def _split_by_rank(source, rank: int, world_size: int):
    """The explicit node splitter: no environment variables involved."""
    for i, item in enumerate(source):
        if i % world_size == rank:
            yield item


def _split_by_worker(source):
    worker, num_workers = _worker_info()
    for i, item in enumerate(source):
        if i % num_workers == worker:
            yield item


def _bad_shard_error(bad: Dict[str, str], total: int, max_bad_fraction: float) -> ValueError:
    shown = "; ".join(f"{url}: {problem}" for url, problem in list(bad.items())[:3])
    return ValueError(
        f"{len(bad)} of {total} shards are unreadable, more than max_bad_fraction={max_bad_fraction}: {shown}"
        + (" ..." if len(bad) > 3 else "")
    )


def _load_shards(source, infos: Dict[str, ShardInfo], index: ShardIndex, nonfinite: str, max_bad_fraction: float):
    """dict(url=...) -> a report per shard, then (key, x, label) per sample of the good shards."""
    bad: Dict[str, str] = {}
    total = len(infos)
    for item in source:
        url = item["url"]
        if url in bad:  # resampled: the same bad shard drawn again
            continue
        try:
            shard = read_shard(url, infos[url], index, nonfinite)
        except ShardProblem as problem:
            bad[url] = str(problem)
            yield _ShardReport(url, 0, str(problem))
            # More bad shards here alone than allowed overall: the whole run is over the limit.
            if len(bad) > max_bad_fraction * total or len(bad) == total:
                raise _bad_shard_error(bad, total, max_bad_fraction)
            continue
        yield _ShardReport(url, len(shard.keys))
        values = shard.features if shard.features is not None else shard.images
        for key, x, label in zip(shard.keys, values, shard.labels):
            yield key, x, int(label)


def _filter_classes(source, classes: Optional[frozenset]):
    for item in source:
        if classes is None or isinstance(item, _ShardReport) or item[2] in classes:
            yield item


def _shuffle(source, buffer_size: int, seed: int, epoch: int, rank: int):
    if buffer_size <= 1:
        yield from source
        return
    worker, _ = _worker_info()
    rng = random.Random(f"kvb_dist-shuffle-{seed}-{epoch}-{rank}-{worker}")
    buffer = []
    for item in source:
        if isinstance(item, _ShardReport):
            yield item
            continue
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _collate(items: List[Tuple[str, Any, int]], kind: str, decode: Optional[Callable]) -> Batch:
    keys = [k for k, _, _ in items]
    labels = torch.tensor([y for _, _, y in items], dtype=torch.int64)
    if kind == FEATURES:
        x = torch.from_numpy(np.stack([x for _, x, _ in items]))
    else:
        x = [decode(*image) if decode is not None else image[1] for _, image, _ in items]
        if x and isinstance(x[0], torch.Tensor):
            x = torch.stack(x)
    return Batch(x, labels, key_ids(keys), keys)


def _batched(source, batch_size: int, drop_last: bool, kind: str, decode: Optional[Callable]):
    pending: List = []
    for item in source:
        if isinstance(item, _ShardReport):
            yield item
            continue
        pending.append(item)
        if len(pending) == batch_size:
            yield _collate(pending, kind, decode)
            pending = []
    if pending and not drop_last:
        yield _collate(pending, kind, decode)


# ---------------------------------------------------------------------------------------------
# The reader


@dataclass
class StreamStats:
    shards_read: int = 0  # successful shard reads (a shard read in two epochs counts twice)
    samples_read: int = 0  # samples of those shards, before class filtering
    bad_shards: Dict[str, str] = field(default_factory=dict)  # url -> problem, each bad shard once
    samples_skipped: int = 0  # samples the index gives the bad shards, each bad shard once, before class filtering

    @property
    def shards_skipped(self) -> int:
        return len(self.bad_shards)


@dataclass(frozen=True)
class BadShardTotals:
    """Bad shards over all ranks (each counted once) and the samples the index gives them."""

    shards: int
    samples: int  # before class filtering, like StreamStats.samples_read


class ShardStream:
    """Batches of this rank's part of a shard set; see the module docstring.

    source: a shard folder, an index file or a loaded ShardIndex. classes: keep only samples with
    these labels (shards without any are not even opened). decode(field, bytes) turns image
    samples into inputs (raw bytes without it). Deterministic for a seed: the same (seed, epoch,
    rank, world_size, num_workers) give the same batches in the same order.
    """

    def __init__(
        self,
        source: Union[str, ShardIndex],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        classes: Optional[Sequence[int]] = None,
        resampled: bool = False,
        batches_per_epoch: Optional[int] = None,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        drop_last: bool = False,
        max_bad_fraction: float = 0.1,
        nonfinite: str = "error",
        decode: Optional[Callable[[str, bytes], Any]] = None,
    ):
        self.index = source if isinstance(source, ShardIndex) else ShardIndex.load(source)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
        if batches_per_epoch is not None and (not isinstance(batches_per_epoch, int) or batches_per_epoch < 0):
            raise ValueError(f"batches_per_epoch must be a non-negative integer or None, got {batches_per_epoch!r}")
        if resampled and batches_per_epoch is None:
            raise ValueError("resampled=True draws shards forever: give the epoch length as batches_per_epoch")
        self.classes = None if classes is None else frozenset(int(c) for c in classes)
        self.shards = selected_shards(self.index, None if classes is None else sorted(self.classes))
        if not self.shards:
            raise ValueError(f"no shard in {self.index.root} holds a sample of classes {sorted(self.classes or [])}")
        self.index.check_shards()  # an index built in code, not loaded: a duplicate would be read twice
        self._shard_of_url = {self.index.url_of(s): s for s in self.shards}
        if not resampled:
            check_enough_shards(len(self.shards), world_size, num_workers)
        self.batch_size = batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.resampled, self.batches_per_epoch = resampled, batches_per_epoch
        self.seed, self.shuffle_shards, self.shuffle_buffer, self.drop_last = seed, shuffle_shards, shuffle_buffer, drop_last
        self.max_bad_fraction, self.nonfinite, self.decode = max_bad_fraction, nonfinite, decode
        # The limit one rank applies alone: only a single rank sees the whole set; on several ranks
        # check_bad_shards applies it over all of them (a rank raising alone would hang the others).
        self._local_bad_fraction = max_bad_fraction if world_size == 1 else 1.0
        self.epoch = 0
        self.stats = StreamStats()

    def set_epoch(self, epoch: int) -> None:
        """Shard order, resampling and shuffling follow the epoch (like DistributedSampler)."""
        self.epoch = int(epoch)

    def _pipeline(self):
        import webdataset as wds

        urls, infos = list(self._shard_of_url), self._shard_of_url
        stages = [_ShardList(urls, self.seed, self.epoch, self.shuffle_shards, self.resampled, self.rank)]
        if not self.resampled:  # resampled readers each draw their own shards: nothing to split
            stages += [partial(_split_by_rank, rank=self.rank, world_size=self.world_size), _split_by_worker]
        stages += [
            partial(_load_shards, infos=infos, index=self.index, nonfinite=self.nonfinite,
                    max_bad_fraction=self._local_bad_fraction),
            partial(_filter_classes, classes=self.classes),
            partial(_shuffle, buffer_size=self.shuffle_buffer, seed=self.seed, epoch=self.epoch, rank=self.rank),
            partial(_batched, batch_size=self.batch_size, drop_last=self.drop_last, kind=self.index.kind,
                    decode=self.decode),
        ]
        return wds.DataPipeline(*stages)

    def _record(self, report: _ShardReport) -> None:
        if report.problem is None:
            self.stats.shards_read += 1
            self.stats.samples_read += report.num_samples
            return
        if report.url not in self.stats.bad_shards:
            self.stats.bad_shards[report.url] = report.problem
            self.stats.samples_skipped += self._shard_of_url[report.url].num_samples
            logger.warning("skipping shard %s: %s (%d skipped so far)", report.url, report.problem,
                           self.stats.shards_skipped)
        if self.stats.shards_skipped > self._local_bad_fraction * len(self.shards):
            raise _bad_shard_error(self.stats.bad_shards, len(self.shards), self.max_bad_fraction)

    def __iter__(self) -> Iterator[Batch]:
        pipeline = self._pipeline()
        if self.num_workers == 0:
            source = iter(pipeline)
        else:
            source = iter(torch.utils.data.DataLoader(
                pipeline, batch_size=None, num_workers=self.num_workers, collate_fn=_identity
            ))
        delivered = 0
        if self.batches_per_epoch == 0:
            return
        for item in source:
            if isinstance(item, _ShardReport):
                self._record(item)
                continue
            yield item
            delivered += 1
            if self.batches_per_epoch is not None and delivered >= self.batches_per_epoch:
                return

    def features_and_ids(self) -> "FeaturesAndIds":
        """A re-iterable view (x, ids) per batch: what streaming_kmeans reads, one pass per iter()."""
        return FeaturesAndIds(self)

    def check_bad_shards(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> BadShardTotals:
        """Bad shards over all ranks (each counted once) and their samples; raises on every rank if
        over the limit. One all-reduce (of a flag per shard).

        Call it where all ranks are in step (e.g. after an epoch): the per-rank check can only see
        its own shards, this one sees the whole set.
        """
        position = {url: i for i, url in enumerate(self._shard_of_url)}
        flags = torch.zeros(len(self.shards), dtype=torch.float64)
        for url in self.stats.bad_shards:
            flags[position[url]] = 1.0
        bad = (all_reduce_sum(flags) > 0).tolist()
        # Every rank has the same index, so the samples follow from the flags without a second reduce.
        totals = BadShardTotals(
            shards=sum(bad), samples=sum(s.num_samples for s, is_bad in zip(self.shards, bad) if is_bad)
        )
        if totals.shards > self.max_bad_fraction * len(self.shards):
            raise ValueError(
                f"{totals.shards} of {len(self.shards)} shards ({totals.samples} samples) are unreadable over all "
                f"ranks, more than max_bad_fraction={self.max_bad_fraction} (this rank's: {self.stats.bad_shards})"
            )
        return totals


class FeaturesAndIds:
    def __init__(self, stream: ShardStream):
        self.stream = stream

    def __iter__(self):
        for batch in self.stream:
            yield batch.x, batch.ids


def kmeans_from_stream(stream: ShardStream, num_pairs: int, layout=None, after_pass=None, **kmeans_args):
    """streaming_kmeans over the stream's shards, with the all-rank bad-shard check after each pass
    (then after_pass(), if given: e.g. a progress bar).

    The stream must not be resampled (a Lloyd pass is an epoch over this rank's shards).
    """
    from kvb_dist.kmeans import streaming_kmeans

    if stream.resampled:
        raise ValueError("k-means passes over the data set: use a ShardStream with resampled=False")
    if layout is not None and (layout.world_size, layout.rank) != (stream.world_size, stream.rank):
        raise ValueError(
            f"the stream reads as rank {stream.rank} of {stream.world_size}, the layout is rank {layout.rank} "
            f"of {layout.world_size}"
        )
    reduce_sum = None
    if layout is not None:
        device = torch.device(kmeans_args.get("device") or "cpu")
        reduce_sum = lambda t: layout.all_reduce_world(t.to(device)).cpu()  # noqa: E731
    def check() -> None:
        stream.check_bad_shards(reduce_sum or (lambda t: t))
        if after_pass is not None:
            after_pass()

    return streaming_kmeans(stream.features_and_ids(), num_pairs, layout, after_pass=check, **kmeans_args)
