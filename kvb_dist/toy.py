"""The 2-D class-incremental toy of the paper (Träuble et al. 2023, Fig. 2).

Eight classes, each a Gaussian blob inside the unit square, arrive as four tasks of two
classes. Three learners see the tasks in sequence, each with a fresh Adam per task and
cross-entropy over all eight classes (class-incremental: no task labels, no masked heads):

- a key-value bottleneck: one codebook of 400 pairs on the raw point, keys fitted by EMA on
  uniform points over the square and then frozen, values (dim 8) read as logits directly
  (voting over one codebook is the identity); pairs that no training point fetched are
  masked at evaluation;
- a linear probe and a small MLP on the raw point.

Because a value step only moves the pairs its batch fetched, the bottleneck keeps what it
learned on earlier tasks, while the probe and the MLP overwrite it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kvb_dist.core import KeyValueBottleneck
from kvb_dist.decoders import MLP, CodebookVoting, LinearProbe

NUM_CLASSES = 8
TASKS: Tuple[Tuple[int, ...], ...] = ((0, 1), (2, 3), (4, 5), (6, 7))
LEARNERS = ("kvb", "linear", "mlp")


@dataclass(frozen=True)
class ToyConfig:
    num_pairs: int = 400
    key_init_steps: int = 1000
    key_init_batch: int = 256
    # Replaces keys that uniform points stop choosing: a random-normal init puts many keys
    # outside the square (with 0 here, 169 of 400 keys end inside it; with 0.05, all 400).
    # The EMA count of a live pair is about key_init_batch / num_pairs = 0.64.
    threshold_ema_dead_code: float = 0.05
    steps_per_task: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-2
    mlp_hidden: int = 64
    cluster_radius: float = 0.35  # class centres lie on this circle around the square's centre
    cluster_std: float = 0.04
    test_points_per_class: int = 500
    seed: int = 0
    # Ops on a few hundred 2-D points are too small to split: extra threads only synchronise.
    # Measured on a busy 2-core machine: 12 s for the protocol on one thread, 150 s on two.
    num_threads: int = 1


# ---------------------------------------------------------------------------------------------
# Data


def class_centers(config: ToyConfig) -> torch.Tensor:
    """[8, 2] centres on a circle inside the unit square; neighbours are > 6 std apart."""
    angles = torch.arange(NUM_CLASSES, dtype=torch.float32) * (2 * math.pi / NUM_CLASSES)
    return 0.5 + config.cluster_radius * torch.stack([angles.cos(), angles.sin()], dim=-1)


def sample_classes(
    classes: Sequence[int], num_points: int, config: ToyConfig, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """num_points points [n, 2] with labels [n], classes drawn uniformly from `classes`."""
    choice = torch.randint(len(classes), (num_points,), generator=generator)
    labels = torch.tensor(classes)[choice]
    noise = torch.randn(num_points, 2, generator=generator) * config.cluster_std
    points = (class_centers(config)[labels] + noise).clamp(0.0, 1.0)
    return points, labels


def sample_uniform(num_points: int, generator: torch.Generator) -> torch.Tensor:
    """Unlabelled points [n, 2] uniform over the input domain, for fitting the keys."""
    return torch.rand(num_points, 2, generator=generator)


def evaluation_set(config: ToyConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fixed, balanced test set over all eight classes."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(config.test_points_per_class)
    noise = torch.randn(labels.shape[0], 2, generator=generator) * config.cluster_std
    return (class_centers(config)[labels] + noise).clamp(0.0, 1.0), labels


# ---------------------------------------------------------------------------------------------
# Learners: each maps points [b, 2] to logits [b, 8]


class BottleneckClassifier(nn.Module):
    """The point is one head [b, 1, 2]; logits = mean of the fetched values (voting)."""

    def __init__(self, bottleneck: KeyValueBottleneck):
        super().__init__()
        self.bottleneck = bottleneck
        self.voting = CodebookVoting(num_codebooks=bottleneck.num_codebooks, topk=bottleneck.topk)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        (values,) = self.bottleneck(points[:, None, :])  # [b, 1, t, v]
        return self.voting(values)

    def start_task(self) -> None:
        self.bottleneck.activate_counts()  # training batches mark the pairs they fetch

    def end_task(self) -> None:
        self.bottleneck.deactivate_counts()  # evaluation never fetches an untrained pair


class PlainClassifier(nn.Module):
    """A decoder applied to the raw point."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.net(points)

    def start_task(self) -> None:
        pass

    def end_task(self) -> None:
        pass


