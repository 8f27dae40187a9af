"""`lazy_eviction`: keep the tokens whose attention keeps coming back; evict lazily, by recurrence intervals.

While decoding, per KV head and token, the cache tracks when the token last *recurred* (received significant
attention: more than `threshold` x the step's mean attention over what the head holds, from the query heads of
its group) and its maximum recurrence interval (MRI): the longest gap seen between consecutive recurrences. A
token's first occurrence is when it entered the cache (the prefill for prompt tokens). Time is the position of
the current query, one step per generated token.

Every `every` steps (the observation window of lagged eviction), a head holding more than `budget` tokens keeps
its sinks, its last `window` tokens and the best of the rest by this MRI-centric rule, with idle = steps since
the last recurrence:
  * overdue tokens (idle > MRI: quiet for longer than they ever were, or never recurred) go first, the most
    overdue first;
  * among the others, the token whose next recurrence is predicted furthest away (last + MRI) goes first.

Our reading of the paper (arXiv 2506.15969; the abstract leaves the details open): significance by a mean
threshold rather than a top-k; the entry into the cache counts as the first occurrence; among tokens that are
not overdue we evict the latest predicted recurrence first (Belady-style). The prompt is not compressed: the
first eviction waits for `every` decoding steps of observation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from workbench.cache.eviction import EvictionPolicy
from workbench.registry import param


@dataclass
class LazyEviction(EvictionPolicy):
    name = "lazy_eviction"
    summary = ("Track when each token's attention recurs and its maximum recurrence interval; every few steps "
               "evict overdue tokens first (quiet longer than their MRI), then the furthest predicted recurrence.")
    paper = ("LazyEviction: Lagged KV Eviction with Attention Pattern Observation for Efficient Long Reasoning "
             "(Zhang et al., arXiv 2506.15969, 2025)")
    departs = ("our reading of the abstract: significance by a mean threshold, entry into the cache as the "
                     "first occurrence, the latest predicted recurrence evicted first")

    window: int = param(16, "most recent tokens always kept", min=0)
    every: int = param(8, "observation window: evict every this many decoding steps (the cache may exceed the "
                          "budget between)", min=1)
    threshold: float = param(1.0, "a token recurs when it gets more than threshold x the step's mean attention",
                             min=0.0)
    compress: str = param("decode", "LazyEviction evicts while decoding, after observing", choices=("decode",))

    needs: ClassVar[frozenset[str]] = frozenset({"key_mass"})

    def observe(self, layer, call, result) -> None:
        now = layer.newest(call)  # the position of the latest query
        valid = layer.valid(call)
        last = layer.extra("last_recurrence", -1, torch.long)  # per slot: when it last recurred
        mri = layer.extra("max_interval", 0, torch.long)  # per slot: its maximum recurrence interval
        last.masked_fill_(valid & (last < 0), now)  # entering the cache is the first occurrence
        if call.decoding:
            mass = result.key_mass[0].float()  # (kv_heads, slots): this step's attention per token
            held = torch.tensor(layer.held_at(call), device=mass.device).clamp_min(1)
            recurs = valid & (mass > self.threshold * (mass.sum(-1) / held)[:, None])
            mri.copy_(torch.where(recurs, torch.maximum(mri, now - last), mri))
            last.masked_fill_(recurs, now)

    def score(self, layer, call, result) -> torch.Tensor:
        now = layer.newest(call)
        idle = now - layer.extra("last_recurrence", -1, torch.long)
        mri = layer.extra("max_interval", 0, torch.long)
        overdue = idle > mri
        # not overdue: in [-MRI, 0], higher for a sooner predicted recurrence; overdue: below -(now + 1)
        return torch.where(overdue, -(now + 1) - (idle - mri), idle - mri).float()
