"""Spawned gloo ranks for the multi-process tests (see kvb_dist.spawn)."""

from kvb_dist.spawn import run_ranks  # noqa: F401