@torch.no_grad()
def fit_keys_(bottleneck: KeyValueBottleneck, config: ToyConfig, generator: torch.Generator) -> None:
    """EMA steps on uniform points over the square, then frozen keys."""
    bottleneck.unfreeze_keys()
    for _ in range(config.key_init_steps):
        bottleneck(sample_uniform(config.key_init_batch, generator)[:, None, :])
    bottleneck.freeze_keys()


@contextlib.contextmanager
def torch_threads(num_threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_learners(
    config: ToyConfig, generator: torch.Generator, learners: Sequence[str] = LEARNERS
) -> Dict[str, nn.Module]:
    unknown = set(learners) - set(LEARNERS)
    if unknown:
        raise ValueError(f"unknown learners {sorted(unknown)}; valid: {LEARNERS}")
    models: Dict[str, nn.Module] = {}
    if "linear" in learners:
        torch.manual_seed(config.seed)  # per learner, so its init does not depend on the others
        models["linear"] = PlainClassifier(LinearProbe(2, NUM_CLASSES))
    if "mlp" in learners:
        torch.manual_seed(config.seed)
        models["mlp"] = PlainClassifier(MLP(2, config.mlp_hidden, NUM_CLASSES, depth=3))
    if "kvb" not in learners:
        return models
    bottleneck = KeyValueBottleneck(
        num_codebooks=1,
        key_value_pairs_per_codebook=config.num_pairs,
        dim_keys=2,
        dim_values=NUM_CLASSES,
        threshold_ema_dead_code=config.threshold_ema_dead_code,
        seed=config.seed,
        sparse_values=True,
    )
    fit_keys_(bottleneck, config, generator)
    return {"kvb": BottleneckClassifier(bottleneck), **models}


# ---------------------------------------------------------------------------------------------
# Protocol


def train_task_(model: nn.Module, classes: Sequence[int], config: ToyConfig, generator: torch.Generator) -> None:
    """steps_per_task Adam steps on the task's classes only; a fresh optimizer per task.

    The bottleneck's values get lazy Adam (sparse gradients): only the pairs a step fetched move.
    """
    model.start_task()
    adam = torch.optim.SparseAdam if isinstance(model, BottleneckClassifier) else torch.optim.Adam
    optimizer = adam(model.parameters(), lr=config.learning_rate)
    for _ in range(config.steps_per_task):
        points, labels = sample_classes(classes, config.batch_size, config, generator)
        loss = F.cross_entropy(model(points), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.end_task()


@torch.no_grad()
def accuracy(model: nn.Module, points: torch.Tensor, labels: torch.Tensor) -> float:
    if labels.numel() == 0:
        return float("nan")
    return (model(points).argmax(-1) == labels).float().mean().item()


def iterate_protocol(config: ToyConfig = ToyConfig(), learners: Sequence[str] = LEARNERS) -> Iterator[Dict]:
    """Runs the tasks in sequence and yields one record per task with, per learner, the
    accuracy on the classes seen so far ("seen") and on all eight classes ("all")."""
    generator = torch.Generator().manual_seed(config.seed)
    with torch_threads(config.num_threads):
        models = build_learners(config, generator, learners)
    test_points, test_labels = evaluation_set(config)
    seen: List[int] = []
    for task_index, classes in enumerate(TASKS):
        seen.extend(classes)
        is_seen = torch.isin(test_labels, torch.tensor(seen))
        record = {"task": task_index, "classes": tuple(classes)}
        for name, model in models.items():
            # Each learner draws its batches from its own stream, so adding or removing a
            # learner does not change the data the others see.
            task_generator = torch.Generator().manual_seed(config.seed * 1000 + task_index)
            with torch_threads(config.num_threads):
                train_task_(model, classes, config, task_generator)
                record[name] = {
                    "seen": accuracy(model, test_points[is_seen], test_labels[is_seen]),
                    "all": accuracy(model, test_points, test_labels),
                }
        if "kvb" in models:
            record["kvb_unused_pairs"] = models["kvb"].bottleneck.fraction_of_unused_keys().item()
        yield record


def run_protocol(config: ToyConfig = ToyConfig(), learners: Sequence[str] = LEARNERS) -> List[Dict]:
    return list(iterate_protocol(config, learners))
