"""Decoders of the paper, on top of the fetched values.

They take the bottleneck's non-concatenated values ``[b, C, t, *spatial, v]`` or concatenated,
pooled values ``[b, C*t*v]``.

Shape legend: b batch, C codebooks, t pairs fetched per position (topk), v value dim.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class CodebookVoting(nn.Module):
    """The paper's non-parametric decoder: logits [b, v] = mean of all fetched values.

    The mean runs over codebooks, the top-k axis and positions, so with v = number of classes
    every fetched value votes for the classes. No parameters: learning happens in the values.

    value_axis: the axis of v in non-concatenated input (-1 for [b, C, t, *spatial, v]; 3 for a
    channel-first wrapper's [b, C, t, v, *spatial]). A 2-D input is taken as concatenated
    [b, C*t*v] with features ordered (C, t, v) and needs num_codebooks (and topk if > 1).
    """

    def __init__(self, num_codebooks: Optional[int] = None, topk: int = 1, value_axis: int = -1):
        super().__init__()
        if num_codebooks is not None and (not isinstance(num_codebooks, int) or num_codebooks < 1):
            raise ValueError(f"num_codebooks must be a positive integer or None, got {num_codebooks!r}")
        if not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive integer, got {topk!r}")
        self.num_codebooks = num_codebooks
        self.topk = topk
        self.value_axis = value_axis

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if values.ndim == 2:
            if self.num_codebooks is None:
                raise ValueError(
                    f"a 2-D input {tuple(values.shape)} is read as concatenated values [b, C*t*v]: pass num_codebooks "
                    f"(and topk) to CodebookVoting so that v can be recovered"
                )
            votes = self.num_codebooks * self.topk
            if values.shape[1] % votes:
                raise ValueError(
                    f"concatenated values have {values.shape[1]} features, not a multiple of num_codebooks * topk = {votes}"
                )
            return values.reshape(values.shape[0], votes, -1).mean(dim=1)  # [b, (C t), v] -> [b, v]
        if values.ndim < 4:
            raise ValueError(
                f"expected values [b, C, t, *spatial, v] (at least 4 dims) or concatenated [b, C*t*v], "
                f"got shape {tuple(values.shape)}"
            )
        if self.num_codebooks is not None and values.shape[1] != self.num_codebooks:
            raise ValueError(f"values dim 1 must be num_codebooks={self.num_codebooks}, got shape {tuple(values.shape)}")
        values = values.movedim(self.value_axis, -1)  # [b, C, t, *spatial, v]
        return values.flatten(1, -2).mean(dim=1)


class LinearProbe(nn.Module):
    """A linear classifier on the flattened values: [b, ...] -> logits [b, num_classes]."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.linear(values.flatten(1))


class MLP(nn.Module):
    """An MLP on the flattened values: depth linear layers with ReLU in between."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, depth: int = 2):
        super().__init__()
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth (number of linear layers) must be a positive integer, got {depth!r}")
        widths = [in_features] + [hidden] * (depth - 1) + [num_classes]
        layers = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            if index:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(width_in, width_out))
        self.layers = nn.Sequential(*layers)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.layers(values.flatten(1))
