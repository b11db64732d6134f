"""Train phase: values (and baselines) on the task stream, evaluated after every task.

Streams: every (setting, learner) pair, e.g. (class_incremental, kvb). Class-incremental
trains task after task on that task's classes only; iid trains once on all classes. After
each training task every task's test set is evaluated: row t of the accuracy matrix.

The global batch of step s is a pure function of (seed, stream, task, s); rank r uses its
r-th slice of it. So a run computes the same on any number of ranks (the sharded bottleneck
is exact, dense gradients are averaged), and a run resumed from a checkpoint continues
exactly where it stopped.

Keys are frozen here: each training sample's pair indices are looked up once and cached on the
ranks that own the codebooks, and a training step sends row ids to the owners, which gather the
values (`values_at_rows`): no encoder and no lookup. The values' gradients are sparse, so the
optimizer touches only the fetched rows.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kvb_dist.codebook import counter_randint
from kvb_dist.data.shards import ShardIndex
from kvb_dist.data.stream import NonFiniteFeatures, read_shard
from kvb_dist.decoders import MLP, LinearProbe
from kvb_dist.distributed.checkpoint import optimizer_tensors
from kvb_dist.distributed.layout import shard_ranges
from kvb_dist.run.checkpoint import CheckpointSeries
from kvb_dist.run import builders
from kvb_dist.run.builders import embeddings_dir, stream_name
from kvb_dist.run.stop import Preempted

logger = logging.getLogger(__name__)

SETTING_TAGS = {"class_incremental": 1, "iid": 2}
LEARNER_TAGS = {"kvb": 1, "linear_probe": 2, "mlp": 3}
LOOKUP_CHUNK = 512  # samples per lookup call when caching indices / evaluating
STOP_CHECK_EVERY = 10  # steps between asking whether a rank got SIGTERM


# ---------------------------------------------------------------------------------------------
# Data


# Unreadable shards tolerated in a split, as ShardStream's default limit.
MAX_BAD_FRACTION = 0.1
_SKIPPED, _NONFINITE = 1.0, 2.0


def load_split(folder, layout, label_of=None) -> Dict:
    """This rank's contiguous part of an embedding shard set, in key order, and every label.

    Returns features [n_mine, d] of rows start..stop of the split (`rows`: (start, stop), the
    ranges `rank_chunks` uses), labels [N] of all rows (mapped by `label_of`, original labels ->
    0..K-1 or -1), and how many samples unreadable shards held. The freeze phase names shards so
    that, sorted by name, they list the samples in key order; a rank reads only the shards that
    hold its rows, so no rank holds the whole set's features.

    A shard unreadable on any rank is dropped on all of them, so ranks never train on different
    sets; the ranges then move and a rank reads the shards its new range needs. More bad shards
    than MAX_BAD_FRACTION, or NaN / inf features anywhere, raise on every rank.
    """
    index = layout.decided_on_rank0(lambda: ShardIndex.load(str(folder)))
    shards = sorted(index.shards, key=lambda info: info.name)
    problems = torch.zeros(len(shards), dtype=torch.float64)
    read: Dict[int, object] = {}
    known_bad = 0
    while True:
        kept = [i for i in range(len(shards)) if problems[i] == 0]
        ends = np.cumsum([shards[i].num_samples for i in kept])
        start, stop = shard_ranges(int(ends[-1]) if len(ends) else 0, layout.world_size)[layout.rank]
        mine = [i for i, end, size in zip(kept, ends, (shards[i].num_samples for i in kept)) if end > start and end - size < stop]
        for i in mine:
            if i in read:
                continue
            try:
                read[i] = read_shard(index.url_of(shards[i]), shards[i], index)
            except NonFiniteFeatures as error:
                problems[i] = _NONFINITE
                logger.error("%s", error)
            except Exception as error:  # missing, truncated, corrupt: decided together below
                problems[i] = _SKIPPED
                logger.warning("shard %s is unreadable here: %s", index.url_of(shards[i]), error)
        problems = layout.all_reduce_world(problems, op=dist.ReduceOp.MAX)
        bad = [i for i in range(len(shards)) if problems[i] > 0]
        if any(problems[i] == _NONFINITE for i in bad):
            raise ValueError(f"NaN or infinite features in {folder} (see the log of the rank that read them)")
        if len(bad) > MAX_BAD_FRACTION * len(shards):
            raise ValueError(
                f"{len(bad)} of {len(shards)} shards of {folder} are unreadable on some rank, more than "
                f"{MAX_BAD_FRACTION:.0%}: {[shards[i].name for i in bad][:5]}"
            )
        if len(bad) == known_bad:  # no rank found a new bad shard: every rank read its whole range
            break
        known_bad = len(bad)
    if not len(ends) or not ends[-1]:
        raise ValueError(f"no samples in {folder}")
    dim = math.prod(index.feature_shape)
    pieces = [read[i] for i in mine]
    keys = [key for piece in pieces for key in piece.keys]
    first = int(ends[kept.index(mine[0])] - shards[mine[0]].num_samples) if mine else start
    keys = keys[start - first : stop - first]
    if any(a >= b for a, b in zip(keys, keys[1:])):
        raise ValueError(f"the shards of {folder} do not list their samples in key order: rewrite them (--redo freeze)")
    features = torch.from_numpy(np.concatenate([p.features.reshape(len(p.keys), dim) for p in pieces] or [np.zeros((0, dim), np.float32)]))
    labels = torch.from_numpy(np.concatenate([p.labels for p in pieces] or [np.zeros(0, np.int64)])).long()
    features, labels = features[start - first : stop - first], labels[start - first : stop - first]
    (labels,), _ = layout.gather_rows(labels)  # every rank's part, in rank order: all labels
    return {
        "features": features.contiguous(),
        "labels": labels if label_of is None else label_of(labels),
        "rows": (start, stop),
        "dim": dim,
        "samples_skipped": sum(shards[i].num_samples for i in bad),
    }


def class_order(config, histogram: Dict[int, int]) -> List[int]:
    """The original labels in task order: data.class_order, or the train split's labels sorted
    (or shuffled with the seed for "random"); unlabelled samples (-1) are never a class."""
    present = sorted(label for label in histogram if label >= 0)
    order = config.data.class_order
    if order == "random":
        return [present[i] for i in np.random.default_rng(config.run.seed).permutation(len(present))]
    if not order:
        return present
    absent = [label for label in order if label not in histogram]
    if absent:
        raise ValueError(f"data.class_order names labels {absent[:10]} that the train split does not have; it has {present[:20]}")
    return list(order)


def label_mapping(order: Sequence[int]):
    """labels -> their position in `order` (0 .. K-1), -1 for labels not in it."""
    position = {label: i for i, label in enumerate(order)}
    return lambda labels: torch.tensor([position.get(label, -1) for label in labels.tolist()], dtype=torch.int64)


def task_class_order(ctx) -> List[int]:
    """The original labels in task order (collective); rank 0 saves them with the class names
    in classes.json: task t trains on positions t x classes_per_task .. of this list."""
    config = ctx.config

    def decide() -> List[int]:
        index = ShardIndex.load(str(embeddings_dir(ctx, "train")))
        order = class_order(config, index.class_histogram)
        needed = config.data.num_tasks * config.data.classes_per_task
        if needed > len(order):
            raise ValueError(
                f"data.num_tasks x data.classes_per_task = {needed} exceeds the {len(order)} classes of the train split; "
                f"valid: num_tasks x classes_per_task <= {len(order)}"
            )
        names = index.class_names
        record = {
            "class_order": order,
            "class_names": [names[label] for label in order] if names else None,
            "tasks": [order[t * config.data.classes_per_task : (t + 1) * config.data.classes_per_task] for t in range(config.data.num_tasks)],
        }
        path = ctx.path("classes.json")
        temporary = path.with_name(".classes.json.tmp")
        temporary.write_text(json.dumps(record, indent=1))
        os.replace(temporary, path)
        return order

    return ctx.layout.decided_on_rank0(decide)


def task_classes(config) -> List[List[int]]:
    per = config.data.classes_per_task
    return [list(range(t * per, (t + 1) * per)) for t in range(config.data.num_tasks)]


def rows_of(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    return torch.nonzero(torch.isin(labels, torch.tensor(classes)), as_tuple=True)[0]


def rank_chunks(num_rows: int, layout, rank=None):
    """A rank's (default: this one's) contiguous part of num_rows, in chunks of LOOKUP_CHUNK rows, and every rank's range.

    Every rank gets the same number of chunks (the last ones may be empty): each chunk is a
    forward of the sharded bottleneck, a collective call.
    """
    ranges = shard_ranges(num_rows, layout.world_size)
    start, stop = ranges[layout.rank if rank is None else rank]
    widest = max(b - a for a, b in ranges)
    chunks = [slice(start + first, min(start + first + LOOKUP_CHUNK, stop)) for first in range(0, widest, LOOKUP_CHUNK)]
    return chunks, ranges


def smallest_index_type(num_pairs: int) -> torch.dtype:
    """The smallest integer type that holds every pair index 0 .. num_pairs - 1."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if num_pairs - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def global_batch(pool: torch.Tensor, size: int, seed: int, stream: int, task: int, step: int) -> torch.Tensor:
    """Rows of the global batch of a step: a pure function of its arguments."""
    picks = counter_randint(torch.tensor(seed), len(pool), torch.tensor(stream), torch.tensor(task), torch.tensor(step), torch.arange(size))
    return pool[picks]


