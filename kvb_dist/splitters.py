"""Splitters: turn encoder features into one head (query) per codebook.

Input is channel-last ``[b, *positions, d]`` (the wrappers pass ``[b, n, d]`` with the spatial
positions flattened into n); output is ``[b, C, *positions, k]``, the layout the bottleneck
takes. Semantics, constructor arguments and state-dict names (``rand_proj``, ``proj``) follow
the original research code, so its checkpoints load.

Shape legend: b batch, n positions, d encoder channels (num_channels), C codebooks
(num_codebooks), k key dim (dim_keys).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

SPLITTING_MODES = ("chunk", "random_projection", "learned_projection")


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_features(x: torch.Tensor, num_channels: int, who: str) -> None:
    if x.ndim < 2 or x.shape[-1] != num_channels:
        raise ValueError(
            f"{who} expects channel-last input [batch, *positions, num_channels={num_channels}], "
            f"got shape {tuple(x.shape)}"
        )


class Chunker(nn.Module):
    """Cut the d channels into C consecutive chunks of k: "b n (c k) -> b c n k".

    Needs num_channels == num_codebooks * dim_keys (dim_keys defaults to the quotient).
    """

    def __init__(self, num_codebooks: int, num_channels: int, dim_keys: Optional[int] = None):
        super().__init__()
        _check_positive("num_codebooks", num_codebooks)
        _check_positive("num_channels", num_channels)
        if dim_keys is None:
            if num_channels % num_codebooks:
                raise ValueError(
                    f"splitting_mode='chunk' needs num_channels divisible by num_codebooks, got "
                    f"num_channels={num_channels}, num_codebooks={num_codebooks}"
                )
            dim_keys = num_channels // num_codebooks
        _check_positive("dim_keys", dim_keys)
        if num_channels != num_codebooks * dim_keys:
            raise ValueError(
                f"splitting_mode='chunk' needs num_channels == num_codebooks * dim_keys = "
                f"{num_codebooks} * {dim_keys} = {num_codebooks * dim_keys}, got num_channels={num_channels}"
            )
        self.num_codebooks = num_codebooks
        self.num_channels = num_channels
        self.dim_keys = dim_keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features(x, self.num_channels, "Chunker")
        # [b, *n, (c k)] -> [b, *n, c, k] -> [b, c, *n, k]
        return x.unflatten(-1, (self.num_codebooks, self.dim_keys)).movedim(-2, 1)


class RandomDownProjection(nn.Module):
    """A fixed random projection per codebook: head_c = x @ rand_proj[c].

    rand_proj [C, d, k] is Gaussian with each column normalized (L2) over d, so a head's
    coordinates keep the scale of the features. It is a buffer: saved, never trained.
    """

    def __init__(self, num_codebooks: int, num_channels: int, dim_keys: int):
        super().__init__()
        for name, value in (("num_codebooks", num_codebooks), ("num_channels", num_channels), ("dim_keys", dim_keys)):
            _check_positive(name, value)
        self.num_codebooks = num_codebooks
        self.num_channels = num_channels
        self.dim_keys = dim_keys
        self.register_buffer("rand_proj", F.normalize(torch.randn(num_codebooks, num_channels, dim_keys), p=2, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features(x, self.num_channels, "RandomDownProjection")
        return torch.einsum("b...d,cdk->bc...k", x, self.rand_proj.to(x.dtype))


class LearnedDownProjection(nn.Module):
    """A trainable linear map d -> C * k (no bias), stored as ``proj``.

    The output features are laid out with dim_keys outer and num_codebooks inner, as in the
    original: "b n (dim_keys num_books) -> b num_books n dim_keys".
    """

    def __init__(self, num_codebooks: int, num_channels: int, dim_keys: int):
        super().__init__()
        for name, value in (("num_codebooks", num_codebooks), ("num_channels", num_channels), ("dim_keys", dim_keys)):
            _check_positive(name, value)
        self.num_codebooks = num_codebooks
        self.num_channels = num_channels
        self.dim_keys = dim_keys
        self.proj = nn.Linear(num_channels, num_codebooks * dim_keys, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features(x, self.num_channels, "LearnedDownProjection")
        # [b, *n, (k c)] -> [b, *n, k, c] -> [b, c, *n, k]
        projected = self.proj(x).unflatten(-1, (self.dim_keys, self.num_codebooks))
        return projected.movedim(-1, 1)


def make_splitter(splitting_mode: str, num_codebooks: int, num_channels: int, dim_keys: int) -> nn.Module:
    """The splitter for a splitting_mode; ValueError naming the valid modes otherwise."""
    if splitting_mode == "chunk":
        return Chunker(num_codebooks=num_codebooks, num_channels=num_channels, dim_keys=dim_keys)
    if splitting_mode == "random_projection":
        return RandomDownProjection(num_codebooks=num_codebooks, num_channels=num_channels, dim_keys=dim_keys)
    if splitting_mode == "learned_projection":
        return LearnedDownProjection(num_codebooks=num_codebooks, num_channels=num_channels, dim_keys=dim_keys)
    raise ValueError(f"splitting_mode must be one of {SPLITTING_MODES}, got {splitting_mode!r}")
