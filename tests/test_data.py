"""Shard writing and reading: index, splitting over ranks and workers, equal steps, faults."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from kvb_dist.distributed.spawn import run_ranks
from kvb_dist.data import (
    UNLABELLED,
    BadShardTotals,
    ShardIndex,
    ShardInfo,
    ShardStream,
    ShardWriter,
    agreed_num_batches,
    batches_per_rank,
    index_part_name,
    key_ids,
    lockstep,
    merge_index_parts,
    write_arrays,
    write_digits,
    write_embeddings,
    write_image_folder,
    write_toy,
)
from kvb_dist.data.__main__ import main as cli
from kvb_dist.data.stream import NonFiniteFeatures, epoch_shard_order, read_shard, reader_shards

# Samples of each part of the uneven shard set below (each part's shards have one size).
UNEVEN_PARTS = [(50, 2), (10, 1), (31, 3), (5, 1)]  # (samples per shard, shards)


def labelled_features(num: int, dim: int = 3, first: int = 0) -> tuple:
    """Features whose first entry is the sample number, so a reader's output can be traced back."""
    numbers = np.arange(first, first + num)
    features = np.stack([numbers, numbers % 7, -numbers], axis=1)[:, :dim].astype(np.float32)
    return features, numbers % 4


def write_uneven(folder: str) -> ShardIndex:
    """7 shards of 50, 50, 10, 31, 31, 31, 5 samples (208 in all), through merged index parts."""
    first = 0
    for part, (per_shard, shards) in enumerate(UNEVEN_PARTS):
        features, labels = labelled_features(per_shard * shards, first=first)
        keys = [f"s{n:06d}" for n in range(first, first + len(labels))]
        with ShardWriter(folder, samples_per_shard=per_shard, shard_prefix=f"part{part}",
                         index_name=index_part_name(part)) as writer:
            writer.write_batch(features, labels, keys)
        first += len(labels)
    return merge_index_parts(folder)


def read_all(stream) -> tuple:
    keys, features, labels = [], [], []
    for batch in stream:
        keys += batch.keys
        features.append(batch.x)
        labels.append(batch.labels)
    return keys, torch.cat(features) if features else torch.empty(0), torch.cat(labels) if labels else torch.empty(0)


# ---------------------------------------------------------------------------------------------
# Writing and the index


def test_write_arrays_index_and_round_trip(tmp_path):
    features, labels = labelled_features(23)
    index = write_arrays(str(tmp_path), features, labels, samples_per_shard=10)
    assert [s.num_samples for s in index.shards] == [10, 10, 3]
    assert index.feature_shape == [3] and index.dtype == "float32" and index.num_samples == 23
    assert index.class_histogram == {c: int((labels == c).sum()) for c in range(4)}
    stored = json.loads((tmp_path / "index.json").read_text())
    assert stored["num_samples"] == 23 and len(stored["shards"]) == 3
    assert ShardIndex.load(str(tmp_path)).class_histogram == index.class_histogram

    keys, x, y = read_all(ShardStream(str(tmp_path), batch_size=4, shuffle_shards=False))
    order = torch.argsort(x[:, 0])
    assert torch.equal(x[order], torch.from_numpy(features)) and torch.equal(y[order], torch.from_numpy(labels))
    assert len(set(keys)) == 23


