"""The key-value bottleneck module, compatible with the original research code.

Names, arguments, defaults, buffers and outputs follow the original `KeyValueBottleneck` so that
user code and checkpoints carry over. The math lives in `kvb_dist.codebook`; this module holds
the state and works on a contiguous slice of codebooks (all of them here), which is what lets
`kvb_dist.distributed.sharded` reuse it for the codebooks one rank owns.

Shape legend: b batch, c codebooks, n positions (spatial dims flattened), i = b * n queries,
j key-value pairs per codebook, k key dim, v value dim, t pairs fetched per query.
"""

from __future__ import annotations

import math
import mmap
import numbers
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from kvb_dist.codebook import (
    Reduce,
    counter_hash,
    counter_randint,
    ema_step_,
    nearest_keys,
    nearest_keys_and_ema_step_,
    no_reduce,
    rows_by_query_id,
    smoothed_cluster_size,
)
from kvb_dist.kmeans import lloyd_
from kvb_dist.native import native_kernels

INIT_MODES = ("random", "kmeans")
# The state-dict entries of the original code's KeyValueBottleneck.
ORIGINAL_STATE_NAMES = ("initted", "cluster_size", "cluster_size_counter", "keys_avg", "keys", "values")
# Buffers the codebook math reads and writes in float32 (see KeyValueBottleneck._apply).
_FP32_STATE = ("keys", "keys_avg", "cluster_size", "cluster_size_counter", "initted")

# Tags that keep the counter-based random streams apart.
_TAG_KEYS, _TAG_VALUES, _TAG_NOISE, _TAG_REPLACE, _TAG_KMEANS = 1, 2, 3, 4, 5


