"""KeyValueBottleneck with its codebooks sharded over ranks.

Each rank of a shard group holds a contiguous range of codebooks (keys, EMA state, values).
A forward routes every rank's heads to the codebooks' owners (all-to-all), the owner runs the
same codebook code as the single-process module on its shard group's whole batch, summing
EMA statistics over its replica group, and the fetched values travel back through a
differentiable all-to-all. Outputs on each rank are those of its local batch; keys, counts,
outputs and value gradients equal those of one process given the concatenated global batch.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kvb_dist.core import BottleneckOutput, KeyValueBottleneck, _arrange, autocast_off
from kvb_dist.distributed.layout import ParallelLayout, shard_sizes

# Arguments every rank must agree on at construction, in the order they are compared.
_AGREED = (
    "num_codebooks",
    "key_value_pairs_per_codebook",
    "dim_keys",
    "dim_values",
    "init_mode",
    "kmeans_iters",
    "decay",
    "eps",
    "threshold_ema_dead_code",
    "sample_codebook_temperature",
    "topk",
    "sparse_values",
)
# Switches that decide which collectives a call runs, their sizes, or what the holders of a
# codebook compute: checked at every call, in the call's first exchange.
_SWITCHES = ("return_values_only", "topk", "update_keys", "count_cluster_size", "sample_codebook_temperature",
             "threshold_ema_dead_code", "decay", "eps", "sparse_values")
_CALLS = ("forward", "owned_indices", "values_at", "values_at_rows")
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _as_number(value) -> float:
    return float(sum(map(ord, value))) if isinstance(value, str) else float(value)


def _row(entries: Dict[str, float]) -> torch.Tensor:
    return torch.tensor([float(v) for v in entries.values()], dtype=torch.float64)


def _raise_if_ranks_differ(table: torch.Tensor, names: List[str], what: str) -> None:
    """table [ranks, names]: raises naming every entry where a rank differs from rank 0. Every
    rank holds the same gathered table, so every rank raises the same error."""
    def shown(name, value):
        if name == "call":
            return _CALLS[int(value)]
        if name == "input device type":
            return _DEVICE_TYPES[int(value)] if value >= 0 else "other"
        return f"{float(value):g}"

    differing = [
        f"{name} (rank {r}: {shown(name, table[r, i])} vs rank 0: {shown(name, table[0, i])})"
        for i, name in enumerate(names)
        for r in range(table.shape[0])
        if table[r, i] != table[0, i]
    ]
    if differing:
        raise ValueError(f"ranks disagree on {what}: " + "; ".join(differing))


class ShardedKeyValueBottleneck(KeyValueBottleneck):
    """Same arguments as KeyValueBottleneck, plus the layout (default: every rank a shard).

    Construct it on every rank together: ranks agree on the seed (rank 0's) and check that their
    arguments match. Gradients of the values equal the single-process gradient of the mean loss
    over the global batch, provided, as with DDP, each rank's loss is the mean over an equally
    sized local batch.
    """

    def __init__(self, *args, layout: Optional[ParallelLayout] = None, **kwargs):
        self.layout = layout if layout is not None else ParallelLayout.build()
        super().__init__(*args, **kwargs)
        # Listed so that a new values parameter (to_empty from meta, assign loads) gets it back:
        # without it replica groups would silently stop summing value gradients.
        self._values_grad_hooks.append(self._sum_value_grad_over_replicas)
        self.values.register_hook(self._sum_value_grad_over_replicas)

    def _register_state(self, seed: int, first_codebook: int, num_local_codebooks: int, device=None) -> None:
        # On device="meta" too: the agreement and the seed travel as CPU tensors, so every rank
        # still runs the same collectives and a later to_empty knows the agreed seed.
        self._check_agreement()
        seed = int(self.layout.broadcast_world(torch.tensor([seed], dtype=torch.int64))[0])
        start, stop = self.layout.codebook_range(self.num_codebooks)
        super()._register_state(seed, first_codebook=start, num_local_codebooks=stop - start, device=device)

    def _check_agreement(self) -> None:
        entries = {name: _as_number(getattr(self, name)) for name in _AGREED}
        _raise_if_ranks_differ(self.layout.all_gather_world(_row(entries)), list(entries), "the bottleneck configuration")

    def _sum_value_grad_over_replicas(self, grad: torch.Tensor) -> torch.Tensor:
        # The all-to-all backward already summed the grads of my shard group's samples, each the
        # mean over its rank's batch; adding the replicas and dividing by the world size gives
        # the mean over the global batch.
        if grad.is_sparse:  # only the fetched rows travel: O(batch x C x v), whatever J is
            return self.layout.sum_sparse_over_replicas(grad) / self.layout.world_size
        grad = self.layout.all_reduce_replicas(grad.clone())
        return grad / self.layout.world_size

    # ------------------------------------------------------------------------------------------

    def _agree_on_call(self, call: str, problem: Optional[str], local_queries: int, data: torch.Tensor) -> List[int]:
        """Every rank's query count, from one small all-gather that also checks, before any other
        collective, that no rank's input is invalid and that every rank makes the same call with
        the same switches on the same device type (data's); otherwise the same ValueError on every rank.

        A rank that raised alone, or ran other collectives than its peers, would leave them
        waiting (or exchanging mismatched data) until the timeout.
        """
        device_type = "cpu" if problem else data.device.type  # an invalid input may be no tensor at all
        entries = {
            "call": float(_CALLS.index(call)),
            "input device type": float(_DEVICE_TYPES.index(device_type) if device_type in _DEVICE_TYPES else -1),
            "initted (k-means done)": 0.0 if problem else float(self._keys_initted()),
            **{name: _as_number(getattr(self, name)) for name in _SWITCHES},
        }
        table = self.layout.all_gather_world(_row({"queries": local_queries, "invalid": problem is not None, **entries}))
        bad_ranks = [r for r in range(table.shape[0]) if table[r, 1]]
        if bad_ranks:
            raise ValueError(f"invalid bottleneck input on rank(s) {bad_ranks}" + (f": {problem}" if problem else ""))
        _raise_if_ranks_differ(table[:, 2:], list(entries), "the bottleneck call (a switch set on some ranks only?)")
        return [int(n) for n in table[:, 0]]

    def _values_to_requesters(self, owned_indices_cit: torch.Tensor, peer_queries: List[int]) -> torch.Tensor:
        """Values of the owned lookups, sent back to the ranks whose samples asked: [C, i, t, v]."""
        owned_values = self.fetch_values(self._flat_indices(owned_indices_cit))
        return self.layout.route_back(owned_values, self.num_codebooks, peer_queries)

    def _owners_lookup(self, x: torch.Tensor, call: str, with_details: bool):
        """x routed to the codebooks' owners, looked up (and learned from) there: (lookup, routed, batch, spatial)."""
        problem = self.input_problem(x)
        queries = 0 if problem else x.shape[0] * math.prod(x.shape[2:-1])
        queries_per_rank = self._agree_on_call(call, problem, queries, x)
        queries_cik, batch, spatial = self._queries_from_input(x)
        routed = self.layout.route_to_owners(queries_cik, queries_per_rank)
        lookup = self._lookup_and_learn(
            routed.owned_cik,
            routed.first_query_id,
            routed.num_global_queries,
            reduce_sum=self.layout.all_reduce_replicas,
            with_details=with_details,
        )
        return lookup, routed, batch, spatial

    def forward(self, x: torch.Tensor):
        with autocast_off(x):
            lookup, routed, batch, spatial = self._owners_lookup(x, "forward", with_details=not self.return_values_only)
            values = _arrange(self._values_to_requesters(lookup.indices, routed.peer_queries), batch, spatial)
            if self.return_values_only:
                return (values,)
            # The other outputs carry no gradient: one all-to-all for all of them.
            packed = torch.cat(
                [lookup.keys, lookup.indices[..., None].float(), lookup.scores[..., None], lookup.counts[..., None]],
                dim=-1,
            )
            packed = _arrange(self.layout.route_back(packed, self.num_codebooks, routed.peer_queries), batch, spatial)
            keys, indices, scores, counts = packed.split([self.dim_keys, 1, 1, 1], dim=-1)
            return BottleneckOutput(values, keys, indices.long(), scores, counts)

    def values_at(self, indices: torch.Tensor) -> torch.Tensor:
        problem = self.indices_problem(indices)
        queries = 0 if problem else indices.numel() // self.num_codebooks
        queries_per_rank = self._agree_on_call("values_at", problem, queries, indices)
        batch, num_codebooks, *rest = indices.shape
        # Every (sample, t, position) is one query fetching one pair: [C, i, 1].
        routed = self.layout.route_to_owners(indices.movedim(1, 0).reshape(num_codebooks, -1, 1), queries_per_rank)
        if self.count_cluster_size:
            self._count_usage_(routed.owned_cik)
        values = self._values_to_requesters(routed.owned_cik, routed.peer_queries)  # [C, i, 1, v]
        return values.reshape(num_codebooks, batch, *rest, self.dim_values).movedim(0, 1)

    # ------------------------------------------------------------------------------------------
    # Indices cached where they are used: on the owners of the codebooks

    def owned_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Pairs [C_mine, I, t] that the codebooks held here give my shard group's queries of x.

        The I queries are those of the shard group's ranks, concatenated in rank order (as a
        forward routes them). With frozen keys a sample always fetches the same pairs, so a
        trainer can keep, for the codebooks a rank owns, every sample's indices (1/S of them per
        rank) and train with `values_at_rows`. Collective.
        """
        with autocast_off(x):
            return self._owners_lookup(x, "owned_indices", with_details=False)[0].indices

    def values_at_rows(self, owned: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Values [b, C, t, v] of my samples `rows` [b], where owned [N, C_mine, t] holds the pairs
        every sample fetches from the codebooks held here (see owned_indices).

        Only row ids travel to the owners, not indices; usage is counted as in a frozen
        forward. Collective: every rank of the shard group calls it.
        """
        problem = None
        if not isinstance(owned, torch.Tensor) or owned.ndim != 3 or owned.shape[1] != self.values.shape[0]:
            problem = f"owned must be [samples, codebooks held here={self.values.shape[0]}, t], got {getattr(owned, 'shape', owned)}"
        elif not isinstance(rows, torch.Tensor) or rows.ndim != 1 or rows.dtype != torch.int64:
            problem = f"rows must be an int64 tensor [b], got {getattr(rows, 'dtype', type(rows).__name__)} {getattr(rows, 'shape', '')}"
        elif rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= owned.shape[0]):
            problem = f"rows must be in [0, {owned.shape[0]}) (the samples in owned)"
        queries_per_rank = self._agree_on_call("values_at_rows", problem, 0 if problem else rows.numel(), owned)
        peer_sizes = self.layout.shard_peers(queries_per_rank)
        peer_rows = self.layout.all_gather_rows(rows, peer_sizes, over="shard")
        indices = owned[peer_rows.to(owned.device)].long().movedim(1, 0)  # [C_mine, I, t]
        if self.count_cluster_size:
            self._count_usage_(indices)
        return self._values_to_requesters(indices, peer_sizes).movedim(0, 1)  # [C, b, t, v] -> [b, C, t, v]

    def _is_only_holder(self) -> bool:
        return self.layout.num_replicas == 1

    def _gathered_over_holders(self, *rows: torch.Tensor):
        # Replicas hold the same codebooks: gather the rows (O(batch x C) of them), never [C, J] tensors.
        return self.layout.gather_rows(*rows, over="replica")[0]

    def fraction_of_unused_keys(self) -> torch.Tensor:
        unused = (self.cluster_size_counter == 0).sum().double()
        # Every replica group holds the same counters: the world sum counts each pair R times.
        unused = self.layout.all_reduce_world(unused) / self.layout.num_replicas
        return (unused / (self.num_codebooks * self.key_value_pairs_per_codebook)).float()

    # ------------------------------------------------------------------------------------------
    # State: per-shard via state_dict(); sharded_state_dict() for torch.distributed.checkpoint
    # (any layout, no gathering); the full state only for small models.

    def global_view(self, local: torch.Tensor) -> torch.Tensor:
        """A [C_mine, ...] per-codebook tensor as a DTensor over all C codebooks (shares memory)."""
        return self.layout.global_view(local, self.num_codebooks)

    def sharded_state_dict(self) -> Dict[str, torch.Tensor]:
        """state_dict() with every per-codebook tensor as its `global_view`, for kvb_dist.distributed.checkpoint.

        Saving it writes only this rank's codebooks; loading into it reads only them, from a
        checkpoint of any layout or of a single process. Shares memory with the module.
        """
        return {name: self.global_view(t) if name in _PER_CODEBOOK else t for name, t in self.state_dict().items()}

    def gather_codebooks(self, local: torch.Tensor) -> torch.Tensor:
        """[C_mine, ...] per-codebook tensor -> [C, ...] for all codebooks (collective: every rank calls)."""
        layout = self.layout
        sizes = shard_sizes(self.num_codebooks, layout.num_shards)
        gathered = layout.all_gather_rows(local, [sizes[r % layout.num_shards] for r in range(layout.world_size)])
        return gathered[: self.num_codebooks]  # replica 0's shard ranks hold every codebook once, in order

    def local_codebooks(self, full: torch.Tensor) -> torch.Tensor:
        """[C, ...] -> the rows of the codebooks this rank holds."""
        if full.shape[0] != self.num_codebooks:
            raise ValueError(f"expected a tensor of num_codebooks={self.num_codebooks} rows, got shape {tuple(full.shape)}")
        start, stop = self.layout.codebook_range(self.num_codebooks)
        return full[start:stop]

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The state of all codebooks, loadable by KeyValueBottleneck (collective: call on every rank).

        Gathers every codebook onto every rank: for small models and tests only. Checkpoints go
        through `sharded_state_dict()`.
        """
        return {
            name: (self.gather_codebooks(t) if name in _PER_CODEBOOK else t).detach().clone()
            for name, t in self.state_dict().items()
        }

    def load_full_state_dict(self, full: Dict[str, torch.Tensor], strict: bool = True):
        """Load a full (single-process or gathered) state, keeping the codebooks this rank holds."""
        mine = {name: self.local_codebooks(t) if name in _PER_CODEBOOK else t for name, t in full.items()}
        return self.load_state_dict(mine, strict=strict)


_PER_CODEBOOK = ("keys", "keys_avg", "values", "cluster_size", "cluster_size_counter")


def sharded_modules(model: nn.Module) -> Iterable[tuple]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ShardedKeyValueBottleneck)]


def prepare_for_ddp(model: nn.Module) -> nn.Module:
    """Make a model with sharded bottlenecks safe to wrap with DDP / Accelerate.

    DDP would broadcast rank 0's shard over everyone's and average shard gradients across
    ranks that hold different codebooks; the sharded parameters and buffers are therefore
    excluded from DDP (their gradients are synchronized by the module itself). Call before
    `DistributedDataParallel(model)` or `accelerator.prepare(model)`.
    """
    ignored = []
    for prefix, module in sharded_modules(model):
        dotted = f"{prefix}." if prefix else ""
        ignored += [dotted + n for n, _ in module.named_parameters(recurse=False)]
        ignored += [dotted + n for n, _ in module.named_buffers(recurse=False)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return model
