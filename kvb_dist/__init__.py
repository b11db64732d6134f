"""kvb_dist: distributed training of Discrete Key-Value Bottlenecks."""

from kvb_dist.core import BottleneckOutput, KeyValueBottleneck
from kvb_dist.decoders import MLP, CodebookVoting, LinearProbe
from kvb_dist.encoders import (
    BottleneckedEncoder,
    DinoBottleneckedEncoder,
    EfficientNetBottleneckedEncoder,
    EfficientNetLite0Encoder,
    EncoderOutput,
    imagenet_preprocess,
)
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
]
__version__ = "0.1.0"
