"""Routers: which parameters a token goes through (MoE expert choice, layer skipping).

transformers 5.x MoE blocks call their router, `(router_logits, top_k_weights, top_k_index) = mlp.gate(hidden)`
(GPT-OSS: `mlp.router`), then `mlp.experts(hidden, top_k_index, top_k_weights)`. workbench finds the routers by
their class (`find_routers`), and the router bridge (workbench.run.routing) hands every router call of a session's
pass to the session's Router component, which may return another choice (`route`), and to the observer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from workbench.registry import Component

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class Routing:
    """One router call's choice for n tokens: router logits (n, experts), and per token up to k chosen experts,
    `index` (n, k) with -1 where a token chose fewer (dynamic routers), `weights` (n, k) their mixing weights
    (0 where index is -1)."""

    logits: torch.Tensor
    weights: torch.Tensor
    index: torch.Tensor

    def as_output(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the MoE block expects back from its router: unused slots point at the token's first expert with
        weight 0 (experts implementations one-hot the index, so it must be a valid expert id)."""
        unused = self.index < 0
        index = torch.where(unused, self.index[:, :1].clamp_min(0), self.index)
        return self.logits, torch.where(unused, torch.zeros_like(self.weights), self.weights), index


@dataclass
class RouterCall:
    """A router's call in one layer: the model's router module (its `top_k`, `num_experts`), its input
    (n, hidden), the pass's phase, the model's own choice, and the next MoE layer's router."""

    layer: int
    module: torch.nn.Module
    hidden: torch.Tensor
    phase: str
    native: Routing
    state: dict  # the run's router state (a session's; components keep none of their own)
    following: tuple[int, torch.nn.Module] | None = None  # the next MoE layer and its router (Fate reads it)

    @property
    def num_experts(self) -> int:
        return int(self.native.logits.shape[-1])

    @property
    def top_k(self) -> int:
        """The model's number of active experts per token."""
        return int(self.module.top_k)

    def probabilities(self) -> torch.Tensor:
        """softmax(router logits) over all experts, (n, experts) float32: the distribution dynamic routers read
        (DeepSeek-V3 scores experts with sigmoids; its softmax is a stand-in with the same order)."""
        return torch.softmax(self.native.logits.float(), dim=-1)

    def choose(self, index: torch.Tensor) -> Routing:
        """A routing of these experts (index (n, k), -1 unused), weighted as the model weights its own choice: the
        model router's `weights_for(logits, index)` when it has one (MoEfied layers: 1 each), otherwise their
        router probabilities, renormalised over the chosen set when the model's own weights sum to 1 per token
        (the softmax top-k families: Mixtral, Qwen-MoE, OLMoE, GPT-OSS)."""
        index = index.to(self.native.index.device)
        if hasattr(self.module, "weights_for"):
            weights = self.module.weights_for(self.native.logits, index)
        else:
            weights = self.probabilities().gather(1, index.clamp_min(0)).masked_fill(index < 0, 0.0)
            if torch.allclose(self.native.weights.float().sum(-1), torch.ones(()), atol=1e-3):
                weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
        return Routing(self.native.logits, weights.to(self.native.weights.dtype), index)

    def rerun(self, **attributes) -> Routing:
        """The model's own router on the same input with some of its attributes changed for the call (e.g.
        `top_k=`): the family's exact scoring and weighting rules at another setting."""
        saved = {name: getattr(self.module, name) for name in attributes}
        try:
            for name, value in attributes.items():
                setattr(self.module, name, value)
            return Routing(*self.module.forward(self.hidden))  # forward, not __call__: no hooks again
        finally:
            for name, value in saved.items():
                setattr(self.module, name, value)


class Router(Component):
    """Base of routers. `route(call)` returns the routing to use instead of the model's (None: keep it).
    `needs_moe`: the router changes MoE routing, so a model without routers is an error.

    Layer routers (workbench.run.layers) choose decoder layers instead: `skipped_layers(state, phase, num_layers)`
    names the layers a pass skips, and `observe_layer(call, state)` sees each layer's input and output in the
    passes where `watches_layers(state, phase)`."""

    needs_moe = True
    routes_layers = False  # the session asks skipped_layers / watches_layers only when True

    def route(self, call: RouterCall) -> Routing | None:
        return None

    def skipped_layers(self, state: dict, phase: str, num_layers: int) -> frozenset[int]:
        return frozenset()

    def watches_layers(self, state: dict, phase: str) -> bool:
        return False

    def observe_layer(self, call, state: dict) -> None:
        """`call`: a workbench.run.layers.LayerCall."""


def is_router(module: torch.nn.Module) -> bool:
    """An MoE router: a module whose class is a router (transformers' `*TopKRouter` / `*TopkRouter`, workbench's
    MoefiedRouter) with the `top_k` and `num_experts` every such class has. Found by class, not by attribute name:
    Qwen2-MoE's `shared_expert_gate` is a Linear, not a router."""
    return type(module).__name__.lower().endswith("router") and hasattr(module, "top_k") and hasattr(
        module, "num_experts")


def find_routers(hf_model) -> dict[int, torch.nn.Module]:
    """The MoE routers of a model by decoder layer index; empty for dense models (and for dense layers of an MoE
    model, such as Qwen3-MoE's `mlp_only_layers`)."""
    found = {}
    for name, module in hf_model.named_modules():
        if is_router(module):
            match = _LAYER.search(name + ".")
            if match is None:
                continue  # a router outside the decoder layers: not a per-layer expert choice
            found[int(match.group(1))] = module
    return found

