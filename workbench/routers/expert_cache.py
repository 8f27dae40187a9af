"""An expert-cache simulator for MoE routing traces: hit rate, bytes moved and an estimated time when only some
experts fit on the fast device. Pure functions of a trace; no model runs.

A routing trace `experts` is an integer array (numpy or torch) of shape (tokens, layers, k): the experts each token
used at each layer, in decode order, -1 where there is none (a dense layer, or a token that used fewer than k).
Missing entries are not accesses. `scores` (same shape, 0 where missing) are the routing weights.

How a token-layer is served: its experts are needed at once, so they are pinned while it is served (none of them
can evict another); the ones in the cache are hits, each miss is loaded into the cache, evicting one unpinned
expert chosen by the policy when the cache is full. Hence a cache must hold at least the largest number of experts
one token-layer uses (ParameterError otherwise). The cache starts empty (cold). Caches are per layer (each layer its
own `capacity` slots) or, with `shared=True`, one cache of `capacity` slots whose keys are (layer, expert).

Time: policies see `time = token + layer / layers`, so one unit is one token and token-layers are ordered as they
are served.
"""

from __future__ import annotations

import gc
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from workbench.errors import ParameterError, UnknownComponentError
from workbench.routers.cache_policies import (ARC, LFU, LRU, POLICIES, Belady, FateAllocation, Policy,  # noqa: F401
                                             ScoreAware)

__all__ = [
    "Policy", "LRU", "LFU", "ARC", "Belady", "ScoreAware", "FateAllocation", "POLICIES",
    "CostModel", "swiglu_expert_bytes", "CacheResult", "HitRateCurve", "simulate", "hit_rates",
]


# --------------------------------------------------------------------------------------------- cost model
def swiglu_expert_bytes(hidden: int, intermediate: int, bytes_per_weight: float = 2.0) -> float:
    """Bytes of one gated (SwiGLU) expert, gate + up + down projections: 3 * hidden * intermediate weights."""
    return 3.0 * hidden * intermediate * bytes_per_weight


@dataclass(frozen=True)
class CostModel:
    """Time of serving a trace: per token-layer, the compute of its experts (`expert_compute_s` each) plus the
    transfer of its misses and prefetches (`expert_bytes / bandwidth_bytes_per_s` each), one after the other: no
    overlap. With `overlap=True` the prefetch of the next token-layer streams while this one computes (one copy
    engine beside the compute), so a token-layer costs its demand misses + max(its compute, the next prefetch);
    demand misses never overlap."""

    expert_bytes: float
    bandwidth_bytes_per_s: float
    expert_compute_s: float
    overlap: bool = False
    name: str = "custom"

    @classmethod
    def pcie4_gpu(cls, expert_bytes: float, overlap: bool = False) -> CostModel:
        """A GPU fed over PCIe 4.0 x16 from pinned host RAM: 32 GB/s on paper, ~25 GB/s effective host-to-device.
        Decode is memory-bound, so an expert's compute is its bytes read at ~1 TB/s of device memory (RTX 4090 /
        A100-40GB class)."""
        return cls(expert_bytes, 25e9, expert_bytes / 1e12, overlap, "pcie4-gpu")

    @classmethod
    def cpu_laptop(cls, expert_bytes: float, overlap: bool = False) -> CostModel:
        """A CPU-only laptop: the cache is RAM, the rest of the experts live on an NVMe SSD read at ~3 GB/s
        (PCIe 3.0 x4 class, sequential; a memory-mapped model file). Compute is memory-bound at ~40 GB/s
        effective (dual-channel DDR5)."""
        return cls(expert_bytes, 3e9, expert_bytes / 40e9, overlap, "cpu-laptop")

    def seconds(self, active: np.ndarray, misses: np.ndarray, prefetched: np.ndarray) -> float:
        """Total time for token-layers in serving order: `active` experts, `misses` and `prefetched` loads each."""
        transfer = self.expert_bytes / self.bandwidth_bytes_per_s
        compute = active * self.expert_compute_s
        if not self.overlap:
            return float(compute.sum() + (misses + prefetched).sum() * transfer)
        ahead = np.append(prefetched[1:], 0) * transfer  # the next token-layer's prefetch, under this compute
        first = prefetched[0] * transfer if len(prefetched) else 0.0
        return float(misses.sum() * transfer + np.maximum(compute, ahead).sum() + first)


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class CacheResult:
    """What `simulate` measured. Per-layer arrays have one entry per layer (NaN hit rate where a layer has no
    accesses). `prefetch_hits` are hits on an expert a prefetch loaded and nothing used since; `transfers` are
    experts moved into the cache (misses + prefetch loads); bytes and seconds need a cost model."""

    policy: str
    capacity: int | tuple[int, ...]
    shared: bool
    hits: int
    misses: int
    hit_rate: float
    layer_hits: np.ndarray
    layer_misses: np.ndarray
    layer_hit_rate: np.ndarray
    prefetch_loads: int
    prefetch_hits: int
    transfers: int
    bytes_moved: float | None
    seconds: float | None


