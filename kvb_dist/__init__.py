"""kvb_dist: distributed training of Discrete Key-Value Bottlenecks."""

from kvb_dist.core import KeyValueBottleneck

__all__ = ["KeyValueBottleneck"]
__version__ = "0.1.0"
