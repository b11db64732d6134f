"""What the phases share: where they write, and how the splitter, the bottleneck and their
checkpoints are built, so that a later phase rebuilds exactly what an earlier one saved."""

from __future__ import annotations

import sys
from typing import Callable, Dict, Optional

import torch
from torch import nn
from tqdm import tqdm

from kvb_dist.distributed.sharded import ShardedKeyValueBottleneck
from kvb_dist.run.checkpoint import CheckpointSeries
from kvb_dist.splitters import make_splitter


def embeddings_dir(ctx, split: str):
    """The freeze phase's shard set of a split (train, test, init)."""
    return ctx.path("embeddings", split)


def stream_name(setting: str, learner_name: str) -> str:
    """The checkpoint series of one training stream."""
    return f"train-{setting}-{learner_name}"


def init_checkpoints(ctx) -> CheckpointSeries:
    """The initialize phase's checkpoint series (collective)."""
    return CheckpointSeries(ctx.path("checkpoints"), "initialize", ctx.layout)


def init_tensors(splitter: torch.nn.Module, bottleneck: ShardedKeyValueBottleneck) -> Dict[str, torch.Tensor]:
    """What the initialize checkpoint holds, sharing memory with the modules (loads fill them)."""
    return {
        **{f"splitter.{name}": t for name, t in splitter.state_dict().items()},
        **{f"bottleneck.{name}": t for name, t in bottleneck.sharded_state_dict().items()},
    }


def build_splitter(config, num_channels: int) -> torch.nn.Module:
    """Embedding [b, d] -> heads; identical on every rank (seeded)."""
    b = config.bottleneck
    torch.manual_seed(config.run.seed)
    return make_splitter(b.splitting_mode, b.num_codebooks, num_channels, b.dim_keys)


def to_heads(splitter: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """[b, d] -> [b, C, k] (the splitter works on channel-last [b, n, d])."""
    with torch.no_grad():
        return splitter(features[:, None, :])[:, :, 0, :]


def build_bottleneck(
    config, layout, init_mode: str = "random", *, device=None, from_checkpoint: bool = False
) -> ShardedKeyValueBottleneck:
    """The launcher's bottleneck on `device` (default CPU): sparse value gradients, so a step
    touches only fetched rows. Collective (every rank builds it together).

    from_checkpoint: the caller fills every tensor from a checkpoint right after (a DCP load of
    `sharded_state_dict()`), so nothing is drawn or initialized: the module is built on the meta
    device and materialized uninitialized on `device`. Otherwise its state is drawn on `device`.
    """
    b = config.bottleneck
    module = ShardedKeyValueBottleneck(
        b.num_codebooks,
        b.key_value_pairs_per_codebook,
        b.dim_keys,
        b.dim_values,
        init_mode=init_mode,
        decay=b.decay,
        eps=b.eps,
        threshold_ema_dead_code=b.threshold_ema_dead_code,
        topk=b.topk,
        return_values_only=False,
        layout=layout,
        seed=config.run.seed,
        sparse_values=True,
        device="meta" if from_checkpoint else device,
    )
    return module.to_empty(device=device if device is not None else "cpu") if from_checkpoint else module


def build_encoder(config, mixed_precision: str = "no", *, device=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The freeze phase's frozen function inputs [b, ...] -> embeddings [b, d] (float32).

    mixed_precision: the Accelerate setting (no | bf16 | fp16) the encoder runs under
    (torch.autocast; the output is cast back to float32). One that cannot apply (fp8, fp16
    without CUDA, an unknown value) raises ValueError here, before anything is built or
    downloaded. device: where the inputs will be (default: CUDA when available); the network
    moves to the inputs' device on the first batch.
    """
    from kvb_dist import encoders

    enc = config.encoder
    dtype = encoders.autocast_dtype(mixed_precision, torch.device(device).type if device is not None else None)
    source = encoders.encoder_source(enc.name)
    if enc.name == "identity":
        return lambda x: x.flatten(1).float()
    if source == "import":
        network, preprocess = encoders.import_path_encoder(enc.name, enc.kwargs), None  # inputs as they are
    elif source == "torchvision":
        network, preprocess = encoders.torchvision_encoder(enc.name[len(encoders.TORCHVISION_PREFIX):], enc.kwargs)
    elif source == "timm":
        network, preprocess = encoders.timm_encoder(enc.name[len(encoders.TIMM_PREFIX):], enc.kwargs)
    else:
        if enc.name == "efficientnet_lite0":
            network = encoders.EfficientNetLite0Encoder(pool=enc.pool_embedding, image_size=config.data.image_size)
        else:
            network = encoders.dino_encoder(enc.name, enc.extracted_layer, enc.pool_embedding)
        image_size = config.data.image_size
        preprocess = lambda x: encoders.imagenet_preprocess(x, image_size)  # noqa: E731
    return encoders.FrozenEmbedder(_frozen(network), preprocess, dtype)


def _frozen(network: nn.Module) -> nn.Module:
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network


def progress_bar(ctx, desc: str, total: Optional[int] = None, unit: str = "it", initial: int = 0) -> tqdm:
    """A bar on rank 0 in a terminal only, so logs (and CI) and the other ranks stay clean."""
    disable = not (ctx.is_main and sys.stderr.isatty())
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, leave=False)