# ---------------------------------------------------------------------------------------------
# Learners: logits for training rows and for features; state for checkpoints.


class BottleneckLearner:
    """Frozen splitter and keys; values trained; decoder = voting (mean of fetched values)."""

    sharded = True

    def __init__(self, ctx, init_checkpoints, train):
        self.ctx = ctx
        config = ctx.config
        self.splitter = builders.build_splitter(config, train["dim"]).to(ctx.device)
        # Every tensor comes from the initialize checkpoint (this rank's codebooks only): nothing is drawn first.
        self.bottleneck = builders.build_bottleneck(config, ctx.layout, device=ctx.device, from_checkpoint=True)
        init_checkpoints.load_(builders.init_tensors(self.splitter, self.bottleneck))
        self.bottleneck.freeze_keys()
        if config.bottleneck.values_init == "zeros":
            with torch.no_grad():
                self.bottleneck.values.zero_()
        self.owned_indices = self.cache_owned_indices(train)  # [N, C_mine, t]
        self.bottleneck.reset_cluster_size_counter()  # usage counts training steps only

    def parameters(self):
        return [self.bottleneck.values]

    def heads(self, features: torch.Tensor) -> torch.Tensor:
        return builders.to_heads(self.splitter, features.to(self.ctx.device))

    def cache_owned_indices(self, train: Dict) -> torch.Tensor:
        """Pair indices [N, C_mine, t] of every sample for the codebooks this rank holds.

        Each rank looks up its part of the samples (the features it holds); the owners keep what
        their shard group asked (`owned_indices`) and complete it from their replica group.
        Memory per rank: N x C / S x t in the smallest integer type that holds J.
        """
        layout, bottleneck = self.ctx.layout, self.bottleneck
        features, start = train["features"], train["rows"][0]
        num_rows = train["labels"].shape[0]
        first_peer = layout.replica_index * layout.num_shards
        peer_chunks = [rank_chunks(num_rows, layout, first_peer + s)[0] for s in range(layout.num_shards)]
        rows, indices = [], []
        with torch.no_grad():
            for j, chunk in enumerate(rank_chunks(num_rows, layout)[0]):
                mine = features[chunk.start - start : chunk.stop - start]
                indices.append(bottleneck.owned_indices(self.heads(mine)).movedim(1, 0).cpu())  # [I, C_mine, t]
                rows.append(torch.cat([torch.arange(num_rows)[chunks[j]] for chunks in peer_chunks]))
        # Each replica group looked up different samples: gather them over the replicas.
        (rows, indices), _ = layout.gather_rows(torch.cat(rows), torch.cat(indices).int(), over="replica")
        cache = torch.empty(num_rows, *indices.shape[1:], dtype=smallest_index_type(bottleneck.key_value_pairs_per_codebook))
        cache[rows] = indices.to(cache.dtype)
        return cache.to(self.ctx.device)

    def train_logits(self, batch_rows: torch.Tensor) -> torch.Tensor:
        rows = this_ranks_part(batch_rows, self.ctx.layout)
        values = self.bottleneck.values_at_rows(self.owned_indices, rows)  # [b, C, t, v]
        return values.mean(dim=(1, 2))

    def eval_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.heads(features))[0].mean(dim=(1, 2))

    def tensors(self, optimizer) -> Dict[str, torch.Tensor]:
        """The checkpointed state: this rank's codebooks and their optimizer state, as DTensors."""
        bottleneck = self.bottleneck
        moments = optimizer_tensors(optimizer, {"values": bottleneck.values}, {"values": bottleneck.global_view})
        return {
            **{f"bottleneck.{name}": t for name, t in bottleneck.sharded_state_dict().items()},
            **{f"optimizer.{name}": t for name, t in moments.items()},
        }