def test_writing_is_reproducible_and_refuses_to_overwrite(tmp_path):
    features, labels = labelled_features(12)
    write_arrays(str(tmp_path / "a"), features, labels, samples_per_shard=5)
    write_arrays(str(tmp_path / "b"), features, labels, samples_per_shard=5)
    for name in ("shard-000000.tar", "shard-000002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(ValueError, match="overwrite"):
        write_arrays(str(tmp_path / "a"), features, labels)
    with pytest.raises(ValueError, match="duplicate"):
        with ShardWriter(str(tmp_path / "c")) as writer:
            writer.write(0, features[0], key="k1")
            writer.write(0, features[1], key="k1")
    assert not (tmp_path / "c" / "index.json").exists()  # a failed writer leaves no index
    with pytest.raises(ValueError, match="NaN"):
        write_arrays(str(tmp_path / "d"), np.full((2, 3), np.nan), [0, 1])


def test_digits_toy_and_cli(tmp_path, capsys):
    digits = write_digits(str(tmp_path / "digits"), classes=[0, 1], samples_per_shard=100)
    assert digits.feature_shape == [64] and set(digits.class_histogram) == {0, 1}
    toy = write_toy(str(tmp_path / "toy"), num_points=300, classes=[2, 5], samples_per_shard=128)
    assert toy.feature_shape == [2] and set(toy.class_histogram) == {2, 5} and toy.num_shards == 3
    _, x, _ = read_all(ShardStream(toy, batch_size=64))
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    uniform = write_toy(str(tmp_path / "uniform"), num_points=50, uniform=True)
    assert uniform.class_histogram == {-1: 50}

    np.save(tmp_path / "x.npy", np.ones((9, 2, 2), np.float32))
    np.save(tmp_path / "y.npy", np.arange(9) % 2)
    assert cli(["write-numpy", str(tmp_path / "np"), "--features", str(tmp_path / "x.npy"),
                "--labels", str(tmp_path / "y.npy"), "--samples-per-shard", "4"]) == 0
    assert ShardIndex.load(str(tmp_path / "np")).feature_shape == [2, 2]
    assert cli(["info", str(tmp_path / "np"), "--verify"]) == 0
    assert "9 samples in 3 shards" in capsys.readouterr().out
    assert cli(["write-toy", str(tmp_path / "np"), "--num-points", "5"]) == 2  # exists: clear error
    assert "overwrite" in capsys.readouterr().err


def rename_first_shard_in_index(folder, name: str) -> None:
    """Edits index.json as someone else's index could be: the first shard's name replaced."""
    path = os.path.join(folder, "index.json")
    with open(path) as f:
        data = json.load(f)
    data["shards"][0]["name"] = name
    with open(path, "w") as f:
        json.dump(data, f)


def test_index_names_must_be_plain_files_in_the_shard_folder(tmp_path, capsys):
    folder = tmp_path / "set"
    index = write_arrays(str(folder), *labelled_features(20), samples_per_shard=10)
    (tmp_path / "other").mkdir()
    shutil.copy(folder / "shard-000000.tar", tmp_path / "other" / "shard-000000.tar")
    marker = tmp_path / "marker"
    bad_names = [
        f"pipe:touch {marker}; cat {folder / 'shard-000000.tar'}",
        "pipe:cat shard-000000.tar",
        str(folder / "shard-000000.tar"),  # absolute
        "../other/shard-000000.tar",
        "file:shard-000000.tar",
        "http://example.com/shard-000000.tar",
        "..",
        "",
        "shard\0.tar",
        "shard-000000.tar\0",
    ]
    for name in bad_names:
        rename_first_shard_in_index(str(folder), name)
        with pytest.raises(ValueError, match="plain file names") as error:
            ShardIndex.load(str(folder))
        assert repr(name) in str(error.value)
        with pytest.raises(ValueError, match="plain file names"):
            read_all(ShardStream(str(folder), batch_size=4))
        assert cli(["info", str(folder), "--verify"]) == 2
        assert "plain file names" in capsys.readouterr().err
    assert not marker.exists()  # the pipe: command never ran

    # An index built in code is held to the same rule when read.
    built = ShardIndex(kind=index.kind, shards=[ShardInfo("../other/shard-000000.tar", 10, {})], root=str(folder))
    with pytest.raises(ValueError, match="plain file names"):
        built.url_of(built.shards[0])
    # read_shard itself still takes any url its caller writes, pipe: included.
    shard = index.shards[0]
    data = read_shard(f"pipe:cat {folder / shard.name}", shard, index)
    assert len(data.keys) == 10


def test_empty_shards_are_read_as_empty(tmp_path, capsys):
    features, labels = labelled_features(20)
    index = write_arrays(str(tmp_path), features, labels, samples_per_shard=10)
    with tarfile.open(tmp_path / "empty-tarfile.tar", "w"):
        pass  # tarfile's empty archive: end blocks padded to a 10 kB record
    (tmp_path / "empty-end-blocks.tar").write_bytes(bytes(1024))  # just the two end blocks
    index.shards += [ShardInfo("empty-tarfile.tar", 0, {}), ShardInfo("empty-end-blocks.tar", 0, {})]
    index.save()
    for name in ("empty-tarfile.tar", "empty-end-blocks.tar"):
        data = read_shard(str(tmp_path / name), ShardInfo(name, 0, {}), index)
        assert data.keys == [] and data.features.shape == (0, 3) and data.labels.shape == (0,)
    stream = ShardStream(str(tmp_path), batch_size=3, shuffle_shards=False)
    _, x, _ = read_all(stream)
    assert sorted(x[:, 0].long().tolist()) == list(range(20))
    assert stream.stats.shards_read == 4 and stream.stats.shards_skipped == 0
    assert cli(["info", str(tmp_path), "--verify"]) == 0
    assert "verified 4 shards: 0 bad, 2 empty" in capsys.readouterr().out


def test_a_shard_listed_twice_is_refused(tmp_path):
    index = write_arrays(str(tmp_path / "set"), *labelled_features(20), samples_per_shard=10)
    data = json.loads((tmp_path / "set" / "index.json").read_text())
    data["shards"].append(dict(data["shards"][0]))
    (tmp_path / "set" / "index.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'shard-000000.tar' is listed twice"):
        ShardIndex.load(str(tmp_path / "set"))
    index.shards.append(index.shards[0])  # built in code
    with pytest.raises(ValueError, match="listed twice"):
        ShardStream(index, batch_size=4)

    # Two writers with the same shard prefix: the second overwrote the first's shard.
    for part in range(2):
        with ShardWriter(str(tmp_path / "parts"), samples_per_shard=10, key_prefix=f"r{part}-",
                         index_name=index_part_name(part)) as writer:
            writer.write_batch(*labelled_features(5))
    with pytest.raises(ValueError, match="'shard-000000.tar' is listed twice"):
        merge_index_parts(str(tmp_path / "parts"))
    assert not (tmp_path / "parts" / "index.json").exists()


def test_labels_must_be_integers_in_range(tmp_path):
    features, _ = labelled_features(1)
    writer = ShardWriter(str(tmp_path))
    for i, label in enumerate([-2, 2**31, 1.5, True, np.bool_(False), float("nan"), "3", None]):
        with pytest.raises(ValueError, match=rf"sample bad{i} has label .* integers in \[-1, 2147483647\]"):
            writer.write(label, features[0], key=f"bad{i}")
    with pytest.raises(ValueError, match="sample 000000001 has label 1.5"):
        writer.write_batch(np.zeros((2, 3)), np.array([0, 1.5]))  # the first sample is written
    with pytest.raises(ValueError, match="sample 000000001 has label True"):
        writer.write_batch(np.zeros((1, 3)), np.array([True]))
    for i, label in enumerate([UNLABELLED, 2**31 - 1, np.int64(5), 3.0, np.float32(2), torch.tensor(4)]):
        writer.write(label, features[0], key=f"good{i}")
    writer.write(0, features[0], key="bad0")  # a refused sample's key is still free
    index = writer.close()
    assert index.class_histogram == {-1: 1, 0: 2, 2: 1, 3: 1, 4: 1, 5: 1, 2**31 - 1: 1}
    _, _, y = read_all(ShardStream(str(tmp_path), batch_size=16))
    assert sorted(y.tolist()) == [-1, 0, 0, 2, 3, 4, 5, 2**31 - 1]


def test_image_folder_shards(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    originals = {}
    for label, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            path = root / name / f"{i}.png"
            Image.new("RGB", (4, 5), color=(40 * i, 100 * label, 7)).save(path)
            originals[path.read_bytes()] = label
    index = write_image_folder(str(root), str(tmp_path / "shards"), samples_per_shard=4)
    assert index.kind == "images" and index.class_names == ["cat", "dog"] and index.class_histogram == {0: 3, 1: 3}
    raw = [(image, int(label)) for b in ShardStream(index, batch_size=2) for image, label in zip(b.x, b.labels)]
    assert sorted(raw) == sorted(originals.items())

    def decode(field, data):
        assert field == "png"
        return torch.from_numpy(np.array(Image.open(io.BytesIO(data)))).permute(2, 0, 1).float()

    batch = next(iter(ShardStream(index, batch_size=2, decode=decode)))
    assert batch.x.shape == (2, 3, 5, 4)


def test_embedding_shards_and_merged_parts(tmp_path):
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Dropout(0.5))  # eval mode: no dropout
    inputs, labels = torch.randn(30, 5), torch.arange(30) % 3
    # Two "ranks" embed their halves into one folder, then one merges the index parts.
    for part in range(2):
        rows = slice(15 * part, 15 * (part + 1))
        batches = [(inputs[rows][i : i + 4], labels[rows][i : i + 4]) for i in range(0, 15, 4)]
        write_embeddings(str(tmp_path), batches, encoder, samples_per_shard=8, shard_prefix=f"r{part}",
                         key_prefix=f"r{part}-", index_name=index_part_name(part))
    index = merge_index_parts(str(tmp_path))
    assert index.num_samples == 30 and index.num_shards == 4 and index.feature_shape == [6]
    keys, x, y = read_all(ShardStream(index, batch_size=7, shuffle_shards=False))
    order = sorted(range(30), key=lambda i: keys[i])  # r0-000000000 .. r1-000000014
    with torch.no_grad():
        expected = encoder(inputs)
    assert torch.allclose(x[order], expected, atol=1e-6) and torch.equal(y[order], labels)


def test_shards_from_other_tar_writers_are_read_too(tmp_path):
    """Our writer's plain ustar shards take a fast path; any other tar (here PAX headers, as
    WebDataset's own TarWriter writes with a float mtime) goes through tarfile, same samples."""
    import webdataset as wds

    features, labels = labelled_features(12)
    index = write_arrays(str(tmp_path), features, labels, samples_per_shard=12)
    fast = read_all(ShardStream(index, batch_size=5, shuffle_shards=False))
    path = str(tmp_path / index.shards[0].name)
    samples = list(wds.WebDataset(path, shardshuffle=False))
    with wds.TarWriter(path, encoder=False, mtime=1.5) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if k in ("__key__", "x.npy", "cls")})
    assert b"PaxHeader" in open(path, "rb").read(2048)
    slow = read_all(ShardStream(index, batch_size=5, shuffle_shards=False))
    assert fast[0] == slow[0] and torch.equal(fast[1], slow[1]) and torch.equal(fast[2], slow[2])