@dataclass(frozen=True)
class HitRateCurve:
    """Hit rate against cache size: `capacities` (slots per layer, or in total when shared), `hit_rate` overall
    per size, `layer_hit_rate` (layers, sizes); `in_active` is each size in units of the trace's k."""

    policy: str
    shared: bool
    capacities: np.ndarray
    in_active: np.ndarray
    hit_rate: np.ndarray
    layer_hit_rate: np.ndarray


# --------------------------------------------------------------------------------------------- the trace
def _as_array(values, what: str, dtype=None) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 3:
        raise ParameterError(f"{what} must have shape (tokens, layers, k), got shape {array.shape}")
    if dtype is int:
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ParameterError(f"{what} must hold integer expert ids (-1 where missing), got dtype {array.dtype}")
        if array.size and array.min() < -1:
            raise ParameterError(f"{what} holds ids below -1 (min {array.min()}); allowed: -1 or an expert id")
        return array.astype(np.int64)
    return array.astype(np.float64)


def _trace(experts) -> np.ndarray:
    trace = _as_array(experts, "experts", int)
    ordered = np.sort(trace, axis=2)
    repeated = (ordered[:, :, 1:] == ordered[:, :, :-1]) & (ordered[:, :, 1:] >= 0)
    if repeated.any():
        token, layer, _ = np.argwhere(repeated)[0]
        raise ParameterError(f"experts repeats an expert within token {token}, layer {layer}: "
                             f"{trace[token, layer].tolist()}; each expert may appear once per token-layer")
    return trace


def _needed(trace: np.ndarray) -> np.ndarray:
    """Per layer, the most experts one token-layer uses there: the smallest cache that can serve it."""
    return (trace >= 0).sum(axis=2).max(axis=0) if trace.shape[0] else np.zeros(trace.shape[1], np.int64)


def _check_capacity(capacity: int | Sequence[int], need: np.ndarray, shared: bool) -> None:
    if shared:
        minimum = int(need.max()) if need.size else 0
        if capacity < max(minimum, 1):
            raise ParameterError(f"shared capacity={capacity} is below the {minimum} experts a token-layer uses at "
                                 f"once; allowed: capacity >= {max(minimum, 1)}")
        return
    for layer, (slots, minimum) in enumerate(zip(capacity, need)):
        if minimum and slots < minimum:
            raise ParameterError(f"capacity {slots} at layer {layer} is below the {minimum} experts a token-layer "
                                 f"uses at once there; allowed: capacity >= {minimum} per layer")


