"""WebDataset shard sets: writing them with an index (shards.py) and reading them split over
ranks and workers (stream.py). Command line: ``python -m kvb_dist.data --help``."""

from kvb_dist.data.shards import (
    FEATURES,
    IMAGES,
    INDEX_NAME,
    UNLABELLED,
    ShardIndex,
    ShardInfo,
    ShardWriter,
    index_part_name,
    merge_index_parts,
    write_arrays,
    write_digits,
    write_embeddings,
    write_image_folder,
    write_toy,
)
from kvb_dist.data.stream import (
    BadShardTotals,
    Batch,
    NonFiniteFeatures,
    ShardStream,
    StreamStats,
    agreed_num_batches,
    batches_per_rank,
    key_ids,
    kmeans_from_stream,
    lockstep,
    read_shard,
)

__all__ = [
    "FEATURES", "IMAGES", "INDEX_NAME", "UNLABELLED", "ShardIndex", "ShardInfo", "ShardWriter", "index_part_name",
    "merge_index_parts", "write_arrays", "write_digits", "write_embeddings", "write_image_folder", "write_toy",
    "BadShardTotals", "Batch", "NonFiniteFeatures", "ShardStream", "StreamStats", "agreed_num_batches",
    "batches_per_rank", "key_ids", "kmeans_from_stream", "lockstep", "read_shard",
]
