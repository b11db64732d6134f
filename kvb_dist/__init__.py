"""kvb_dist: distributed training of Discrete Key-Value Bottlenecks."""

from kvb_dist.core import BottleneckOutput, KeyValueBottleneck
from kvb_dist.data.stream import ShardStream
from kvb_dist.decoders import MLP, CodebookVoting, LinearProbe
from kvb_dist.encoders import (
    BottleneckedEncoder,
    DinoBottleneckedEncoder,
    EfficientNetBottleneckedEncoder,
    EfficientNetLite0Encoder,
    EncoderOutput,
    imagenet_preprocess,
)
from kvb_dist.distributed.layout import ParallelLayout
from kvb_dist.distributed.sharded import ShardedKeyValueBottleneck
from kvb_dist.kmeans import streaming_kmeans
from kvb_dist.splitters import Chunker, LearnedDownProjection, RandomDownProjection

__all__ = [
    "KeyValueBottleneck",
    "BottleneckOutput",
    "BottleneckedEncoder",
    "EncoderOutput",
    "DinoBottleneckedEncoder",
    "EfficientNetBottleneckedEncoder",
    "EfficientNetLite0Encoder",
    "imagenet_preprocess",
    "Chunker",
    "RandomDownProjection",
    "LearnedDownProjection",
    "CodebookVoting",
    "LinearProbe",
    "MLP",
    # The distributed API: sharded codebooks, their layout, k-means and shard streams.
    "ShardedKeyValueBottleneck",
    "ParallelLayout",
    "streaming_kmeans",
    "ShardStream",
]
__version__ = "0.1.0"