class DenseLearner:
    """Linear probe or MLP on the embeddings, replicated, gradients averaged over ranks.

    A rank holds the features of its contiguous part of the rows only; a step assembles its slice
    of the global batch's features from their holders (every rank draws the same global batch:
    one all-reduce of batch x d floats, each row given by exactly one rank, so the sum is exact)."""

    sharded = False

    def __init__(self, ctx, name, train):
        config = ctx.config
        torch.manual_seed(config.run.seed)  # same initial weights on every rank
        in_features, num_classes = train["dim"], config.bottleneck.dim_values
        if name == "linear_probe":
            self.model = LinearProbe(in_features, num_classes)
        else:
            self.model = MLP(in_features, config.train.mlp_hidden, num_classes)
        self.model.to(ctx.device)
        self.ctx, self.train = ctx, train

    def parameters(self):
        return list(self.model.parameters())

    def train_logits(self, batch_rows: torch.Tensor) -> torch.Tensor:
        return self.model(self.features_of(batch_rows).to(self.ctx.device))

    def features_of(self, batch_rows: torch.Tensor) -> torch.Tensor:
        """Features of this rank's slice of the global batch (batch_rows: its row ids, rank slices in order)."""
        layout, features = self.ctx.layout, self.train["features"]
        start, stop = self.train["rows"]
        held = (batch_rows >= start) & (batch_rows < stop)
        batch = torch.zeros(len(batch_rows), features.shape[1], dtype=features.dtype)
        batch[held] = features[batch_rows[held] - start]
        return this_ranks_part(layout.all_reduce_world(batch), layout)

    def eval_logits(self, features):
        return self.model(features.to(self.ctx.device))

    def tensors(self, optimizer) -> Dict[str, torch.Tensor]:
        """The checkpointed state: the replicated model and its optimizer state (written once)."""
        moments = optimizer_tensors(optimizer, dict(self.model.named_parameters()))
        return {
            **{f"model.{name}": t for name, t in self.model.state_dict().items()},
            **{f"optimizer.{name}": t for name, t in moments.items()},
        }