# ---------------------------------------------------------------------------------------------
# Reading: splitting, determinism, equal steps


def test_split_over_ranks_and_workers_covers_every_sample_once(tmp_path):
    index = write_uneven(str(tmp_path))
    all_keys = {f"s{n:06d}" for n in range(index.num_samples)}
    for world_size, num_workers in [(1, 0), (2, 0), (3, 0), (2, 2), (7, 0)]:
        seen, batches = [], []
        for rank in range(world_size):
            stream = ShardStream(index, batch_size=8, rank=rank, world_size=world_size, num_workers=num_workers, seed=3)
            keys, _, _ = read_all(stream)
            seen += keys
            batches.append(sum(1 for _ in stream))
        assert sorted(seen) == sorted(all_keys), (world_size, num_workers)
        assert batches == batches_per_rank(index, 8, world_size, num_workers=num_workers, seed=3)
    assert agreed_num_batches(index, 8, 3, seed=3) == min(batches_per_rank(index, 8, 3, seed=3))


def test_reading_is_deterministic_for_a_seed(tmp_path):
    index = write_uneven(str(tmp_path))

    def keys(**kw):
        return [b.keys for b in ShardStream(index, batch_size=16, shuffle_buffer=40, **kw)]

    assert keys(seed=5) == keys(seed=5)
    assert keys(seed=5) != keys(seed=6)
    stream = ShardStream(index, batch_size=16, seed=5)
    first = [b.keys for b in stream]
    stream.set_epoch(1)
    assert [b.keys for b in stream] != first
    assert epoch_shard_order(7, 5, 1) == epoch_shard_order(7, 5, 1) and sorted(epoch_shard_order(7, 5, 1)) == list(range(7))
    assert reader_shards(list(range(7)), rank=1, world_size=2, worker=1, num_workers=2) == [3]
    assert torch.equal(key_ids(["a", "b"]), key_ids(["a", "b"])) and key_ids(["a", "b"]).unique().numel() == 2


