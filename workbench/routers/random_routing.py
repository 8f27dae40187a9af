"""`random`: each token goes to k experts drawn uniformly (a baseline for any routing study)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.registry import param
from workbench.routers.base import Router, RouterCall, Routing


@dataclass
class RandomRouting(Router):
    """Random routing: k distinct experts per token, uniformly at random, weighted by the model's own rule
    (their router probabilities, renormalised for Mixtral-like families). The run's draws come from one seeded
    generator kept in the session's router state, so a run is reproducible."""

    name = "random"
    summary = "Route each token to k experts drawn uniformly at random (a baseline)."
    paper = None

    k: int | None = param(None, "experts per token (None: the model's top_k)", min=1)
    seed: int = param(0, "seed of the run's draws")

    def route(self, call: RouterCall) -> Routing:
        generator = call.state.get("random_generator")
        if generator is None:
            generator = call.state["random_generator"] = torch.Generator().manual_seed(self.seed)
        k = min(self.k or call.top_k, call.num_experts)
        draws = torch.rand(call.hidden.shape[0], call.num_experts, generator=generator)
        return call.choose(draws.topk(k, dim=-1).indices)