def key_usage_histogram(bottleneck, layout) -> Dict[str, List[float]]:
    """How often pairs were fetched: pairs per bin 0, 1, 2-3, 4-7, ... over all codebooks.

    Each rank bins its own codebooks and the bins are summed, so no rank gathers the counters.
    """
    counter = bottleneck.cluster_size_counter.double()
    largest = float(layout.all_reduce_world(counter.max().reshape(1) if counter.numel() else torch.zeros(1, dtype=torch.float64), op=dist.ReduceOp.MAX))
    num_bins = 2 + int(math.log2(largest)) if largest >= 1 else 1
    bins = torch.where(counter > 0, torch.floor(torch.log2(counter.clamp(min=1))) + 1, torch.zeros_like(counter)).long()
    histogram = torch.bincount(bins.flatten(), minlength=num_bins).double()
    # Every replica group holds the same counters: the world sum counts each pair R times.
    histogram = layout.all_reduce_world(histogram) / layout.num_replicas
    lower = [0.0] + [float(2**b) for b in range(num_bins - 1)]
    return {"lower_edges": lower, "pairs": histogram.tolist()}


# ---------------------------------------------------------------------------------------------
# Steps


# The values' gradients are sparse (only fetched rows): these optimizers then change only the
# fetched rows. "adam" is lazy Adam (torch.optim.SparseAdam): moments of rows a step did not
# fetch are left as they are, so an untouched row never moves.
VALUE_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.SparseAdam, "adagrad": torch.optim.Adagrad}


def make_optimizer(config, learner):
    if isinstance(learner, BottleneckLearner):
        return VALUE_OPTIMIZERS[config.train.optimizer](learner.parameters(), lr=config.train.lr)
    return torch.optim.Adam(learner.parameters(), lr=config.train.baseline_lr)


def clip_gradients_(learner, max_norm: float, layout) -> float:
    """Clips by the global gradient norm; sharded gradients are summed over the shard groups.

    Sparse gradients are coalesced first, so a row fetched twice counts once, as in the dense norm.
    """
    grads = []
    for p in learner.parameters():
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()
        if p.grad is not None:
            grads.append(p.grad.values() if p.grad.is_sparse else p.grad)
    squares = sum((g.double().pow(2).sum() for g in grads), torch.zeros((), dtype=torch.float64))
    if learner.sharded:  # each replica group holds every codebook once
        squares = layout.all_reduce_world(squares.clone()) / layout.num_replicas
    norm = float(squares.sqrt())
    if norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def this_ranks_part(global_batch: torch.Tensor, layout) -> torch.Tensor:
    """This rank's slice of a global batch (rows; the batch size is a multiple of the world size)."""
    local = len(global_batch) // layout.world_size
    return global_batch[layout.rank * local : (layout.rank + 1) * local]


