"""Local routing consistency of a routing trace: SRP and SCH, from Liang et al., "Not All Models Suit Expert
Offloading: On Local Routing Consistency of Mixture-of-Expert Models" (arXiv 2505.16056, ICLR 2026), following
their reference code (github.com/ljcleo/moe-lrc, src/30_srp_calc.py + 31_srp_refine.py for SRP,
src/41_sch_calc.py for SCH). The paper's segment lengths are 4, 16, 64 and 256.

`experts` is a trace as in `workbench.routers.expert_cache`: integer (tokens, layers, k), -1 where missing, tokens
in order. Both metrics are per layer (NaN for a layer with no experts) and pure functions of the trace.
"""

from __future__ import annotations

import math

import numpy as np

from workbench.errors import ParameterError
from workbench.routers.expert_cache import _resolve_capacity, _trace

__all__ = ["PAPER_LENGTHS", "segment_routing_performance", "segment_cache_hit_rate", "srp", "sch"]

PAPER_LENGTHS = (4, 16, 64, 256)


def _check_length(length: int, tokens: int) -> None:
    if not isinstance(length, (int, np.integer)) or length < 1:
        raise ParameterError(f"segment length must be an int >= 1, got {length!r}")
    if length > tokens:
        raise ParameterError(f"segment length {length} exceeds the trace's {tokens} tokens; allowed: 1..{tokens}")


def segment_routing_performance(experts, length: int, *, stride: int = 1, num_experts: int | None = None
                                ) -> np.ndarray:
    """SRP per layer: how well a segment router, which picks one fixed expert set for all `length` tokens of a
    segment, can reproduce the token router's choices; the best F1 it can reach.

    As in the paper (Sec. 2.2, App. C) and its code: segments start at every position (`stride=1`; `stride=length`
    gives disjoint segments). The best segment router activates expert e on a segment exactly when e is used by at
    least alpha of the segment's tokens; one threshold alpha in 0..length is shared by the layer's experts, and the
    F1 is pooled over all (segment, token, expert) decisions: F1 = 2 TP / (predicted + actual), maximised over
    alpha. SRP = 1 when every segment's tokens all use the same experts.

    Departs: no bootstrap confidence interval (the reference resamples sequences), and one trace is one sequence.
    `num_experts` (default: the largest id + 1) matters only to alpha = 0, where every expert is predicted.
    """
    trace = _trace(experts)
    tokens, layers, _ = trace.shape
    _check_length(length, tokens)
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ParameterError(f"stride must be an int >= 1, got {stride!r}")
    num_experts = num_experts if num_experts is not None else int(trace.max()) + 1
    if trace.size and trace.max() >= num_experts:
        raise ParameterError(f"num_experts={num_experts} but the trace uses expert {int(trace.max())}")
    starts = np.arange(0, tokens - length + 1, stride)
    result = np.full(layers, np.nan)
    for layer in range(layers):
        used = np.zeros((tokens, num_experts + 1), np.int64)  # last column collects the -1 padding
        np.add.at(used, (np.repeat(np.arange(tokens), trace.shape[2]), trace[:, layer].reshape(-1)), 1)
        used = used[:, :num_experts]
        if not used.any():
            continue
        running = np.vstack([np.zeros((1, num_experts), np.int64), used.cumsum(axis=0)])
        count = running[starts + length] - running[starts]  # (segments, experts): f, tokens using e
        histogram = np.bincount(count.reshape(-1), minlength=length + 1)  # (segment, expert) pairs per f
        f = np.arange(length + 1)
        true_positive = np.cumsum((f * histogram)[::-1])[::-1]  # predict where f >= alpha: the f uses are right
        predicted = np.cumsum(histogram[::-1])[::-1] * length  # ... and all `length` tokens are predicted
        actual = true_positive[0]
        result[layer] = float(np.max(2 * true_positive / (predicted + actual)))
    return result


def segment_cache_hit_rate(experts, length: int, capacity: int | None = None, *,
                           capacity_in_active: float | None = None, pin: bool = True) -> np.ndarray:
    """SCH per layer: the hit rate of an oracle cache that, when it must make room, evicts the experts used least
    in the next `length` tokens (counting the current one, so length 1 is LRU); ties go to the least recently used.

    As in the paper (Sec. 2.3) and its code: for each token the cache loads the experts it lacks, evicting as many
    unused ones; an expert loaded into a free slot counts as a hit (the oracle preloads; only a full cache misses).
    `capacity` is in slots per layer, or `capacity_in_active` in multiples of k (the paper's cache ratio rho).

    `pin=True` (default) evicts only experts the current token does not use, as the paper's text says. The
    reference code's one-pass stack update differs when k > 1: it judges a token's hits on the cache as the token
    arrives, then loads its experts one by one, and each load may evict any cached expert, the token's own
    included. `pin=False` reproduces that (checked against the reference's `calc_fsf` on random traces); with
    k = 1 the two agree. Departs: no bootstrap confidence interval; one trace is one sequence.
    """
    trace = _trace(experts)
    tokens, layers, k = trace.shape
    _check_length(length, tokens)
    slots = _resolve_capacity(capacity, capacity_in_active, trace, shared=False)
    num_experts = int(trace.max()) + 1 if trace.size else 0
    rows = trace.tolist()
    result = np.full(layers, np.nan)
    for layer in range(layers):
        used = [[e for e in rows[t][layer] if e >= 0] for t in range(tokens)]
        uses = sum(map(len, used))
        if uses:
            result[layer] = _segment_cache_hits(used, num_experts, length, slots[layer], pin) / uses
    return result


def _segment_cache_hits(used: list[list[int]], num_experts: int, length: int, capacity: int, pin: bool) -> int:
    upcoming = np.zeros(num_experts, np.int64)  # uses in tokens [t, t + length)
    for token in used[:length]:
        upcoming[token] += 1
    last_use = np.full(num_experts, -1.0)
    cached = np.zeros(num_experts, bool)
    size = hits = clock = 0
    scale = sum(map(len, used)) + 2.0  # above any last_use, so one number ranks (upcoming, last_use)
    for t, token in enumerate(used):
        held = cached.copy()  # the cache as the token arrives decides its hits
        for expert in token:
            if held[expert]:
                hits += 1
            elif size < capacity:  # a free slot: preloaded, a hit (nothing was evicted yet, so a first use)
                hits += 1
                size += 1
                cached[expert] = True
            if not cached[expert]:  # load it, evicting the fewest uses ahead, then the least recent
                unused = cached.copy()
                if pin:
                    unused[token] = False
                rank = np.where(unused, upcoming * scale + last_use, math.inf)
                cached[int(rank.argmin())] = False
                cached[expert] = True
            clock += 1
            last_use[expert] = clock  # slot order breaks ties within a token, as the reference's timestamps do
            upcoming[expert] -= 1
        if t + length < len(used):
            upcoming[used[t + length]] += 1
    return hits


srp = segment_routing_performance
sch = segment_cache_hit_rate