def test_class_filter_skips_shards_without_those_classes(tmp_path):
    features = np.arange(40, dtype=np.float32)[:, None]
    labels = np.repeat([0, 1, 2, 3], 10)  # one class per shard
    index = write_arrays(str(tmp_path), features, labels, samples_per_shard=10)
    stream = ShardStream(index, batch_size=6, classes=[1, 3])
    _, x, y = read_all(stream)
    assert sorted(y.tolist()) == [1] * 10 + [3] * 10
    assert stream.stats.shards_read == 2  # the class-0 and class-2 shards are never opened
    with pytest.raises(ValueError, match="no shard"):
        ShardStream(index, batch_size=6, classes=[9])


def test_too_few_shards_and_resampling(tmp_path):
    index = write_arrays(str(tmp_path), *labelled_features(30), samples_per_shard=10)  # 3 shards
    with pytest.raises(ValueError, match=r"3 shard\(s\) cannot feed 2 rank\(s\) x 2 worker\(s\)"):
        ShardStream(index, batch_size=4, rank=0, world_size=2, num_workers=2)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        ShardStream(index, batch_size=4, world_size=4, resampled=True)
    streams = [ShardStream(index, batch_size=4, rank=r, world_size=4, resampled=True, batches_per_epoch=9, seed=1)
               for r in range(4)]
    epochs = [[b.keys for b in s] for s in streams]
    assert all(len(e) == 9 for e in epochs)
    assert epochs[0] != epochs[1]  # ranks draw their own shards
    assert epochs[0] == [b.keys for b in streams[0]]  # and the same again for the same seed and epoch


