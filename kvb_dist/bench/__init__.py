"""Benchmarks, one per concern: python -m kvb_dist.bench.core | sharded | kmeans | checkpoint."""