def train_step(ctx, learner, optimizer, batch_rows, labels) -> torch.Tensor:
    """One step on the global batch batch_rows (the same on every rank); labels [N] of all rows."""
    config, layout = ctx.config, ctx.layout
    optimizer.zero_grad(set_to_none=True)
    logits = learner.train_logits(batch_rows)
    mine = labels[this_ranks_part(batch_rows, layout)]
    loss = F.cross_entropy(logits, mine.to(logits.device), label_smoothing=config.train.label_smoothing)
    loss.backward()
    grads = [p.grad for p in learner.parameters() if p.grad is not None]
    if not learner.sharded and layout.world_size > 1 and grads:
        # Replicated parameters: the mean over the global batch, in one all-reduce for all of them.
        flat = layout.all_reduce_world(torch.cat([g.reshape(-1) for g in grads])).div_(layout.world_size)
        for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(averaged.view_as(g))
    if config.train.grad_clip > 0:
        clip_gradients_(learner, config.train.grad_clip, layout)
    optimizer.step()
    return loss.detach()


def accuracy_per_task(ctx, learner, test, tasks) -> List[float]:
    """Accuracy on each task's test samples; each rank evaluates a part, counts are summed."""
    layout = ctx.layout
    bottleneck = learner.bottleneck if isinstance(learner, BottleneckLearner) else None
    masking = bottleneck is not None and ctx.config.train.mask_unused_pairs
    if bottleneck is not None:  # usage counts training only: evaluation must not add to them
        counter = bottleneck.cluster_size_counter.clone()
    if masking:  # never-used pairs are excluded from the lookup, as in the paper
        bottleneck.deactivate_counts()
    chunks, ranges = rank_chunks(test["labels"].shape[0], layout)
    start, stop = ranges[layout.rank]
    with torch.no_grad():
        features = test["features"]  # rows start..stop
        predictions = [learner.eval_logits(features[rows.start - start : rows.stop - start]).argmax(-1).cpu() for rows in chunks]
    if bottleneck is not None:
        bottleneck.activate_counts()
        bottleneck.cluster_size_counter.copy_(counter)
    predicted = torch.cat(predictions)
    labels = test["labels"][start:stop]
    counts = torch.zeros(len(tasks), 2, dtype=torch.float64)
    for t, classes in enumerate(tasks):
        mask = torch.isin(labels, torch.tensor(classes))
        counts[t, 0] = (predicted[mask] == labels[mask]).sum()
        counts[t, 1] = mask.sum()
    counts = layout.all_reduce_world(counts)
    return (counts[:, 0] / counts[:, 1].clamp(min=1)).tolist()


# ---------------------------------------------------------------------------------------------
# Streams


def stream_checkpoints(ctx, setting: str, learner_name: str) -> CheckpointSeries:
    name = stream_name(setting, learner_name)
    return CheckpointSeries(ctx.path("checkpoints"), name, ctx.layout, background=ctx.config.run.async_checkpoints)


def build_learner(ctx, name, init_checkpoints, train):
    if name == "kvb":
        return BottleneckLearner(ctx, init_checkpoints, train)
    return DenseLearner(ctx, name, train)


