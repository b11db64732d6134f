"""Native kernels: the fused nearest-mean kernel for k-means on the CPU (fused_nearest.c), compiled
on first use and cached (build.py)."""

from kvb_dist.native.build import fused_nearest_means

__all__ = ["fused_nearest_means"]