# ---------------------------------------------------------------------------------------------
# Faults


def test_corrupt_and_missing_shards_are_skipped_and_counted(tmp_path, caplog):
    index = write_arrays(str(tmp_path), *labelled_features(100), samples_per_shard=10)  # 10 shards
    truncated = tmp_path / "shard-000003.tar"
    truncated.write_bytes(truncated.read_bytes()[:3000])  # cut inside a member
    at_boundary = tmp_path / "shard-000005.tar"
    at_boundary.write_bytes(at_boundary.read_bytes()[:1024 * 4])  # whole members only: silently short
    (tmp_path / "shard-000008.tar").write_bytes(b"not a tar file" * 100)
    stream = ShardStream(index, batch_size=7, max_bad_fraction=0.3)
    with caplog.at_level(logging.WARNING, logger="kvb_dist.data.stream"):
        _, x, _ = read_all(stream)
    assert stream.stats.shards_skipped == 3 and stream.stats.shards_read == 7
    expected = sorted(set(range(100)) - set(range(30, 40)) - set(range(50, 60)) - set(range(80, 90)))
    assert sorted(x[:, 0].long().tolist()) == expected  # a bad shard contributes nothing, not a prefix
    assert "truncated" in stream.stats.bad_shards[str(at_boundary)]
    assert sum("skipping shard" in r.message for r in caplog.records) == 3
    read_all(stream)  # a second pass skips them again without warning or counting twice
    assert stream.stats.shards_skipped == 3 and sum("skipping shard" in r.message for r in caplog.records) == 3
    assert stream.check_bad_shards(lambda t: t).shards == 3
    assert stream.stats.samples_skipped == 30  # from the index, though the truncated shards hold some

    os.remove(tmp_path / "shard-000000.tar")
    with pytest.raises(ValueError, match=r"4 of 10 shards are unreadable, more than max_bad_fraction=0.3"):
        read_all(ShardStream(index, batch_size=7, max_bad_fraction=0.3))
    with pytest.raises(ValueError, match="unreadable"):  # same rule inside DataLoader workers
        read_all(ShardStream(index, batch_size=7, max_bad_fraction=0.1, num_workers=2))


def test_skipped_samples_are_counted_from_the_index(tmp_path):
    index = write_uneven(str(tmp_path))  # shards of 50, 50, 10, 31, 31, 31, 5 samples
    for name in (index.shards[2].name, index.shards[6].name):
        (tmp_path / name).write_bytes(b"garbage")
    stream = ShardStream(index, batch_size=8, max_bad_fraction=0.3, classes=[0, 1, 2, 3])
    read_all(stream)
    read_all(stream)  # a second epoch: each bad shard counted once
    assert stream.stats.shards_skipped == 2 and stream.stats.samples_skipped == 15
    assert stream.stats.samples_read == 2 * (208 - 15)
    assert stream.check_bad_shards(lambda t: t) == BadShardTotals(shards=2, samples=15)
    # Two ranks: each sees its own bad shards; the all-rank totals add the other rank's flags.
    ranks = [ShardStream(index, batch_size=8, rank=r, world_size=2, max_bad_fraction=0.3, seed=1) for r in range(2)]
    for rank in ranks:
        read_all(rank)
    assert sum(r.stats.samples_skipped for r in ranks) == 15
    flags = [[1.0 if index.url_of(s) in r.stats.bad_shards else 0.0 for s in index.shards] for r in ranks]
    all_ranks = lambda t: torch.tensor(flags, dtype=t.dtype).sum(0)  # noqa: E731  (what all_reduce_sum gives)
    assert {r.check_bad_shards(all_ranks) for r in ranks} == {BadShardTotals(2, 15)}
    with pytest.raises(ValueError, match=r"2 of 7 shards \(15 samples\) are unreadable over all ranks"):
        ShardStream(index, batch_size=8, max_bad_fraction=0.2).check_bad_shards(all_ranks)


