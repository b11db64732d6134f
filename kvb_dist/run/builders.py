"""What the phases share: where they write, and how the splitter, the bottleneck and their
checkpoints are built, so that a later phase rebuilds exactly what an earlier one saved."""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

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


def build_encoder(config, mixed_precision: str = "no") -> Callable[[torch.Tensor], torch.Tensor]:
    """The freeze phase's frozen function inputs [b, ...] -> embeddings [b, d] (float32).

    mixed_precision: the Accelerate setting (no | bf16 | fp16) the encoder runs under.
    """
    enc = config.encoder
    if enc.name == "identity":
        return lambda x: x.flatten(1)
    if enc.name == "efficientnet_lite0":
        from kvb_dist.encoders import EfficientNetLite0Encoder, imagenet_preprocess

        network = EfficientNetLite0Encoder(pool=enc.pool_embedding, image_size=config.data.image_size)
        preprocess = lambda x: imagenet_preprocess(x, config.data.image_size)  # noqa: E731
    else:
        from kvb_dist.encoders import dino_encoder, imagenet_preprocess

        network = dino_encoder(enc.name, enc.extracted_layer, enc.pool_embedding)
        preprocess = lambda x: imagenet_preprocess(x, config.data.image_size)  # noqa: E731
    network = _frozen(network)
    return lambda x: network(preprocess(x)).flatten(1)


def _frozen(network: nn.Module) -> nn.Module:
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network
