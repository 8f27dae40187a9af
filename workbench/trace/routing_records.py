"""The recorder's routing part: each forward pass's router calls, layer by layer, turned into per-token rows.

A pass's rows are (tokens, layer, rank) arrays: the experts each token was sent to, highest router logit first,
with -1 (ids) and NaN (weights, entropy, logits) for layers without a router (dense layers of an MoE model) and
for ranks a token did not use (dynamic routers choose fewer experts for some tokens).
"""

from __future__ import annotations

import numpy as np
import torch


class RoutingRecords:
    def __init__(self, num_layers: int, logits: bool):
        self.num_layers = num_layers
        self.keep_logits = logits
        self.calls: dict[int, tuple[torch.Tensor, ...]] = {}  # layer -> this pass's (ids, weights, entropy, logits)
        self.fate: dict[int, torch.Tensor] = {}  # layer -> Fate's predicted experts for it, this pass
        self.num_experts = 0

    def observe(self, call, routing) -> None:
        logits = routing.logits.float()
        index = routing.index
        score = logits.gather(1, index.clamp_min(0)).masked_fill(index < 0, float("-inf"))
        order = score.argsort(dim=1, descending=True)  # best first, unused ranks (-1) last
        index = index.gather(1, order)
        weights = routing.weights.float().gather(1, order).masked_fill(index < 0, float("nan"))
        probs = torch.softmax(logits, dim=-1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        self.num_experts = max(self.num_experts, logits.shape[-1])
        self.calls[call.layer] = (index, weights, entropy, logits if self.keep_logits else None)
        if call.following is not None:  # Fate: this layer's router input through the next MoE layer's router
            layer, router = call.following
            self.fate[layer] = router.forward(call.hidden)[2]

    def end_forward(self) -> dict[str, np.ndarray] | None:
        """This pass's rows by variable (tokens first), or None when no router ran; clears the pass."""
        if not self.calls:
            return None
        calls, self.calls = self.calls, {}
        fate, self.fate = self.fate, {}
        tokens = next(iter(calls.values()))[0].shape[0]
        rank = max([c[0].shape[1] for c in calls.values()] + [index.shape[1] for index in fate.values()])
        ids = np.full((tokens, self.num_layers, rank), -1, dtype=np.int64)
        weights = np.full((tokens, self.num_layers, rank), np.nan, dtype=np.float32)
        entropy = np.full((tokens, self.num_layers), np.nan, dtype=np.float32)
        logits = np.full((tokens, self.num_layers, self.num_experts), np.nan, dtype=np.float32) \
            if self.keep_logits else None
        for layer, (index, weight, ent, logit) in calls.items():
            k = index.shape[1]
            ids[:, layer, :k] = index.cpu().numpy()
            weights[:, layer, :k] = weight.cpu().numpy()
            entropy[:, layer] = ent.cpu().numpy()
            if logits is not None:
                logits[:, layer, :logit.shape[-1]] = logit.cpu().numpy()
        predicted = np.full_like(ids, -1)
        for layer, index in fate.items():
            predicted[:, layer, :index.shape[1]] = index.cpu().numpy()
        rows = {"expert_ids": ids, "expert_weights": weights, "router_entropy": entropy, "fate_expert_ids": predicted}
        if logits is not None:
            rows["router_logits"] = logits
        return rows
