"""Initialize phase: fit the keys on the embedding shards, freeze them, checkpoint.

k-means streams the shards (distributed, sharded like the bottleneck); EMA epochs run the
bottleneck with learning keys over the same stream, as the original code initializes keys.
The checkpoint (`checkpoints/initialize.pt` + its sharded folder) holds the splitter and the
bottleneck, each rank writing its own codebooks, so training can start on any world size.
"""

from __future__ import annotations

import logging
import math
from kvb_dist.data.shards import INDEX_NAME, ShardIndex
from kvb_dist.data.stream import ShardStream, agreed_num_batches, kmeans_from_stream, lockstep
from kvb_dist.kmeans import streaming_kmeans
from kvb_dist.run.builders import build_bottleneck, build_splitter, embeddings_dir, init_checkpoints, init_tensors, progress_bar, to_heads

logger = logging.getLogger(__name__)


# A rank keeps its part of the init set in memory when it is smaller than this: passes after
# the first (k-means iterations, EMA epochs) then skip re-reading and re-parsing the shards.
IN_MEMORY_BYTES = 1 << 30


def init_index(ctx) -> ShardIndex:
    """The shard index keys are fitted on (init data if the run has any, else train), read on rank 0 for all."""
    def load():
        folder = embeddings_dir(ctx, "init")
        return ShardIndex.load(str(folder if (folder / INDEX_NAME).is_file() else embeddings_dir(ctx, "train")))

    return ctx.layout.decided_on_rank0(load)


def run(ctx) -> None:
    config, layout = ctx.config, ctx.layout
    series = init_checkpoints(ctx)
    if series.record is not None:
        logger.info("initialize: keys already fitted, skipping")
        return
    index = init_index(ctx)
    if index.num_shards < layout.world_size:  # every rank reads whole shards of its own
        raise ValueError(
            f"the embeddings in {index.root} are {index.num_shards} shard(s), fewer than the {layout.world_size} ranks "
            f"that read them (they were written on fewer ranks): pass --redo freeze to embed them again on these "
            f"ranks (each writes its own shards; data.samples_per_shard sets their size), or run on at most "
            f"{index.num_shards} rank(s)"
        )
    num_channels = int(index.feature_shape[-1])
    splitter = build_splitter(config, num_channels).to(ctx.device)
    bottleneck = build_bottleneck(config, layout, device=ctx.device)  # drawn there, not on the host
    method = config.init.method
    in_memory = index.num_samples * math.prod(index.feature_shape) * 4 / layout.world_size < IN_MEMORY_BYTES
    sse, skipped = [], 0
    if "kmeans" in method:
        stream = ShardStream(index, batch_size=config.init.batch_size, rank=layout.rank, world_size=layout.world_size, seed=config.run.seed)
        kmeans_args = dict(
            num_iters=config.init.kmeans_iters, seed=config.run.seed, device=ctx.device,
            to_heads=lambda x: to_heads(splitter, x),
        )
        num_pairs = config.bottleneck.key_value_pairs_per_codebook
        with progress_bar(ctx, "k-means", config.init.kmeans_iters, "iteration") as bar:
            if in_memory:
                passes = list(stream.features_and_ids())  # one pass read, replayed by every iteration
                stream.check_bad_shards(layout.all_reduce_world)
                result = streaming_kmeans(passes, num_pairs, layout, after_pass=bar.update, **kmeans_args)
            else:
                result = kmeans_from_stream(stream, num_pairs, layout, after_pass=bar.update, **kmeans_args)
        skipped = max(skipped, stream.check_bad_shards(layout.all_reduce_world).samples)
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
        batches_per_epoch = len(replay) if replay is not None else num_batches
        bar = progress_bar(ctx, "EMA key fitting", config.init.ema_epochs * batches_per_epoch, "batch")
        for epoch in range(config.init.ema_epochs):
            stream.set_epoch(epoch)
            bar.set_postfix_str(f"epoch {epoch + 1}/{config.init.ema_epochs}", refresh=False)
            for batch in replay if replay is not None else lockstep(stream, layout.all_reduce_world):
                bottleneck(to_heads(splitter, batch.x.to(ctx.device)))
                step += 1
                bar.update()
            # The bad-shard limit over all ranks (raises on every rank), as k-means applies it.
            skipped = max(skipped, stream.check_bad_shards(layout.all_reduce_world).samples)
            # Each replica group replaces the same pairs: the world sum counts them R times.
            replaced = layout.all_reduce_world(bottleneck.num_replaced_pairs.clone()) // layout.num_replicas
            ctx.tracker.log({"init/ema_epoch": epoch, "init/ema_steps": step, "init/dead_pairs_replaced": int(replaced)})
        bar.close()
    bottleneck.freeze_keys()
    if skipped:
        logger.warning("initialize: %d samples of unreadable shards were skipped", skipped)
    record = {"kmeans_sse": sse, "num_channels": num_channels, "samples_skipped": skipped}
    series.save(init_tensors(splitter, bottleneck), record)
