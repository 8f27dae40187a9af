"""`top_p`: a dynamic number of experts per token, by cumulative router probability."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.registry import param
from workbench.routers.base import Router, RouterCall, Routing


@dataclass
class TopP(Router):
    """Top-p ("threshold") routing, as in Huang et al. 2024: experts are taken in order of router probability
    until their cumulative probability reaches `p`, so a confident router uses one expert and an unsure one uses
    several. Departures: the paper trains its router for this; here it runs on a model trained for top-k, and
    the weights follow the model's own rule (`RouterCall.choose`: renormalised for Mixtral-like families)."""

    name = "top_p"
    summary = "Route each token to the fewest experts whose router probabilities sum to at least p."
    paper = "Harder Tasks Need More Experts: Dynamic Routing in MoE Models (Huang et al., ACL 2024)"
    departs = "run on a model trained for top-k routing; weights follow the model's own weighting rule"

    p: float = param(0.5, "cumulative router probability to reach", min=0.0, max=1.0)
    max_k: int | None = param(None, "at most this many experts (None: the model's top_k)", min=1)

    def route(self, call: RouterCall) -> Routing:
        probs, order = call.probabilities().sort(dim=-1, descending=True)
        most = min(self.max_k or call.top_k, call.num_experts)
        before = probs.cumsum(-1) - probs  # probability mass of the experts ranked above each one
        take = before[:, :most] < self.p  # the first expert always: nothing is above it
        take[:, 0] = True
        return call.choose(torch.where(take, order[:, :most], -1))
