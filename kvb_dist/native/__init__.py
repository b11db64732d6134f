"""Native CPU kernels (C, compiled on first use and cached): see build.py."""

from kvb_dist.native.build import NativeKernels, fused_nearest_means, native_kernels

__all__ = ["NativeKernels", "fused_nearest_means", "native_kernels"]
