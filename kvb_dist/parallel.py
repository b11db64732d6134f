"""Parallel layout: replicas x shards, and the collectives that move heads and statistics.

World = R replicas x S shards. Rank r is shard r % S of replica r // S (a row-major 2-D mesh
with dims ("replica", "shard")). The S ranks of a replica together hold all C codebooks, each
a contiguous range; the R ranks that hold the same range form a replica group, where
statistics are summed.

Knows nothing about key-value bottlenecks or classification: it moves tensors. A world of
one is a layout whose groups are None, and every collective here is then a no-op, so callers
never branch on "am I distributed".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def shard_sizes(num_items: int, num_shards: int) -> List[int]:
    """Balanced contiguous split, larger shards first.

    >>> shard_sizes(10, 4)
    [3, 3, 2, 2]
    >>> shard_sizes(3, 4)
    [1, 1, 1, 0]
    >>> shard_sizes(8, 2)
    [4, 4]
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    base, extra = divmod(num_items, num_shards)
    return [base + (1 if s < extra else 0) for s in range(num_shards)]


def shard_ranges(num_items: int, num_shards: int) -> List[Tuple[int, int]]:
    """[start, stop) of every shard; see shard_sizes."""
    ranges, start = [], 0
    for size in shard_sizes(num_items, num_shards):
        ranges.append((start, start + size))
        start += size
    return ranges


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of a flat tensor; the backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, send, recv_splits, send_splits, group):
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        received = send.new_empty(sum(recv_splits))
        dist.all_to_all_single(received, send.contiguous(), recv_splits, send_splits, group=group)
        return received

    @staticmethod
    def backward(ctx, grad_received):
        recv_splits, send_splits = ctx.splits
        grad_send = grad_received.new_empty(sum(send_splits))
        dist.all_to_all_single(grad_send, grad_received.contiguous(), send_splits, recv_splits, group=ctx.group)
        return grad_send, None, None, None


@dataclass
class Routed:
    """Heads routed to their codebooks' owner; see ParallelLayout.route_to_owners."""

    owned_cik: torch.Tensor  # [C_mine, I, k]
    first_query_id: int  # global id of owned_cik[:, 0]
    num_global_queries: int  # queries in the whole global batch
    peer_queries: List[int]  # queries of each rank of my shard group (for route_back)