def test_nonfinite_features_are_reported_with_shard_and_key(tmp_path):
    features, labels = labelled_features(20)
    features[13, 1] = np.inf
    index = write_arrays(str(tmp_path), features, labels, samples_per_shard=5, allow_nonfinite=True)
    with pytest.raises(NonFiniteFeatures, match=r"sample 000000013 of shard .*shard-000002\.tar"):
        read_all(ShardStream(index, batch_size=4))
    stream = ShardStream(index, batch_size=4, nonfinite="skip_shard", max_bad_fraction=0.5)
    _, x, _ = read_all(stream)
    assert x.shape[0] == 15 and stream.stats.shards_skipped == 1


# ---------------------------------------------------------------------------------------------
# Ranks in step (gloo)


def _lockstep_worker(rank, world_size, folder, broken_folder):
    from kvb_dist.distributed.layout import ParallelLayout

    layout = ParallelLayout.build()
    index = ShardIndex.load(folder)
    stream = ShardStream(index, batch_size=8, rank=rank, world_size=world_size, seed=11)
    epoch_keys = [k for b in stream for k in b.keys]  # a plain epoch: uneven, every sample once
    # The agreed count from the index: every rank runs exactly that many steps.
    agreed = agreed_num_batches(index, 8, world_size, seed=11)
    steps = 0
    for _ in ShardStream(index, batch_size=8, rank=rank, world_size=world_size, seed=11, batches_per_epoch=agreed):
        layout.all_reduce_world(torch.ones(1))  # a collective inside the step, as training has
        steps += 1
    # In the broken copy every shard of rank 0 is corrupt: it has no batch at all, and lockstep
    # stops everybody at once instead of leaving the others waiting in the step's collective.
    broken = ShardStream(broken_folder, batch_size=8, rank=rank, world_size=world_size, seed=11, max_bad_fraction=0.5)
    short_steps = 0
    for _ in lockstep(broken, layout.all_reduce_world):
        layout.all_reduce_world(torch.ones(1))
        short_steps += 1
    return (epoch_keys, steps, agreed, short_steps, broken.check_bad_shards(layout.all_reduce_world))


@pytest.mark.timeout(120)
def test_uneven_shards_in_lockstep_on_three_ranks(tmp_path):
    index = write_uneven(str(tmp_path / "good"))
    shutil.copytree(tmp_path / "good", tmp_path / "broken")
    rank0_shards = reader_shards(epoch_shard_order(index.num_shards, 11, 0), rank=0, world_size=3)
    for i in rank0_shards:
        (tmp_path / "broken" / index.shards[i].name).write_bytes(b"garbage")
    results = run_ranks(3, _lockstep_worker, str(tmp_path / "good"), str(tmp_path / "broken"))
    keys = [k for r in results for k in r[0]]
    assert sorted(keys) == sorted(f"s{n:06d}" for n in range(index.num_samples))  # no drop, no duplicate
    assert len({len(r[0]) for r in results}) > 1  # the ranks really were uneven
    assert {r[1] for r in results} == {results[0][2]}  # every rank ran the agreed number of steps
    assert {r[3] for r in results} == {0}  # rank 0 had nothing: nobody stepped, nobody hung
    rank0_samples = sum(index.shards[i].num_samples for i in rank0_shards)
    # All ranks agree on the bad shards and the samples they held.
    assert {r[4] for r in results} == {BadShardTotals(len(rank0_shards), rank0_samples)}
