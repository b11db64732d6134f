"""Initialize phase: fit the keys on the embedding shards, freeze them, checkpoint.

k-means streams the shards (distributed, sharded like the bottleneck); EMA epochs run the
bottleneck with learning keys over the same stream, as the original code initializes keys.
The checkpoint (`checkpoints/initialize.pt` + its sharded folder) holds the splitter and the
bottleneck, each rank writing its own codebooks, so training can start on any world size.
"""

from __future__ import annotations

import logging
import math
from typing import Dict

import torch

from kvb_dist.data.shards import INDEX_NAME, ShardIndex
from kvb_dist.data.stream import ShardStream, agreed_num_batches, kmeans_from_stream, lockstep
from kvb_dist.distributed.sharded import ShardedKeyValueBottleneck
from kvb_dist.kmeans import streaming_kmeans
from kvb_dist.run.checkpoint import CheckpointSeries
from kvb_dist.run.phases.freeze import embeddings_dir
from kvb_dist.splitters import make_splitter

logger = logging.getLogger(__name__)


def checkpoints(ctx) -> CheckpointSeries:
    return CheckpointSeries(ctx.path("checkpoints"), "initialize", ctx.layout)


def tensors(splitter: torch.nn.Module, bottleneck: ShardedKeyValueBottleneck) -> Dict[str, torch.Tensor]:
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


def build_bottleneck(config, layout, init_mode: str = "random") -> ShardedKeyValueBottleneck:
    """The launcher's bottleneck: sparse value gradients, so a step touches only fetched rows."""
    b = config.bottleneck
    return ShardedKeyValueBottleneck(
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
    )


# A rank keeps its part of the init set in memory when it is smaller than this: passes after
# the first (k-means iterations, EMA epochs) then skip re-reading and re-parsing the shards.
IN_MEMORY_BYTES = 1 << 30


def init_folder(ctx):
    folder = embeddings_dir(ctx, "init")
    return folder if (folder / INDEX_NAME).is_file() else embeddings_dir(ctx, "train")


def run(ctx) -> None:
    config, layout = ctx.config, ctx.layout
    series = checkpoints(ctx)
    if series.record is not None:
        logger.info("initialize: keys already fitted, skipping")
        return
    index = ShardIndex.load(str(init_folder(ctx)))
    num_channels = int(index.feature_shape[-1])
    splitter = build_splitter(config, num_channels).to(ctx.device)
    bottleneck = build_bottleneck(config, layout).to(ctx.device)
    method = config.init.method
    in_memory = index.num_samples * math.prod(index.feature_shape) * 4 / layout.world_size < IN_MEMORY_BYTES
    sse = []
    if "kmeans" in method:
        stream = ShardStream(index, batch_size=config.init.batch_size, rank=layout.rank, world_size=layout.world_size, seed=config.run.seed)
        kmeans_args = dict(
            num_iters=config.init.kmeans_iters, seed=config.run.seed, device=ctx.device,
            to_heads=lambda x: to_heads(splitter, x),
        )
        num_pairs = config.bottleneck.key_value_pairs_per_codebook
        if in_memory:
            passes = list(stream.features_and_ids())  # one pass read, replayed by every iteration
            stream.check_bad_shards(layout.all_reduce_world)
            result = streaming_kmeans(passes, num_pairs, layout, **kmeans_args)
        else:
            result = kmeans_from_stream(stream, num_pairs, layout, **kmeans_args)
        result.install_(bottleneck)
        sse = [float(v) for v in result.sse_history]
        for iteration, value in enumerate(sse):
            ctx.tracker.log({"init/kmeans_sse": value, "init/kmeans_iteration": iteration})
        logger.info("initialize: k-means SSE per iteration %s", ", ".join(f"{v:.4g}" for v in sse))
    if "ema" in method:
        local_batch = max(1, config.init.batch_size // layout.world_size)
        num_batches = agreed_num_batches(index, local_batch, layout.world_size)
        stream = ShardStream(
            index, batch_size=local_batch, rank=layout.rank, world_size=layout.world_size,
            seed=config.run.seed, batches_per_epoch=num_batches,
        )
        # In memory, every epoch replays the first epoch's batches in the same order (streamed
        # epochs reshuffle); both are deterministic for a seed and a world size.
        replay = list(lockstep(stream, layout.all_reduce_world)) if in_memory else None
        step = 0
        for epoch in range(config.init.ema_epochs):
            stream.set_epoch(epoch)
            for batch in replay if replay is not None else lockstep(stream, layout.all_reduce_world):
                bottleneck(to_heads(splitter, batch.x.to(ctx.device)))
                step += 1
            # Each replica group replaces the same pairs: the world sum counts them R times.
            replaced = layout.all_reduce_world(bottleneck.num_replaced_pairs.clone()) // layout.num_replicas
            ctx.tracker.log({"init/ema_epoch": epoch, "init/ema_steps": step, "init/dead_pairs_replaced": int(replaced)})
    bottleneck.freeze_keys()
    series.save(tensors(splitter, bottleneck), {"kmeans_sse": sse, "num_channels": num_channels})