def _resolve_capacity(capacity, capacity_in_active, trace: np.ndarray, shared: bool):
    """An int (shared) or a tuple of slots per layer, from the several ways a capacity can be given."""
    layers, k = trace.shape[1], trace.shape[2]
    need = _needed(trace)
    moe_layers = int((need > 0).sum())
    if (capacity is None) == (capacity_in_active is None):
        raise ParameterError("give exactly one of capacity (slots) and capacity_in_active (multiples of k)")
    if capacity_in_active is not None:
        if not capacity_in_active > 0:
            raise ParameterError(f"capacity_in_active must be > 0, got {capacity_in_active!r}")
        # a * k slots per layer, rounded down; shared: a * k per MoE layer in total
        per_layer = int(math.floor(capacity_in_active * k + 1e-9))
        capacity = per_layer * max(moe_layers, 1) if shared else per_layer
    if isinstance(capacity, FateAllocation):
        if shared:
            raise ParameterError("FateAllocation splits a budget across per-layer caches; use shared=False")
        num_experts = int(trace.max()) + 1 if trace.size else 0
        slots = iter(capacity.split(moe_layers, num_experts, k))
        capacity = tuple(next(slots) if need[layer] else 0 for layer in range(layers))
    elif shared:
        if not isinstance(capacity, (int, np.integer)) or isinstance(capacity, bool):
            raise ParameterError(f"a shared cache needs one int capacity, got {capacity!r}")
        capacity = int(capacity)
    elif isinstance(capacity, (int, np.integer)) and not isinstance(capacity, bool):
        capacity = (int(capacity),) * layers
    else:
        capacity = tuple(int(c) for c in capacity)
        if len(capacity) != layers:
            raise ParameterError(f"capacity lists {len(capacity)} layers; the trace has {layers}")
    _check_capacity(capacity, need, shared)
    return capacity


def _groups(trace: np.ndarray, shared: bool, num_experts: int) -> list[tuple]:
    """Keys of each token-layer in serving order (token-major), -1 dropped; shared keys are layer*E + expert."""
    tokens, layers, _ = trace.shape
    keyed = trace + (np.arange(layers)[None, :, None] * num_experts if shared else 0)
    keyed = np.where(trace >= 0, keyed, -1).reshape(tokens * layers, -1)
    groups = [tuple(row) for row in keyed.tolist()]
    for index in np.flatnonzero((keyed < 0).any(axis=1)).tolist():  # only rows with gaps need filtering
        groups[index] = tuple(key for key in groups[index] if key >= 0)
    return groups