def run_stream(ctx, setting: str, learner_name: str, init_checkpoints, train, test) -> Dict:
    """Trains one learner on one setting (resuming from its checkpoint); returns its record."""
    config, layout = ctx.config, ctx.layout
    series = stream_checkpoints(ctx, setting, learner_name)
    saved = series.record
    if saved is not None and saved["done"]:
        logger.info("train: %s / %s already done", setting, learner_name)
        return saved["record"]
    tasks = task_classes(config)
    plan = [(t, classes) for t, classes in enumerate(tasks)] if setting == "class_incremental" else [(0, sum(tasks, []))]
    steps_per_task = config.train.steps_per_task if setting == "class_incremental" else config.train.iid_steps
    if config.train.batch_size % layout.world_size:
        raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by the world size {layout.world_size}")

    learner = build_learner(ctx, learner_name, init_checkpoints, train)
    optimizer = make_optimizer(config, learner)
    record = {
        "setting": setting, "learner": learner_name, "tasks": tasks, "accuracy": [], "losses": [],
        "samples_skipped": {"train": train["samples_skipped"], "test": test["samples_skipped"]},
    }
    task_index, step = 0, 0
    if saved is not None:
        series.load_(learner.tensors(optimizer))
        record, task_index, step = saved["record"], saved["task"], saved["step"]
        logger.info("train: %s / %s resumes at task %d step %d", setting, learner_name, task_index, step)

    def save(done: bool, wait: bool = True) -> None:
        progress = {"record": copy.deepcopy(record), "task": task_index, "step": step, "done": done}
        series.save(learner.tensors(optimizer), progress, wait=wait)

    stream_tag = SETTING_TAGS[setting] * 10 + LEARNER_TAGS[learner_name]
    prefix = f"{setting}/{learner_name}"
    while task_index < len(plan):
        t, classes = plan[task_index]
        pool = rows_of(train["labels"], classes)
        # A bar for people at a terminal; logs (and CI) get one line per task instead.
        progress = builders.progress_bar(ctx, f"{prefix} task {t}", steps_per_task, initial=step)
        started, started_step = time.perf_counter(), step
        while step < steps_per_task:
            batch_rows = global_batch(pool, config.train.batch_size, config.run.seed, stream_tag, t, step)
            loss = train_step(ctx, learner, optimizer, batch_rows, train["labels"])
            step += 1
            progress.update(1)
            if step % 10 == 0 or step == steps_per_task:
                elapsed = time.perf_counter() - started
                samples_per_s = (step - started_step) * config.train.batch_size / max(elapsed, 1e-9)
                ctx.tracker.log_stream(prefix, {f"{prefix}/loss": float(loss), f"{prefix}/samples_per_s": samples_per_s},
                                       task_index, step, steps_per_task)
                record["losses"].append(float(loss))
            # Asked every STOP_CHECK_EVERY steps: the agreement is an all-reduce, about a step's time on gloo.
            if (step % STOP_CHECK_EVERY == 0 or step == steps_per_task) and ctx.stop.agreed(layout):
                save(done=False)
                raise Preempted(f"{prefix} task {t} step {step}")
            if step % config.run.checkpoint_every == 0 and step < steps_per_task:
                save(done=False, wait=False)  # written in the background while training goes on
        progress.close()
        row = accuracy_per_task(ctx, learner, test, tasks)
        record["accuracy"].append(row)
        seen = row[: t + 1] if setting == "class_incremental" else row
        metrics = {f"{prefix}/accuracy_task_{j}": a for j, a in enumerate(row)}
        metrics[f"{prefix}/accuracy_seen"] = sum(seen) / len(seen)
        if isinstance(learner, BottleneckLearner):
            record["unused_keys"] = float(learner.bottleneck.fraction_of_unused_keys())
            metrics[f"{prefix}/unused_keys"] = record["unused_keys"]
        ctx.tracker.log_stream(prefix, metrics, task_index, step, steps_per_task)  # at the task's last step
        if ctx.is_main:
            logger.info("%s after task %d: %s", prefix, t, " ".join(f"{a:.3f}" for a in row))
        task_index, step = task_index + 1, 0
        if task_index < len(plan):
            save(done=False)
    if isinstance(learner, BottleneckLearner):
        record["key_usage"] = key_usage_histogram(learner.bottleneck, layout)
    save(done=True)
    return record


def run(ctx) -> List[Dict]:
    config = ctx.config
    label_of = label_mapping(task_class_order(ctx))
    train = load_split(embeddings_dir(ctx, "train"), ctx.layout, label_of)
    test = load_split(embeddings_dir(ctx, "test"), ctx.layout, label_of)
    init_checkpoints = builders.init_checkpoints(ctx)
    if init_checkpoints.record is None and "kvb" in config.train.learners:
        raise ValueError(f"no fitted keys at {init_checkpoints.record_path}: run the initialize phase first")
    num_classes = len(sum(task_classes(config), []))
    if num_classes > config.bottleneck.dim_values:
        raise ValueError(
            f"{num_classes} classes in the task stream need bottleneck.dim_values >= {num_classes} (voting decoder)"
        )
    return [
        run_stream(ctx, setting, learner, init_checkpoints, train, test)
        for setting in config.train.settings
        for learner in config.train.learners
    ]
