"""Lloyd iterations on a slice of codebooks (each codebook clusters its own heads).

`reduce_sum` sums per-cluster counts and sums over every process holding part of the data,
so the same code fits one batch on one process or a data set spread over many.
"""

from __future__ import annotations

import torch

from kvb_dist.codebook import DEFAULT_CHUNK_ELEMENTS, Reduce, assignment_statistics, nearest_keys, no_reduce


def lloyd_(
    samples_cik: torch.Tensor,
    means_cjk: torch.Tensor,
    num_iters: int,
    reduce_sum: Reduce = no_reduce,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Runs `num_iters` Lloyd iterations in place on means; returns the last cluster counts [c, j].

    A cluster that received no sample keeps its previous mean.
    """
    num_codebooks, num_pairs, _ = means_cjk.shape
    counts = torch.zeros(num_codebooks, num_pairs, device=means_cjk.device)
    for _ in range(num_iters):
        indices, _ = nearest_keys(samples_cik, means_cjk, chunk_elements=chunk_elements)
        counts, sums = assignment_statistics(samples_cik, indices[..., 0], num_pairs)
        counts, sums = reduce_sum(counts), reduce_sum(sums)
        filled = counts > 0
        means_cjk.copy_(torch.where(filled[..., None], sums / counts.clamp(min=1)[..., None], means_cjk))
    return counts