@contextmanager
def _collector_paused():
    """The simulator makes ~10^5 small tuples and no reference cycles; the cyclic collector's passes over them
    cost about as much as the simulation itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _make_policy(policy, capacity: int, options: dict) -> Policy:
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise UnknownComponentError(f"unknown cache policy '{policy}'; available: {', '.join(POLICIES)}")
        policy = POLICIES[policy]
    if not (isinstance(policy, type) and issubclass(policy, Policy)):
        raise ParameterError(f"policy must be a name ({', '.join(POLICIES)}) or a Policy subclass, got {policy!r}")
    try:
        return policy(capacity, **options)
    except TypeError as error:
        raise ParameterError(f"bad options {sorted(options)} for policy '{policy.name}': {error}") from None


# --------------------------------------------------------------------------------------------- simulate
def simulate(experts, policy: str | type[Policy] = "lru",
             capacity: int | Sequence[int] | FateAllocation | None = None, *,
             capacity_in_active: float | None = None, shared: bool = False, scores=None, prefetch=None,
             cost: CostModel | None = None, **options) -> CacheResult:
    """Serve a routing trace from an expert cache and count hits, misses and transfers.

    `capacity`: slots per layer (an int, a list per layer, or a `FateAllocation`), or in total with `shared=True`;
    or `capacity_in_active=a`: floor(a * k) slots per layer (shared: that times the number of MoE layers).
    `policy`: a name in `POLICIES` or a Policy subclass; `options` go to its constructor (e.g. `decay=` for
    "score", `remember=` for "lfu"). `scores`: routing weights, used by "score" (1 per use when absent).

    `prefetch`: an int array (tokens, layers, m), -1 padded, of experts predicted for each token-layer. Before a
    token-layer is served, each predicted expert not in the cache is loaded (a transfer, counted in bytes moved);
    the predicted experts of one token-layer are pinned against each other while they load, and already cached
    ones are left untouched. A later hit on a prefetched expert that nothing used since is a prefetch hit.
    """
    with _collector_paused():
        return _simulate(experts, policy, capacity, capacity_in_active, shared, scores, prefetch, cost, options)


def _simulate(experts, policy, capacity, capacity_in_active, shared, scores, prefetch, cost, options) -> CacheResult:
    trace = _trace(experts)
    tokens, layers, k = trace.shape
    capacity = _resolve_capacity(capacity, capacity_in_active, trace, shared)
    num_experts = int(trace.max()) + 1 if trace.size else 0

    predicted = None
    if prefetch is not None:
        predicted = _as_array(prefetch, "prefetch", int)
        if predicted.shape[:2] != (tokens, layers):
            raise ParameterError(f"prefetch has shape {predicted.shape}; it needs (tokens, layers, m) = "
                                 f"({tokens}, {layers}, m) like experts")
        num_experts = max(num_experts, int(predicted.max()) + 1 if predicted.size else 0)
        most = (predicted >= 0).sum(axis=2).max(axis=0) if tokens else np.zeros(layers, np.int64)
        for layer in range(layers):
            slots = capacity if shared else capacity[layer]
            if most[layer] > slots:
                raise ParameterError(f"prefetch predicts {most[layer]} experts for one token-layer at layer {layer}, "
                                     f"more than its cache of {slots} slots; allowed: at most {slots}")
    groups = _groups(trace, shared, num_experts)
    predicted_groups = _groups(predicted, shared, num_experts) if predicted is not None else None
    if scores is not None:
        weights = _as_array(scores, "scores")
        if weights.shape != trace.shape:
            raise ParameterError(f"scores has shape {weights.shape}; it must match experts {trace.shape}")
        weights = [tuple(w for w, e in zip(ws, es) if e >= 0)
                   for ws, es in zip(weights.reshape(tokens * layers, k).tolist(),
                                     trace.reshape(tokens * layers, k).tolist())]
    else:
        weights = [(1.0,) * k] * (tokens * layers)  # no scores: every use weighs 1

    # One stream per cache: the token-layers it serves, in order (all of them when shared, one layer's otherwise).
    times = (np.arange(tokens)[:, None] + np.arange(layers)[None, :] / layers).reshape(-1).tolist()
    if shared:
        streams = [(_make_policy(policy, capacity, options), range(tokens * layers))]
    else:
        streams = [(_make_policy(policy, max(c, 1), options), range(l, tokens * layers, layers))
                   for l, c in enumerate(capacity)]

    misses = [0] * (tokens * layers)
    loads = [0] * (tokens * layers)
    fresh: set = set()  # prefetched and not used since
    prefetch_hits = 0
    for cache, indices in streams:
        if cache.offline:
            cache.prepare((times[i], groups[i]) for i in indices)
        resident, hit, insert = cache.resident, cache.hit, cache.insert  # bound once: this loop is the hot path
        for index in indices:
            keys = groups[index]
            if not keys:
                continue
            time = times[index]
            if predicted_groups is not None:
                loaded: list = []
                for key in predicted_groups[index]:
                    if key not in resident:
                        fresh.discard(cache.load(key, time, loaded))
                        loaded.append(key)
                fresh.update(loaded)
                loads[index] = len(loaded)
            missed = 0
            for key, score in zip(keys, weights[index]):
                if key in resident:
                    hit(key, time, score)
                    if fresh and key in fresh:
                        fresh.discard(key)
                        prefetch_hits += 1
                else:
                    missed += 1
                    victim = insert(key, time, score, keys)
                    if fresh and victim is not None:
                        fresh.discard(victim)
            misses[index] = missed

    active = (trace >= 0).sum(axis=2)
    misses, loads = np.array(misses, np.int64), np.array(loads, np.int64)
    layer_uses_a = active.sum(axis=0)
    layer_misses = misses.reshape(tokens, layers).sum(axis=0)
    layer_hits_a = layer_uses_a - layer_misses
    hits_total, uses_total = int(layer_hits_a.sum()), int(layer_uses_a.sum())
    transfers = int(misses.sum() + loads.sum())
    seconds = bytes_moved = None
    if cost is not None:
        active = active.reshape(-1)
        served = active > 0
        seconds = cost.seconds(active[served], misses[served], loads[served])
        bytes_moved = transfers * cost.expert_bytes
    with np.errstate(invalid="ignore", divide="ignore"):
        layer_rate = np.where(layer_uses_a > 0, layer_hits_a / np.maximum(layer_uses_a, 1), np.nan)
    return CacheResult(
        policy=policy if isinstance(policy, str) else policy.name, capacity=capacity, shared=shared,
        hits=hits_total, misses=uses_total - hits_total,
        hit_rate=hits_total / uses_total if uses_total else math.nan,
        layer_hits=layer_hits_a, layer_misses=layer_uses_a - layer_hits_a, layer_hit_rate=layer_rate,
        prefetch_loads=int(loads.sum()), prefetch_hits=prefetch_hits, transfers=transfers,
        bytes_moved=bytes_moved, seconds=seconds)


# --------------------------------------------------------------------------------------------- hit-rate curves
def _lru_stack_distances(groups: list[tuple], layers: int, shared: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mattson et al. (1970) stack distances under LRU, one pass: for each access, its depth in the LRU stack
    before its token-layer (-1 for a first use). A cache of C slots hits exactly the accesses of depth < C: after
    a token-layer its experts sit on top of the stack in slot order (the last slot most recent), as `LRU` leaves
    them, and pinning never matters once C >= k. Returns (depths, layer of each access)."""
    stacks = [[] for _ in range(1 if shared else layers)]  # most recent first
    depths, owners = [], []
    for index, keys in enumerate(groups):
        if not keys:
            continue
        layer = index % layers
        stack = stacks[0 if shared else layer]
        for key in keys:
            try:
                depths.append(stack.index(key))
            except ValueError:
                depths.append(-1)
            owners.append(layer)
        for key, depth in zip(keys, depths[-len(keys):]):
            if depth >= 0:
                stack.remove(key)
        stack[0:0] = keys[::-1]
    return np.array(depths, np.int64), np.array(owners, np.int64)


