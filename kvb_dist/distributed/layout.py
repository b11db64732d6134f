"""Parallel layout: replicas x shards on a 2-D DeviceMesh, and the collectives that move tensors.

World = R replicas x S shards, a DeviceMesh with dims ("replica", "shard"). Position r in the
mesh (row-major) is shard r % S of replica r // S. The S ranks of a replica together hold all C
codebooks, each a contiguous range (torch.chunk's split, so that a DTensor placed
[Replicate(), Shard(0)] on the mesh describes exactly what each rank holds); the R ranks that
hold the same range form a replica group, where statistics are summed.

Knows nothing about key-value bottlenecks or classification: it moves tensors. A world of
one is a layout without mesh whose groups are None, and every collective here is then a
no-op, so callers never branch on "am I distributed".
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as differentiable
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

MESH_DIMS = ("replica", "shard")

# torch 2.13 marks torch.distributed.nn.functional deprecated in favour of a private module; it
# is the public, autograd-aware all_to_all_single, so we keep it and spare users a warning per call site.
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_to_all_single is deprecated")


def shard_sizes(num_items: int, num_shards: int) -> List[int]:
    """torch.chunk's split into num_shards contiguous parts: ceil(n / S) each, the rest to the last.

    DTensor's Shard(0) places rows the same way, so checkpoints describe our shards exactly.

    >>> shard_sizes(10, 4)
    [3, 3, 3, 1]
    >>> shard_sizes(5, 4)
    [2, 2, 1, 0]
    >>> shard_sizes(8, 2)
    [4, 4]
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    per_shard = -(-num_items // num_shards)
    return [max(0, min(per_shard, num_items - s * per_shard)) for s in range(num_shards)]


def shard_ranges(num_items: int, num_shards: int) -> List[Tuple[int, int]]:
    """[start, stop) of every shard; see shard_sizes."""
    ranges, start = [], 0
    for size in shard_sizes(num_items, num_shards):
        ranges.append((start, start + size))
        start += size
    return ranges


def default_group_timeout() -> Optional[timedelta]:
    """The default process group's timeout, for groups made here: a new group otherwise gets
    torch's 30-minute default, and a stuck collective in it would outlive the launcher's timeout."""
    try:  # torch has no public accessor
        return dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
    except Exception:
        return None


def _all_to_all(send: torch.Tensor, recv_splits: List[int], send_splits: List[int], group) -> torch.Tensor:
    """all_to_all_single of a flat tensor; differentiable (the backward sends gradients back)."""
    received = send.new_empty(sum(recv_splits))
    return differentiable.all_to_all_single(received, send.contiguous(), recv_splits, send_splits, group=group)


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
    rank: int = 0  # position in the mesh, row-major (the global rank for a mesh over the whole world)
    num_shards: int = 1
    shard_group: Optional[dist.ProcessGroup] = None  # the S ranks of my replica (None if S == 1)
    replica_group: Optional[dist.ProcessGroup] = None  # the R ranks holding my codebooks (None if R == 1)
    world_group: Optional[dist.ProcessGroup] = None  # every rank of the mesh (None for a world of one)
    mesh: Optional[DeviceMesh] = None  # ("replica", "shard"); None for a world of one

    @classmethod
    def single(cls) -> "ParallelLayout":
        return cls()

    @classmethod
    def build(cls, num_shards: Optional[int] = None, device_type: Optional[str] = None) -> "ParallelLayout":
        """Layout over the default process group (from torchrun / Accelerate); a world of one without it.

        num_shards defaults to the whole world (one replica); device_type to "cuda" when the
        process group runs NCCL, else "cpu". All ranks must call this together.
        """
        if not (dist.is_available() and dist.is_initialized()):
            if num_shards not in (None, 1):
                raise ValueError(f"num_shards={num_shards} needs torch.distributed; only one process is running")
            return cls.single()
        world_size = dist.get_world_size()
        num_shards = world_size if num_shards is None else num_shards
        if num_shards < 1 or world_size % num_shards != 0:
            raise ValueError(f"num_shards={num_shards} must divide the world size {world_size}")
        if device_type is None:
            device_type = "cuda" if "nccl" in str(dist.get_backend()) and torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device_type, (world_size // num_shards, num_shards), mesh_dim_names=MESH_DIMS)
        return cls.from_mesh(mesh)

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh) -> "ParallelLayout":
        """Layout on a user's 2-D mesh with dims ("replica", "shard"), e.g. a slice of a larger job's mesh."""
        if mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
            raise ValueError(f"the mesh must have the 2 dims {MESH_DIMS}, got {mesh.mesh_dim_names} of shape {tuple(mesh.shape)}")
        ranks = mesh.mesh.flatten().tolist()
        if ranks != sorted(ranks):
            # Collectives over the mesh return in global-rank order, which must be the mesh order.
            raise ValueError(f"the mesh's ranks must increase row-major (replica outer, shard inner), got {mesh.mesh.tolist()}")
        num_replicas, num_shards = mesh.shape
        world_size = num_replicas * num_shards
        if world_size == dist.get_world_size():
            world_group = dist.group.WORLD
        else:  # a slice of a larger mesh: only its members create the group
            world_group = dist.new_group(ranks, timeout=default_group_timeout(), use_local_synchronization=True)
        return cls(
            world_size=world_size,
            rank=ranks.index(dist.get_rank()),
            num_shards=num_shards,
            shard_group=mesh.get_group("shard") if num_shards > 1 else None,
            replica_group=mesh.get_group("replica") if num_replicas > 1 else None,
            world_group=world_group if world_size > 1 else None,
            mesh=mesh,
        )

    def global_view(self, local: torch.Tensor, num_rows: int):
        """My rows [rows_mine, ...] of a [num_rows, ...] tensor split like the codebooks, as a DTensor.

        Placed [Replicate(), Shard(0)] on the mesh and sharing memory with `local`: what
        torch.distributed.checkpoint saves once per shard and reshards on load. A world of one
        has no mesh: the tensor itself, which is the whole.
        """
        if self.mesh is None:
            return local
        shape = torch.Size((num_rows, *local.shape[1:]))
        stride = torch.empty(0).new_empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, [Replicate(), Shard(0)], run_check=False, shape=shape, stride=stride)

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

    def sum_sparse_over_replicas(self, sparse: torch.Tensor) -> torch.Tensor:
        """The SUM of a sparse COO tensor over the replica group, coalesced; only its entries travel."""
        sparse = sparse.coalesce()
        if self.replica_group is None:
            return sparse
        (indices, values), _ = self.gather_rows(sparse.indices().t(), sparse.values(), over="replica")
        return torch.sparse_coo_tensor(indices.t(), values, sparse.shape, check_invariants=False).coalesce()

    def all_reduce_world(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world_group is not None:
            dist.all_reduce(tensor, op=op, group=self.world_group)
        return tensor

    def _group(self, over: str) -> Tuple[Optional[dist.ProcessGroup], int]:
        groups = {
            "world": (self.world_group, self.world_size),
            "replica": (self.replica_group, self.num_replicas),
            "shard": (self.shard_group, self.num_shards),
        }
        if over not in groups:
            raise ValueError(f"over must be one of {list(groups)}, got {over!r}")
        return groups[over]

    def all_gather_world(self, tensor: torch.Tensor, over: str = "world") -> torch.Tensor:
        """[ranks, *tensor.shape] from every rank of `over` (world, replica or shard group), in mesh order."""
        group, size = self._group(over)
        if group is None:
            return tensor[None]
        out = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(out, tensor.contiguous(), group=group)
        return torch.stack(out)

    def gather_rows(self, *local: torch.Tensor, over: str = "world") -> Tuple[Tuple[torch.Tensor, ...], List[int]]:
        """Tensors with the same number of rows on a rank (it may differ between ranks), each
        concatenated over the ranks of `over` in mesh order, and every rank's row count."""
        sizes = [int(n) for n in self.all_gather_world(torch.tensor([local[0].shape[0]]), over)[:, 0]]
        return tuple(self.all_gather_rows(t, sizes, over) for t in local), sizes

    def all_gather_rows(self, local: torch.Tensor, rows_per_rank: Sequence[int], over: str = "world") -> torch.Tensor:
        """Every rank's [rows, ...] tensor (ranks of `over`), concatenated in mesh order; row counts may differ."""
        padded = local.new_zeros(max(rows_per_rank), *local.shape[1:])
        padded[: local.shape[0]] = local
        gathered = self.all_gather_world(padded, over)
        return torch.cat([gathered[r, :n] for r, n in enumerate(rows_per_rank)])

    def broadcast_world(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """From the rank at mesh position src (not global rank src: the mesh may be part of a larger job)."""
        if self.world_group is not None:
            dist.broadcast(tensor, group=self.world_group, group_src=src)
        return tensor

    def broadcast_object(self, obj, src: int = 0):
        """A picklable object from the rank at mesh position src, on every rank: one rank decides, all agree."""
        if self.world_group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group=self.world_group, group_src=src)
        return box[0]

    def decided_on_rank0(self, decide: Callable[[], Any]) -> Any:
        """decide() run at mesh position 0; its result, or the exception it raised, on every rank.

        For decisions that read files (is this done? which shards are there?): ranks that each
        read on their own can disagree while files change, and then wait in different collectives.
        """
        outcome = None
        if self.rank == 0:
            try:
                outcome = (True, decide())
            except Exception as error:  # raised on every rank below, not here alone
                outcome = (False, error)
        ok, value = self.broadcast_object(outcome)
        if not ok:
            raise value
        return value

    def failed_together(self, work: Callable[[], Any]) -> Any:
        """work() on every rank; if it raised on any rank, an error on every rank (the rank's own
        error where it failed), so that no rank waits in a collective for one that gave up."""
        try:
            value, error = work(), None
        except Exception as raised:
            value, error = None, raised
        failed = self.all_gather_world(torch.tensor([error is not None], dtype=torch.int32))[:, 0].tolist()
        if error is not None:
            raise error
        if any(failed):
            raise RuntimeError(f"rank(s) {[r for r, f in enumerate(failed) if f]} failed: see their log")
        return value

    def first_on_rank0(self, work: Callable[[], Any]) -> Any:
        """work() at mesh position 0 first, then on the other ranks: a download happens once, and
        the others find it done. An error at position 0 is raised on every rank."""
        value, error = None, None
        if self.rank == 0:
            try:
                value = work()
            except Exception as raised:
                error = raised
        decided = self.broadcast_object(error)
        if decided is not None:
            raise error if error is not None else decided
        return value if self.rank == 0 else work()

    def new_cpu_group(self) -> Optional[dist.ProcessGroup]:
        """A gloo group of this layout's ranks with the default group's timeout (None for a world
        of one), e.g. for collectives of a background thread. Collective over the layout's ranks."""
        if self.world_group is None:
            return None
        ranks = self.mesh.mesh.flatten().tolist()
        return dist.new_group(ranks, backend="gloo", timeout=default_group_timeout(), use_local_synchronization=True)

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
        if queries_per_rank is None:
            queries_per_rank = self.queries_per_rank(heads_cik.shape[1])
        peers = self.shard_peers(queries_per_rank)
        first_query_id = sum(queries_per_rank[: self.replica_index * self.num_shards])
        routed = Routed(heads_cik, first_query_id, sum(queries_per_rank), peers)
        if self.shard_group is None:
            return routed
        # Differentiable: gradients of the owners' results (distances) reach the heads.
        routed.owned_cik = torch.cat(self._blocks_to_owners(heads_cik, peers, differentiable=True), dim=1)
        return routed

    def route_to_owners_by_peer(self, heads_cik: torch.Tensor, queries_per_rank: Optional[Sequence[int]] = None
                                ) -> List[torch.Tensor]:
        """route_to_owners without its concatenation: the heads [C_mine, q, k] that each rank of my
        shard group sends for the codebooks I hold, in mesh order (views of one received buffer).

        For consumers that take the blocks one by one (k-means statistics): it spares a copy of
        the routed batch. Not differentiable. Every rank of the shard group calls it together.
        """
        if queries_per_rank is None:
            queries_per_rank = self.queries_per_rank(heads_cik.shape[1])
        if self.shard_group is None:
            return [heads_cik]
        return self._blocks_to_owners(heads_cik, self.shard_peers(queries_per_rank), differentiable=False)

    def _blocks_to_owners(self, heads_cik: torch.Tensor, peers: Sequence[int], differentiable: bool) -> List[torch.Tensor]:
        """One all-to-all over my shard group: the heads [C_mine, q, k] each peer sends for the
        codebooks I hold, in mesh order (views of one received buffer)."""
        num_codebooks, local, dim = heads_cik.shape
        ranges = self.codebook_ranges(num_codebooks)
        start, stop = ranges[self.shard_index]
        send = heads_cik.contiguous().reshape(-1)  # codebook-major: each owner's rows are contiguous
        send_splits = [(b - a) * local * dim for a, b in ranges]
        recv_splits = [(stop - start) * q * dim for q in peers]
        if differentiable:
            received = _all_to_all(send, recv_splits, send_splits, self.shard_group)
        else:
            received = send.new_empty(sum(recv_splits))
            dist.all_to_all_single(received, send, recv_splits, send_splits, group=self.shard_group)
        return [part.view(stop - start, q, dim) for part, q in zip(received.split(recv_splits), peers)]

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
        received = _all_to_all(send, recv_splits, send_splits, self.shard_group)
        parts = received.split(recv_splits)
        return torch.cat([p.view(b - a, mine, *rest) for p, (a, b) in zip(parts, ranges)], dim=0)