def seeded_normal(seed: int, tag: int, first_codebook: int, shape: Sequence[int], device=None) -> torch.Tensor:
    """Standard normals [c, j, d] on `device` (default CPU) for codebooks first_codebook..: codebook
    g's from a generator of that device seeded by (seed, tag, g).

    A codebook's numbers depend on (seed, tag, g), its shape [j, d] and the device type only, so a
    sharded module holds exactly the slice that one process on the same device type creates.
    Device types draw different normals for one seed (CPU and CUDA do; CUDA's may also differ
    between GPU models, whose size sets its kernels' launch geometry); a device type with no
    generator of its own gets the CPU's, one codebook at a time. "meta" draws nothing.

    One generator call per codebook keeps it as fast as torch.randn (hashing every element was
    100x slower). torch's CPU normal_ is serial: CPU codebooks are drawn on
    torch.get_num_threads() threads, each into its place (no temporary, no copy).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    out = torch.empty(shape, device=device)
    if device.type == "meta" or out.numel() == 0:
        return out
    # Every codebook's seed from one hash (a hash per codebook cost 0.1 ms), as non-negative ints.
    ids = torch.arange(first_codebook, first_codebook + shape[0])
    seeds = (counter_hash(torch.tensor(seed), torch.tensor(tag), ids) & ((1 << 63) - 1)).tolist()
    if device.type == "cpu":
        def draw(i: int) -> None:
            out[i].normal_(generator=torch.Generator().manual_seed(seeds[i]))

        workers = min(torch.get_num_threads(), len(seeds))
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(draw, range(len(seeds))))
        else:
            for i in range(len(seeds)):
                draw(i)
        return out
    try:
        generator = torch.Generator(device=device)
    except RuntimeError:  # no generator on this device type: the CPU's numbers
        generator = None
    for i, codebook_seed in enumerate(seeds):
        if generator is None:
            out[i].copy_(torch.randn(out.shape[1:], generator=torch.Generator().manual_seed(codebook_seed)))
        else:
            out[i].normal_(generator=generator.manual_seed(codebook_seed))
    return out


class Lookup(NamedTuple):
    """What a lookup finds for a slice of codebooks; each [c, i, t, ...]."""

    indices: torch.Tensor  # [c, i, t] pair index within its codebook
    counts: Optional[torch.Tensor]  # [c, i, t] cluster_size_counter of the fetched pair before this step (with_details)
    keys: Optional[torch.Tensor]  # [c, i, t, k] keys before this step's EMA update (with_details)
    scores: Optional[torch.Tensor]  # [c, i, t] -||query - key||^2, differentiable w.r.t. the query


class BottleneckOutput(tuple):
    """``(values, keys, indices, distances)``: the four outputs the original README documents.

    It unpacks to exactly those four and names them (``out.values``, ``out.indices``, ...);
    ``out.counts`` holds the usage count of each fetched pair, which the original code returns
    as a fifth element (its own README unpacks four, which fails there).
    """

    def __new__(cls, values, keys, indices, distances, counts):
        out = super().__new__(cls, (values, keys, indices, distances))
        out.counts = counts
        return out

    def __getnewargs__(self):  # pickle and copy rebuild it through __new__
        return (*self, self.counts)

    values = property(lambda self: self[0])
    keys = property(lambda self: self[1])
    indices = property(lambda self: self[2])
    distances = property(lambda self: self[3])

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}={tuple(t.shape)}" for name, t in zip(("values", "keys", "indices", "distances"), self))
        return f"BottleneckOutput({shapes}, counts={tuple(self.counts.shape)})"


# A pytree node with counts as a child, so DDP, torch.func and friends keep it when they rebuild outputs.
pytree.register_pytree_node(
    BottleneckOutput,
    lambda out: ([*out, out.counts], None),
    lambda children, _: BottleneckOutput(*children),
    serialized_type_name="kvb_dist.core.BottleneckOutput",
)


class KeyValueBottleneck(nn.Module):
    """Discrete key-value bottleneck: C codebooks of J (key, value) pairs.

    Input ``[batch, num_codebooks, *spatial, dim_keys]`` (any number of spatial dims, zero
    included). Output: ``(values,)`` when ``return_values_only`` else a `BottleneckOutput`
    that unpacks to ``(values, keys, indices, distances)`` and has ``.counts``, with

    - values    ``[batch, num_codebooks, t, *spatial, dim_values]``
    - keys      ``[batch, num_codebooks, t, *spatial, dim_keys]``
    - indices   ``[batch, num_codebooks, t, *spatial, 1]`` (int64)
    - distances ``[batch, num_codebooks, t, *spatial, 1]``: -||head - key||^2, as the original
    - counts    ``[batch, num_codebooks, t, *spatial, 1]``: usage count of the fetched pair

    where t = ``topk`` once keys are frozen and 1 while keys learn (the EMA uses the nearest key).
    """

    def __init__(
        self,
        num_codebooks: int,
        key_value_pairs_per_codebook: int,
        dim_keys: int,
        dim_values: int,
        init_mode: str = "random",
        kmeans_iters: int = 10,
        decay: float = 0.95,
        eps: float = 1e-5,
        threshold_ema_dead_code: float = 0.0,
        sample_codebook_temperature: float = 0.0,
        return_values_only: bool = True,
        topk: int = 1,
        *,
        seed: Optional[int] = None,
        chunk_elements: Optional[int] = None,
        sparse_values: bool = False,
        device=None,
    ):
        """Arguments as the original's, plus seed, chunk_elements, sparse_values and device.

        device: where every buffer and the values are built, the random ones drawn there by that
        device's generator (default None: the CPU). Initial numbers therefore depend on the
        device type (see `seeded_normal`); on one device type they never depend on the layout.
        device="meta" allocates and draws nothing, for a module whose state will be loaded:
        ``module.to_empty(device=...)`` and then ``load_state_dict`` or a
        torch.distributed.checkpoint load (or ``load_state_dict(state, assign=True)`` directly).
        to_empty leaves the codebook tensors uninitialized, as PyTorch does, but random_state
        gets this seed back; a forward before materializing raises.
        """
        super().__init__()
        _check_arguments(
            num_codebooks=num_codebooks,
            key_value_pairs_per_codebook=key_value_pairs_per_codebook,
            dim_keys=dim_keys,
            dim_values=dim_values,
            init_mode=init_mode,
            kmeans_iters=kmeans_iters,
            decay=decay,
            eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            sample_codebook_temperature=sample_codebook_temperature,
            topk=topk,
            chunk_elements=chunk_elements,
            device=device,
        )
        self.num_codebooks = num_codebooks
        self.key_value_pairs_per_codebook = key_value_pairs_per_codebook
        self.dim_keys = dim_keys
        self.dim_values = dim_values
        self.init_mode = init_mode
        self.kmeans_iters = kmeans_iters
        self.decay = decay
        self.eps = eps
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.sample_codebook_temperature = sample_codebook_temperature
        self.return_values_only = return_values_only
        self.topk = topk
        self.chunk_elements = chunk_elements
        self.sparse_values = bool(sparse_values)
        self._gradient_memory = _ReusedZeros()
        self.update_keys = True
        self.count_cluster_size = True
        if seed is None:  # drawn from torch's generator, so torch.manual_seed still governs init
            seed = int(torch.randint(0, 2**62, ()).item())
        # numbers.Integral keeps numpy integers working; the seed lives in an int64 buffer.
        elif not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not -(2**63) <= seed < 2**63:
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**63), got {seed!r}")
        seed = int(seed)
        # Gradient hooks of `values`, registered again whenever the parameter object is replaced
        # (to_empty from meta, load_state_dict(assign=True)): see _apply.
        self._values_grad_hooks = []
        self._register_state(seed, first_codebook=0, num_local_codebooks=num_codebooks, device=device)

    @property
    def topk(self) -> int:
        """Pairs fetched per query once keys are frozen, in [1, key_value_pairs_per_codebook]."""
        return self._topk

    @topk.setter
    def topk(self, value: int) -> None:
        # Checked on every assignment: a later `module.topk = 0` would otherwise fail deep in the lookup.
        pairs = self.key_value_pairs_per_codebook
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= pairs:
            raise ValueError(f"topk must be an integer in [1, key_value_pairs_per_codebook={pairs}], got {value!r}")
        self._topk = value

    def _register_state(self, seed: int, first_codebook: int, num_local_codebooks: int, device=None) -> None:
        """State for codebooks first_codebook .. first_codebook + num_local_codebooks - 1, built on device."""
        self.first_codebook = first_codebook
        self._construction_seed = seed  # random_state's seed after to_empty from meta (see _apply)
        shape = (num_local_codebooks, self.key_value_pairs_per_codebook)
        if self.init_mode == "random":
            keys = seeded_normal(seed, _TAG_KEYS, first_codebook, (*shape, self.dim_keys), device)
        else:
            keys = torch.zeros(*shape, self.dim_keys, device=device)
        values = seeded_normal(seed, _TAG_VALUES, first_codebook, (*shape, self.dim_values), device)
        self.register_buffer("initted", torch.tensor([float(self.init_mode != "kmeans")], device=device))
        self.register_buffer("cluster_size", torch.zeros(shape, device=device))
        self.register_buffer("cluster_size_counter", torch.zeros(shape, device=device))
        self.register_buffer("keys_avg", keys.clone())
        self.register_buffer("keys", keys)
        # [seed, step]: counter-based randomness is a function of these (and global ids) only.
        self.register_buffer("random_state", torch.tensor([seed, 0], dtype=torch.int64, device=device))
        self.values = nn.Parameter(values)
        # Dead pairs replaced so far (held here, with the state's device so that adding to it needs
        # no host sync and NCCL can sum it; not part of the checkpointed state: no buffer).
        self.num_replaced_pairs = torch.zeros((), dtype=torch.int64, device=device)

    def _apply(self, fn, recurse=True):
        """`.double()`, `.half()`, `.to(dtype)` cast the values only: codebook state stays float32.

        The lookup and the EMA run in fp32 whatever the module's dtype; the values are what the
        decoder reads, so they follow the cast. Device moves apply to everything.

        Materializing a meta module (`to_empty`) sets random_state to [seed, 0] of construction,
        which checkpoints of the original code do not hold, and num_replaced_pairs to 0 (it moves
        with the state otherwise); the rest stays uninitialized until a load. A values parameter
        replaced by a new object gets its gradient hooks back.
        """
        before = {name: self._buffers[name] for name in _FP32_STATE}
        values_before = self._parameters["values"]
        was_meta = self._buffers["random_state"].is_meta
        super()._apply(fn, recurse)
        for name, old in before.items():
            if self._buffers[name].dtype != old.dtype:
                self._buffers[name] = old.to(self._buffers[name].device)
        random_state = self._buffers["random_state"]
        if was_meta and not random_state.is_meta:
            random_state.copy_(torch.tensor([self._construction_seed, 0]))
            self.num_replaced_pairs = torch.zeros((), dtype=torch.int64, device=random_state.device)
        elif self.num_replaced_pairs.device != random_state.device:
            self.num_replaced_pairs = self.num_replaced_pairs.to(random_state.device)
        if self._parameters["values"] is not values_before:
            for hook in getattr(self, "_values_grad_hooks", ()):
                self._parameters["values"].register_hook(hook)
        return self

    # ------------------------------------------------------------------------------------------
    # Forward

    def forward(self, x: torch.Tensor):
        with autocast_off(x):
            queries_cik, batch, spatial = self._queries_from_input(x)
            lookup = self._lookup_and_learn(
                queries_cik,
                first_query_id=0,
                num_global_queries=queries_cik.shape[1],
                reduce_sum=no_reduce,
                with_details=not self.return_values_only,
            )
            # Arrange the (small) indices first, so the values land in the output layout directly.
            flat = _arrange(self._flat_indices(lookup.indices), batch, spatial)
            values = self.fetch_values(flat)
            if self.return_values_only:
                return (values,)
            return BottleneckOutput(
                values,
                _arrange(lookup.keys, batch, spatial),
                _arrange(lookup.indices, batch, spatial)[..., None],
                _arrange(lookup.scores, batch, spatial)[..., None],
                _arrange(lookup.counts, batch, spatial)[..., None],
            )

    def state_problem(self) -> Optional[str]:
        """Why this module cannot look anything up (built on the meta device, not loaded yet), or None."""
        if any(t.is_meta for t in (*self._buffers.values(), *self._parameters.values())):
            return (
                f"{type(self).__name__} holds no state yet: it was built on the meta device. Materialize it "
                f"first: module.to_empty(device=...) and then load_state_dict(...) or a torch.distributed.checkpoint "
                f"load, or module.load_state_dict(state, assign=True)"
            )
        return None

    def input_problem(self, x) -> Optional[str]:
        """Why x is not a valid input [batch, num_codebooks, *spatial, dim_keys] (or the module cannot
        take any, see state_problem), or None."""
        state_problem = self.state_problem()
        if state_problem:
            return state_problem
        expected = f"[batch, num_codebooks={self.num_codebooks}, *spatial, dim_keys={self.dim_keys}]"
        if not isinstance(x, torch.Tensor):
            return f"input must be a torch.Tensor {expected}, got {type(x).__name__}"
        if x.layout != torch.strided:
            return f"input must be a dense (strided) tensor, got layout {x.layout}"
        if x.is_meta:
            return "input is on the meta device: it holds no values to look up"
        if x.ndim < 3 or x.shape[1] != self.num_codebooks or x.shape[-1] != self.dim_keys:
            return f"input must have shape {expected}, got {tuple(x.shape)}"
        if not x.is_floating_point():
            return f"input must be a floating point tensor, got {x.dtype}"
        # One cheap reduction first; the exact elementwise check only if the sum is not finite.
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            return "input heads contain NaN or infinite values"
        return None

    def _queries_from_input(self, x: torch.Tensor):
        """[b, c, *spatial, k] -> queries [c, (b n), k] in fp32, with the input validated."""
        problem = self.input_problem(x)
        if problem is not None:
            raise ValueError(problem)
        x = x.float()
        batch, num_codebooks, *spatial, dim = x.shape
        positions = math.prod(spatial)
        queries = x.reshape(batch, num_codebooks, positions, dim).permute(1, 0, 2, 3)
        return queries.reshape(num_codebooks, batch * positions, dim), batch, spatial

    def _flat_indices(self, indices_cit: torch.Tensor) -> torch.Tensor:
        """Pair index within the codebook -> row of the flattened [c * j] tables held here."""
        offsets = torch.arange(indices_cit.shape[0], device=indices_cit.device) * self.key_value_pairs_per_codebook
        return indices_cit + offsets[:, None, None]

    def fetch_values(self, flat_indices: torch.Tensor) -> torch.Tensor:
        """Values [*, v] of rows of the flattened table; gradients reach only these rows.

        With sparse_values the gradient of `values` is a sparse COO tensor holding only these
        rows, for torch.optim.SGD, SparseAdam and Adagrad, which then touch nothing else.
        """
        return _FetchRows.apply(self.values, flat_indices, self.sparse_values, self._gradient_memory)

    def indices_problem(self, indices) -> Optional[str]:
        """Why indices is not valid input for values_at, or None."""
        state_problem = self.state_problem()
        if state_problem:
            return state_problem
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64:
            return "indices must be an int64 tensor [batch, num_codebooks, t, *spatial]"
        if indices.ndim < 3 or indices.shape[1] != self.num_codebooks:
            return f"indices must have shape [batch, num_codebooks={self.num_codebooks}, t, *spatial], got {tuple(indices.shape)}"
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.key_value_pairs_per_codebook):
            return f"indices must be in [0, key_value_pairs_per_codebook={self.key_value_pairs_per_codebook})"
        return None

    def values_at(self, indices: torch.Tensor) -> torch.Tensor:
        """Values [b, c, t, *spatial, v] of pairs [b, c, t, *spatial] found by an earlier lookup.

        Once keys are frozen a sample always fetches the same pairs: training can cache its
        indices (the `indices` output) and fetch values with a gather, skipping the lookup.
        Usage is counted as in a frozen forward.
        """
        problem = self.indices_problem(indices)
        if problem is not None:
            raise ValueError(problem)
        if self.count_cluster_size:
            self._count_usage_(indices.transpose(0, 1).reshape(self.num_codebooks, -1, 1))
        offsets = torch.arange(self.num_codebooks, device=indices.device) * self.key_value_pairs_per_codebook
        return self.fetch_values(indices + offsets.view(1, -1, *([1] * (indices.ndim - 2))))

    def _lookup_and_learn(
        self,
        queries_cik: torch.Tensor,
        first_query_id: int,
        num_global_queries: int,
        reduce_sum: Reduce,
        with_details: bool = False,
    ) -> Lookup:
        """Lookup (and, while keys learn, the EMA step) for the codebooks held here.

        The queries are the global queries first_query_id .. first_query_id + i - 1 of a batch
        of num_global_queries; reduce_sum adds a statistic over every holder of these codebooks.
        """
        num_local, num_queries, _ = queries_cik.shape
        device = queries_cik.device
        seed, step = self.random_state[0], self.random_state[1]
        learning = self.update_keys
        # Key statistics never carry gradients (heads may require grad, e.g. a learned splitter).
        detached = queries_cik.detach()
        # As in the original, k-means fits the keys on the first batch whatever the switches say
        # (frozen keys, prepare(epochs=0), a checkpoint with initted 0): never all-zero keys.
        if not self._keys_initted():
            self._kmeans_init_(detached, first_query_id, num_global_queries, reduce_sum)

        excluded = None if self.count_cluster_size else self.cluster_size_counter == 0
        replace_seed = counter_hash(seed, torch.tensor(_TAG_REPLACE), step) if learning else None
        if (learning and num_global_queries > 0 and self._is_only_holder() and not with_details
                and self.sample_codebook_temperature == 0 and excluded is None):
            # Nothing to gather, nothing to copy before the keys change: lookup and EMA step together.
            indices, replaced = nearest_keys_and_ema_step_(
                detached, self.keys, self.keys_avg, self.cluster_size, self.decay, self.eps,
                self.threshold_ema_dead_code, replace_seed, self.first_codebook,
            )
            self.num_replaced_pairs += replaced.to(self.num_replaced_pairs.device)
            self.random_state[1] += 1
            return Lookup(indices, None, None, None)
        # The search needs no graph; distances of the fetched keys are recomputed below.
        with torch.no_grad():
            indices, _ = nearest_keys(
                queries_cik,
                self.keys,
                topk=1 if learning else self.topk,
                temperature=self.sample_codebook_temperature,
                excluded_cj=excluded,
                noise_seed=counter_hash(seed, torch.tensor(_TAG_NOISE), step),
                codebook_ids=torch.arange(num_local, device=device) + self.first_codebook,
                query_ids=torch.arange(num_queries, device=device) + first_query_id,
                chunk_elements=self.chunk_elements,
            )
        keys = scores = counts = None
        if with_details:  # copies taken before the EMA update below changes the keys in place
            flat = self._flat_indices(indices)
            counts = self.cluster_size_counter.reshape(-1)[flat]
            keys = self.keys.reshape(-1, self.dim_keys)[flat]
            scores = -(queries_cik[:, :, None, :] - keys).pow(2).sum(-1)

        if learning:
            if num_global_queries > 0:  # the same on every holder: all make the same collectives
                # The holders' queries and indices, gathered in batch order: O(batch x c x k) travels, whatever J is.
                batch_ick, indices_ic = self._gathered_over_holders(
                    detached.transpose(0, 1), indices[..., 0].transpose(0, 1)
                )
                self.num_replaced_pairs += ema_step_(
                    self.keys, self.keys_avg, self.cluster_size, batch_ick, indices_ic, self.decay, self.eps,
                    self.threshold_ema_dead_code, replace_seed, first_codebook=self.first_codebook,
                ).to(self.num_replaced_pairs.device)
        elif self.count_cluster_size:
            self._count_usage_(indices)
        self.random_state[1] += 1
        return Lookup(indices, counts, keys, scores)

    def _keys_initted(self) -> bool:
        """The initted flag, read from the buffer only when it may have changed (a new tensor, or an
        in-place write such as load_state_dict's copy): a step on a GPU then never waits for it."""
        seen = (id(self.initted), self.initted._version)
        if getattr(self, "_initted_seen", None) != seen:
            self._initted_value = bool(self.initted.item())
            self._initted_seen = seen
        return self._initted_value

    def _count_usage_(self, indices_cit: torch.Tensor) -> None:
        """One more use for every pair [c, i, t] fetched by any holder; touches those pairs only."""
        (flat,) = self._gathered_over_holders(self._flat_indices(indices_cit).reshape(-1))
        self.cluster_size_counter.view(-1).index_add_(0, flat, torch.ones(flat.shape, device=flat.device))

    def _is_only_holder(self) -> bool:
        """Whether no other process holds these codebooks (their queries here are the whole batch)."""
        return True

    def _gathered_over_holders(self, *rows: torch.Tensor):
        """Row tensors of every holder of these codebooks, concatenated in batch order (here the only holder).

        The sharded module gathers them over its replica group: rows of the batch travel (queries,
        indices), never [c, j] tensors.
        """
        return rows

    def _kmeans_init_(self, queries_cik, first_query_id: int, num_global_queries: int, reduce_sum: Reduce):
        """init_mode="kmeans": fit keys on the first (global) batch, with EMA state that derives them."""
        if num_global_queries == 0:
            return
        num_local, num_pairs = self.keys.shape[:2]
        device = queries_cik.device
        codebook_index = torch.arange(num_local, device=device).repeat_interleave(num_pairs)
        pair_index = torch.arange(num_pairs, device=device).repeat(num_local)
        wanted = counter_randint(
            counter_hash(self.random_state[0], torch.tensor(_TAG_KMEANS)),
            num_global_queries,
            codebook_index + self.first_codebook,
            pair_index,
        )
        means = reduce_sum(rows_by_query_id(queries_cik, first_query_id, codebook_index, wanted))
        means = means.view(num_local, num_pairs, self.dim_keys)
        counts = lloyd_(queries_cik, means, self.kmeans_iters, reduce_sum, self.chunk_elements)
        # kmeans_iters=0 keeps the sampled heads as keys, each counted once.
        self.set_keys_(means, counts if self.kmeans_iters > 0 else None)

    # ------------------------------------------------------------------------------------------
    # Keys from outside, switches and usage

    @torch.no_grad()
    def set_keys_(self, keys: torch.Tensor, cluster_size: Optional[torch.Tensor] = None) -> None:
        """Install keys fitted elsewhere (e.g. distributed k-means) with consistent EMA state.

        keys: [codebooks held here, pairs, dim_keys]; cluster_size: [codebooks, pairs] cluster
        counts (default: one per pair). keys_avg is set so that keys_avg / smoothed(cluster_size)
        gives the keys back, so the next EMA step continues from them.
        """
        if tuple(keys.shape) != tuple(self.keys.shape):
            raise ValueError(f"keys must have shape {tuple(self.keys.shape)}, got {tuple(keys.shape)}")
        if cluster_size is None:
            cluster_size = torch.ones(self.cluster_size.shape, device=self.keys.device)
        if tuple(cluster_size.shape) != tuple(self.cluster_size.shape):
            raise ValueError(
                f"cluster_size must have shape {tuple(self.cluster_size.shape)}, got {tuple(cluster_size.shape)}"
            )
        if not bool(torch.isfinite(keys).all()):
            raise ValueError("keys contain NaN or infinite values")
        if not bool(torch.isfinite(cluster_size).all()):
            raise ValueError("cluster_size contains NaN or infinite values")
        if bool((cluster_size < 0).any()):
            raise ValueError("cluster_size contains negative values; it holds cluster counts (>= 0)")
        self.keys.copy_(keys)
        self.cluster_size.copy_(cluster_size)
        self.keys_avg.copy_(self.keys * smoothed_cluster_size(self.cluster_size, self.eps)[..., None])
        self.initted.fill_(1.0)

    def freeze_keys(self):
        self.update_keys = False
        self.keys.requires_grad = False
        return self

    def unfreeze_keys(self):
        # The original also sets keys.requires_grad = True; keys are buffers learned by EMA and
        # no optimizer sees them, so here they never require a gradient.
        self.update_keys = True
        return self

    def enable_update_keys(self):
        self.update_keys = True

    def disable_update_keys(self):
        self.update_keys = False

    def activate_counts(self):
        self.count_cluster_size = True

    def deactivate_counts(self):
        """Stop counting usage; from now on pairs never used are excluded from lookup."""
        self.count_cluster_size = False

    def reset_cluster_size_counter(self):
        self.cluster_size_counter.zero_()

    def fraction_of_unused_keys(self) -> torch.Tensor:
        return (self.cluster_size_counter == 0).sum() / self.cluster_size_counter.numel()

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def original_state_dict(self) -> Dict[str, torch.Tensor]:
        """The state under exactly the original code's names (no random_state), for its load_state_dict.

        state_dict() keeps random_state ([seed, step]) so that a kvb_dist run resumes exactly;
        this is the export for the original code, which rejects extra entries with strict=True.
        """
        return {name: t for name, t in self.state_dict().items() if name in ORIGINAL_STATE_NAMES}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        expected = {
            "keys": ("num_codebooks, key_value_pairs_per_codebook, dim_keys", self.keys.shape),
            "keys_avg": ("num_codebooks, key_value_pairs_per_codebook, dim_keys", self.keys_avg.shape),
            "values": ("num_codebooks, key_value_pairs_per_codebook, dim_values", self.values.shape),
            "cluster_size": ("num_codebooks, key_value_pairs_per_codebook", self.cluster_size.shape),
            "cluster_size_counter": ("num_codebooks, key_value_pairs_per_codebook", self.cluster_size_counter.shape),
        }
        for name, (meaning, shape) in expected.items():
            found = state_dict.get(prefix + name)
            if found is not None and tuple(found.shape) != tuple(shape):
                raise ValueError(
                    f"checkpoint entry '{prefix}{name}' has shape {tuple(found.shape)} but this module expects "
                    f"({meaning}) = {tuple(shape)}"
                )
        # Codebook state with NaN/inf (or negative counts) would silently poison every lookup and EMA step.
        for name in ("keys", "keys_avg", "cluster_size", "cluster_size_counter"):
            found = state_dict.get(prefix + name)
            if not isinstance(found, torch.Tensor) or found.is_meta:
                continue
            if not bool(torch.isfinite(found).all()):
                raise ValueError(f"checkpoint entry '{prefix}{name}' contains NaN or infinite values")
            if name in ("cluster_size", "cluster_size_counter") and bool((found < 0).any()):
                raise ValueError(f"checkpoint entry '{prefix}{name}' contains negative values; it holds counts (>= 0)")
        # Checkpoints of the original code have no random_state: keep ours ([seed, 0] of construction
        # on a meta module, which holds none yet).
        if prefix + "random_state" not in state_dict:
            if self.random_state.is_meta:
                keys = state_dict.get(prefix + "keys")
                device = keys.device if isinstance(keys, torch.Tensor) else None
                state_dict[prefix + "random_state"] = torch.tensor([self._construction_seed, 0], device=device)
            else:
                state_dict[prefix + "random_state"] = self.random_state.clone()
        initted = state_dict.get(prefix + "initted")
        if initted is not None:  # the original stores a float [1] tensor; accept any truthy form
            state_dict[prefix + "initted"] = initted.reshape(1).float()
        if local_metadata.get("assign_to_params_buffers", False):  # assign keeps the entries' dtypes
            for name in _FP32_STATE:
                found = state_dict.get(prefix + name)
                if isinstance(found, torch.Tensor) and found.dtype != torch.float32:
                    state_dict[prefix + name] = found.float()
        values_before = self._parameters["values"]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self._parameters["values"] is not values_before:  # assign=True: a new parameter object
            for hook in getattr(self, "_values_grad_hooks", ()):
                self._parameters["values"].register_hook(hook)

    def extra_repr(self) -> str:
        return (
            f"num_codebooks={self.num_codebooks}, key_value_pairs_per_codebook={self.key_value_pairs_per_codebook}, "
            f"dim_keys={self.dim_keys}, dim_values={self.dim_values}, init_mode={self.init_mode!r}, topk={self.topk}"
        )


class _FetchRows(torch.autograd.Function):
    """Rows of values [c, j, v] at flat indices into c * j.

    sparse: the gradient is a hybrid COO tensor [c, j, v] (2 sparse dims, v dense) with one entry
    per fetched row, not coalesced: optimizers coalesce, and a replica sum concatenates before it
    does. Dense: the rows' gradients added into zeros in batch order (deterministic), on the CPU
    into memory reused from step to step (_ReusedZeros) by the native kernel (rows.c, 2-3x faster
    than index_add_), elsewhere by index_add_; both are several times faster than F.embedding's
    backward, which sorts the indices first.
    """

    @staticmethod
    def forward(ctx, values_cjv: torch.Tensor, flat_indices: torch.Tensor, sparse: bool, memory: "_ReusedZeros"):
        ctx.save_for_backward(flat_indices)
        ctx.values_shape, ctx.sparse, ctx.memory = values_cjv.shape, sparse, memory
        return F.embedding(flat_indices, values_cjv.reshape(-1, values_cjv.shape[-1]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (flat,) = ctx.saved_tensors
        num_codebooks, num_pairs, dim = ctx.values_shape
        flat, rows_grad = flat.reshape(-1), grad.reshape(-1, dim)
        if ctx.sparse:
            rows = torch.stack([torch.div(flat, num_pairs, rounding_mode="floor"), flat % num_pairs])
            return torch.sparse_coo_tensor(rows, rows_grad, ctx.values_shape, check_invariants=False), None, None, None
        on_cpu = rows_grad.device.type == "cpu"
        if on_cpu:
            dense = ctx.memory.zeros((num_codebooks * num_pairs, dim), rows_grad.dtype)
        else:
            dense = rows_grad.new_zeros(num_codebooks * num_pairs, dim)
        native = native_kernels() if on_cpu and rows_grad.dtype == torch.float32 else None
        if native is not None:
            native.add_rows_(dense, flat.contiguous(), rows_grad.contiguous())
        else:
            dense.index_add_(0, flat, rows_grad)
        return dense.view(ctx.values_shape), None, None, None


class _ReusedZeros:
    """Zeroed CPU tensors in memory kept from one call to the next: the dense value gradient's.

    A fresh tensor of the gradient's size (42 MB at the paper's size) is new memory from the kernel
    every step, zeroed page by page on first touch: 7-10 ms per step here, where a memset of memory
    already mapped takes 1.5 ms. So the memory is an anonymous map that tensors borrow through
    torch.frombuffer, each borrowing storage holding one reference to the map: when only this
    object refers to it, no tensor can see it any more, and it is zeroed and lent again. While a
    gradient lives it is that gradient's own memory (autograd keeps it as `.grad` without a copy);
    a gradient still held when the next one is asked for gets a fresh map, as before. Between steps
    the map stays: one gradient's size, no more at the peak.
    """

    def __init__(self):
        self._lock = threading.Lock()  # two threads must not both see the map free
        self._map: Optional[mmap.mmap] = None

    def __reduce__(self):  # a copied or pickled module starts without memory of its own
        return type(self), ()

    def zeros(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        num_bytes = math.prod(shape) * dtype.itemsize
        if num_bytes == 0:  # a rank may hold no codebooks; a map cannot be empty
            return torch.zeros(shape, dtype=dtype)
        with self._lock:
            # References while free: self._map and getrefcount's argument.
            free = self._map is not None and len(self._map) == num_bytes and sys.getrefcount(self._map) == 2
            if not free:
                self._map = mmap.mmap(-1, num_bytes)  # anonymous memory comes zeroed
                if hasattr(mmap, "MADV_HUGEPAGE"):  # one page fault per 2 MiB, not per 4 KiB, where allowed
                    self._map.madvise(mmap.MADV_HUGEPAGE)
            out = torch.frombuffer(self._map, dtype=dtype).view(*shape)
        return out.zero_() if free else out


def autocast_off(x) -> torch.autocast:
    """No autocast on x's device: codebook math runs in fp32. (CPU for what is no real tensor;
    the input check then says what is wrong with it.)"""
    real = isinstance(x, torch.Tensor) and x.device.type != "meta"
    return torch.autocast(device_type=x.device.type if real else "cpu", enabled=False)


def _arrange(t: torch.Tensor, batch: int, spatial: Sequence[int]) -> torch.Tensor:
    """[c, (b n), t, *rest] -> [b, c, t, *spatial, *rest]."""
    c, _, topk, *rest = t.shape
    t = t.reshape(c, batch, math.prod(spatial), topk, *rest).permute(1, 0, 3, 2, *range(4, 4 + len(rest)))
    return t.reshape(batch, c, topk, *spatial, *rest)


def _check_arguments(**args) -> None:
    def positive_int(name):
        value = args[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    for name in ("num_codebooks", "key_value_pairs_per_codebook", "dim_keys", "dim_values", "topk"):
        positive_int(name)
    if args["chunk_elements"] is not None:  # None: by the device (codebook.default_chunk_elements)
        positive_int("chunk_elements")
    if args["init_mode"] not in INIT_MODES:
        raise ValueError(f"init_mode must be one of {INIT_MODES}, got {args['init_mode']!r}")
    if not isinstance(args["kmeans_iters"], int) or args["kmeans_iters"] < 0:
        raise ValueError(f"kmeans_iters must be a non-negative integer, got {args['kmeans_iters']!r}")
    if not 0.0 <= args["decay"] <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {args['decay']!r}")
    if not args["eps"] > 0:
        raise ValueError(f"eps must be > 0, got {args['eps']!r}")
    if not args["threshold_ema_dead_code"] >= 0:
        raise ValueError(f"threshold_ema_dead_code must be >= 0, got {args['threshold_ema_dead_code']!r}")
    if not args["sample_codebook_temperature"] >= 0:
        raise ValueError(f"sample_codebook_temperature must be >= 0, got {args['sample_codebook_temperature']!r}")
    if args["topk"] > args["key_value_pairs_per_codebook"]:
        raise ValueError(
            f"topk={args['topk']} must not exceed key_value_pairs_per_codebook={args['key_value_pairs_per_codebook']}"
        )
    if args["device"] is not None:
        try:
            torch.device(args["device"])
        except (RuntimeError, TypeError, ValueError) as error:
            raise ValueError(f"device must be None, a torch.device or a device string such as 'cuda:0' or 'meta', "
                             f"got {args['device']!r} ({error})") from None


# The original keeps its encoder wrappers in this module: `from kvb_dist.core import
# BottleneckedEncoder` works as there (imported on first use; kvb_dist.encoders imports this module).
_WRAPPERS = ("BottleneckedEncoder", "DinoBottleneckedEncoder", "EncoderOutput")
_ORIGINAL_WRAPPERS_NOT_PROVIDED = (
    "SwavBottleneckedEncoder",
    "VICRegBottleneckedEncoder",
    "SLPretrainedBottleneckedEncoder",
    "CLIPBottleneckedEncoder",
    "ConvMixerBottleneckedEncoder",
)


def __getattr__(name: str):
    if name in _WRAPPERS:
        from kvb_dist import encoders

        return getattr(encoders, name)
    if name in _ORIGINAL_WRAPPERS_NOT_PROVIDED:
        raise ImportError(
            f"kvb_dist does not ship {name}: wrap any pretrained encoder with "
            f"BottleneckedEncoder(encoder, num_channels=<its output channels>, encoder_is_channel_last=..., ...) "
            f"(see 'Differences from the original' in the README); DinoBottleneckedEncoder and "
            f"EfficientNetBottleneckedEncoder are built in"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