def hit_rates(experts, capacities: Sequence[int] | None = None, *, capacity_in_active: Sequence[float] | None = None,
              policy: str | type[Policy] = "lru", shared: bool = False, scores=None, **options) -> HitRateCurve:
    """Hit rate against cache size, in slots (`capacities`) or in units of active experts (`capacity_in_active`,
    floor(a * k) slots per layer; shared: times the MoE layers). LRU, a stack algorithm, gets every size from one
    pass of Mattson's stack-distance algorithm; every other policy (Belady included: its OPT stack algorithm does
    not carry over simply to pinned token-layers) is simulated once per size."""
    trace = _trace(experts)
    tokens, layers, k = trace.shape
    if (capacities is None) == (capacity_in_active is None):
        raise ParameterError("give exactly one of capacities (slots) and capacity_in_active (multiples of k)")
    if capacities is not None and not all(isinstance(c, (int, np.integer)) for c in capacities):
        raise ParameterError(f"capacities must be ints (slots per layer, or in total when shared), got {capacities!r}")
    sizes = [_resolve_capacity(None, a, trace, shared) for a in capacity_in_active] if capacities is None else [
        _resolve_capacity(int(c), None, trace, shared) for c in capacities]
    slots = np.array([s if shared else s[0] for s in sizes], np.int64)
    moe_layers = max(int((_needed(trace) > 0).sum()), 1)
    in_active = slots / (k * (moe_layers if shared else 1))

    uses = (trace >= 0).sum(axis=(0, 2))
    layer_hits = np.zeros((layers, len(sizes)), np.int64)
    if policy == "lru" or policy is LRU:
        if options:
            raise ParameterError(f"policy 'lru' takes no options, got {sorted(options)}")
        num_experts = int(trace.max()) + 1 if trace.size else 0
        with _collector_paused():
            depths, owners = _lru_stack_distances(_groups(trace, shared, num_experts), layers, shared)
        for layer in range(layers):
            mine = np.sort(depths[(owners == layer) & (depths >= 0)])
            layer_hits[layer] = np.searchsorted(mine, slots, side="left")  # depths < C
    else:
        for column, size in enumerate(sizes):
            result = simulate(trace, policy, size, shared=shared, scores=scores, **options)
            layer_hits[:, column] = result.layer_hits
    total = uses.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        layer_rate = np.where(uses[:, None] > 0, layer_hits / np.maximum(uses[:, None], 1), np.nan)
        overall = layer_hits.sum(axis=0) / total if total else np.full(len(sizes), np.nan)
    return HitRateCurve(policy=policy if isinstance(policy, str) else policy.name, shared=shared, capacities=slots,
                        in_active=in_active, hit_rate=overall, layer_hit_rate=layer_rate)
