"""Encoder factories for the tests: importable as ``encoder_factories:<name>`` with tests/ on
PYTHONPATH (pytest puts it there; the launcher tests pass it in the environment)."""

from __future__ import annotations

import torch
from torch import nn

CALLS = []  # the kwargs of every small_convnet call, to see whether a factory ran


class PooledPixels(nn.Module):
    """Images [b, h, w] or [b, c, h, w] -> average-pooled pixels [b, c, size, size] (c = 1 for gray)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim == 3:
            images = images[:, None]
        return nn.functional.adaptive_avg_pool2d(images, self.size)


def pooled_pixels(size: int = 4) -> nn.Module:
    return PooledPixels(size)


def small_convnet(channels: int = 8, seed: int = 0) -> nn.Module:
    """Gray images [b, h, w] -> [b, channels, 2, 2]: a seeded conv net, so runs compare."""
    CALLS.append({"channels": channels, "seed": seed})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            _AddChannel(),
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.AdaptiveAvgPool2d(2),
        )


class _AddChannel(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, None] if images.ndim == 3 else images


def double_precision() -> nn.Module:
    """An encoder whose output is float64: the embedder must hand back float32."""
    return _Double()


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def not_a_module(size: int = 4):
    return size