@dataclass
class ParallelLayout:
    """Who holds which codebooks, and the process groups to talk to the others."""

    world_size: int = 1
    rank: int = 0
    num_shards: int = 1
    shard_group: Optional[dist.ProcessGroup] = None  # the S ranks of my replica (None if S == 1)
    replica_group: Optional[dist.ProcessGroup] = None  # the R ranks holding my codebooks (None if R == 1)
    world_group: Optional[dist.ProcessGroup] = None  # everybody (None for a world of one)

    @classmethod
    def single(cls) -> "ParallelLayout":
        return cls()

    @classmethod
    def build(cls, num_shards: Optional[int] = None) -> "ParallelLayout":
        """Layout over the default process group (from torchrun / Accelerate); a world of one without it.

        num_shards defaults to the whole world (one replica). All ranks must call this together.
        """
        if not (dist.is_available() and dist.is_initialized()):
            if num_shards not in (None, 1):
                raise ValueError(f"num_shards={num_shards} needs torch.distributed; only one process is running")
            return cls.single()
        world_size, rank = dist.get_world_size(), dist.get_rank()
        num_shards = world_size if num_shards is None else num_shards
        if num_shards < 1 or world_size % num_shards != 0:
            raise ValueError(f"num_shards={num_shards} must divide the world size {world_size}")
        num_replicas = world_size // num_shards
        shard_group = replica_group = None
        # new_group is collective: every rank creates every group, in the same order.
        for replica in range(num_replicas):
            ranks = list(range(replica * num_shards, (replica + 1) * num_shards))
            group = dist.new_group(ranks) if num_shards > 1 else None
            if rank in ranks:
                shard_group = group
        for shard in range(num_shards):
            ranks = list(range(shard, world_size, num_shards))
            group = dist.new_group(ranks) if num_replicas > 1 else None
            if rank in ranks:
                replica_group = group
        world_group = dist.group.WORLD if world_size > 1 else None
        return cls(world_size, rank, num_shards, shard_group, replica_group, world_group)

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.num_shards

    @property
    def replica_index(self) -> int:
        return self.rank // self.num_shards

    @property
    def shard_index(self) -> int:
        return self.rank % self.num_shards

    def codebook_ranges(self, num_codebooks: int) -> List[Tuple[int, int]]:
        return shard_ranges(num_codebooks, self.num_shards)

    def codebook_range(self, num_codebooks: int) -> Tuple[int, int]:
        """[start, stop) of the codebooks this rank holds."""
        return self.codebook_ranges(num_codebooks)[self.shard_index]

    # --------------------------------------------------------------------------------------
    # Collectives (no-ops where the group is None)

    def all_reduce_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        """SUM over the ranks that hold the same codebooks (in place; returns the tensor)."""
        if self.replica_group is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.replica_group)
        return tensor

    def all_reduce_world(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world_group is not None:
            dist.all_reduce(tensor, op=op, group=self.world_group)
        return tensor

    def all_gather_world(self, tensor: torch.Tensor) -> torch.Tensor:
        """[world, *tensor.shape], in rank order (same shape on every rank)."""
        if self.world_group is None:
            return tensor[None]
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous(), group=self.world_group)
        return torch.stack(out)

    def all_gather_rows(self, local: torch.Tensor, rows_per_rank: Sequence[int]) -> torch.Tensor:
        """Every rank's [rows, ...] tensor, concatenated in rank order; row counts may differ."""
        padded = local.new_zeros(max(rows_per_rank), *local.shape[1:])
        padded[: local.shape[0]] = local
        gathered = self.all_gather_world(padded)
        return torch.cat([gathered[r, :n] for r, n in enumerate(rows_per_rank)])

    def broadcast_world(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_group is not None:
            dist.broadcast(tensor, src=src, group=self.world_group)
        return tensor

    def barrier(self) -> None:
        if self.world_group is not None:
            dist.barrier(group=self.world_group)

    def shard_peers(self, per_rank: Sequence) -> list:
        """The entries of a per-rank list that belong to the ranks of my shard group."""
        first = self.replica_index * self.num_shards
        return list(per_rank[first : first + self.num_shards])

    # --------------------------------------------------------------------------------------
    # Routing heads to the codebooks' owners and results back

    def queries_per_rank(self, num_local_queries: int) -> List[int]:
        """Every rank's number of local queries, in rank order (one small all-gather)."""
        return [int(n) for n in self.all_gather_world(torch.tensor([num_local_queries]))[:, 0]]

    def route_to_owners(self, heads_cik: torch.Tensor, queries_per_rank: Optional[Sequence[int]] = None) -> "Routed":
        """[C, i, k] heads of my samples -> heads of my whole shard group for the codebooks I hold.

        The global batch is every rank's samples concatenated in rank order; my shard group's
        samples are one contiguous block of it, so the routed queries carry the global ids
        first_query_id .. first_query_id + I - 1.
        """
        num_codebooks, local, dim = heads_cik.shape
        if queries_per_rank is None:
            queries_per_rank = self.queries_per_rank(local)
        peers = self.shard_peers(queries_per_rank)
        first_query_id = sum(queries_per_rank[: self.replica_index * self.num_shards])
        routed = Routed(heads_cik, first_query_id, sum(queries_per_rank), peers)
        if self.shard_group is None:
            return routed
        ranges = self.codebook_ranges(num_codebooks)
        start, stop = ranges[self.shard_index]
        send = heads_cik.contiguous().reshape(-1)  # codebook-major: each owner's rows are contiguous
        send_splits = [(b - a) * local * dim for a, b in ranges]
        recv_splits = [(stop - start) * q * dim for q in peers]
        # Differentiable: gradients of the owners' results (distances) reach the heads.
        received = _AllToAll.apply(send, recv_splits, send_splits, self.shard_group)
        parts = received.split(recv_splits)
        routed.owned_cik = torch.cat([p.view(stop - start, q, dim) for p, q in zip(parts, peers)], dim=1)
        return routed

    def route_back(self, owned_ci_rest: torch.Tensor, num_codebooks: int, peer_queries: Sequence[int]) -> torch.Tensor:
        """Inverse of route_to_owners for results: [C_mine, I, *rest] -> [C, i, *rest] for my samples.

        Differentiable: gradients travel back to the owners through the all-to-all backward.
        """
        if self.shard_group is None:
            return owned_ci_rest
        ranges = self.codebook_ranges(num_codebooks)
        rest = owned_ci_rest.shape[2:]
        row = math.prod(rest)
        mine = peer_queries[self.shard_index]
        # Queries of each peer are contiguous along dim 1; send each peer its block, flattened.
        blocks = owned_ci_rest.split(list(peer_queries), dim=1)
        send = torch.cat([b.reshape(-1) for b in blocks])
        send_splits = [b.numel() for b in blocks]
        recv_splits = [(b - a) * mine * row for a, b in ranges]
        received = _AllToAll.apply(send, recv_splits, send_splits, self.shard_group)
        parts = received.split(recv_splits)
        return torch.cat([p.view(b - a, mine, *rest) for p, (a, b) in zip(parts, ranges)], dim=0)
