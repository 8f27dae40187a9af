"""`cache_aware`: prefer experts a small expert cache already holds (cache-conditional routing)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.errors import ParameterError
from workbench.registry import param
from workbench.routers.cache_policies import LRU
from workbench.routers.base import Router, RouterCall, Routing


@dataclass
class CacheAware(Router):
    """Cache-aware routing, the paper's "max rank" strategy: a simulated LRU cache of `capacity` experts per layer
    (the experts a memory-limited device holds) is kept in the run's router state; each token's k experts are
    chosen among its `max_rank` best-ranked ones, cached experts first (in rank order), then the best uncached,
    and the chosen experts enter the cache. `max_rank = k` is the native routing with a cache beside it; larger
    values trade quality (`record="fidelity"`: KL against native routing) for hits. Departure: the paper also
    proposes a cumulative-probability variant and a logit prior ("Cache-Prior"); only max rank is here.

    The simulated cache follows every pass the model runs, verify and look-ahead passes included, and a session's
    rollback leaves it as it is: the experts a rejected draft token used were loaded all the same, as they would
    be in a real expert cache."""

    name = "cache_aware"
    summary = "Choose each token's experts among its best-ranked ones, preferring those a simulated cache holds."
    paper = "Mixture of Cache-Conditional Experts for Efficient Mobile Device Inference (Skliar et al., 2024)"
    departs = "the max-rank strategy only; the simulated cache is LRU per layer"

    capacity: int = param(4, "experts the simulated cache holds per layer", min=1)
    max_rank: int = param(4, "a token's experts come from its best `max_rank` (>= the model's top_k)", min=1)

    def route(self, call: RouterCall) -> Routing:
        k = call.top_k
        if self.capacity < k or self.max_rank < k:
            raise ParameterError(f"cache_aware needs capacity and max_rank >= the model's top_k ({k}); got "
                                 f"capacity={self.capacity}, max_rank={self.max_rank}")
        caches = call.state.setdefault("expert_cache", {})
        cache = caches.setdefault(call.layer, LRU(self.capacity))  # the simulator's LRU, one per layer
        ranked = call.native.logits.float().topk(min(self.max_rank, call.num_experts), dim=-1).indices.tolist()
        chosen = []
        for candidates in ranked:  # tokens in order: each one's choice updates the cache the next one sees
            cached = [e for e in candidates if e in cache]
            picks = sorted((cached + [e for e in candidates if e not in cache])[:k], key=candidates.index)
            for expert in picks:
                if expert in cache:
                    cache.hit(expert, 0.0, 0.0)
                else:
                    cache.insert(expert, 0.0, 0.0, pinned=picks)
            chosen.append(picks)
        return call.choose(torch.tensor(chosen))
