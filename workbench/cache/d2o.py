"""`d2o`: per-layer budgets from attention density, and similarity-gated merging of evicted tokens.

Dynamic Discriminative Operations decide at two levels:

- layer level: at the prefill, each layer's attention density is measured as the normalised entropy of the
  prompt's last `window` query rows (entropy / log(keys visible), averaged over rows and heads: 1 for uniform
  attention, 0 for attention on one token). Layers with denser attention keep more:
      budget_l = round(budget * L * density_l / Σ_j density_j), at least sinks + window
  (uniform when the prompt fits the budget). So that every layer's density is known before any is compressed,
  prefill eviction waits for the last layer and then compresses all layers at once.
- token level: what is evicted is chosen as in H2O (accumulated attention received, plus sinks and a recent
  window). Each evicted token e finds the kept token c with the most similar key, u = cos(k_e, k_c). It is merged
  when u >= the threshold tau, else dropped; tau is an exponential moving average, per layer and KV head, of the
  mean best similarity of the tokens evicted at each eviction (tau <- beta tau + (1 - beta) mean u, starting at the
  first mean), unless a fixed `threshold` is given. A kept token c absorbing the set E_c is updated as
      k_c <- (e k_c + Σ_{e in E_c} exp(u_e) k_e) / (e + Σ exp(u_e))    (e = exp(1): c's similarity to itself)
  and likewise for its value.

Simplified against the paper: the density is a normalised entropy (the paper measures the variance of attention
weights per layer) and the allocation is a plain proportional share; merge decisions are final at eviction time
(the paper can still recall recently discarded tokens); merged tokens keep their own accumulated score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.attention import reference
from workbench.cache.eviction import EvictingCache, LayerState
from workbench.cache.h2o import H2O
from workbench.registry import param


@dataclass
class D2O(H2O):
    name = "d2o"
    summary = ("Layers with denser attention keep more tokens; evicted tokens (H2O scores) are merged into their "
               "most similar kept token when the key similarity clears an EMA threshold.")
    paper = ("D2O: Dynamic Discriminative Operations for Efficient Generative Inference of Large Language Models "
             "(Wan et al., arXiv 2024)")

    beta: float = param(0.7, "EMA weight of the past merge threshold (the rest: this eviction's mean similarity)",
                        min=0.0, max=1.0)
    threshold: float | None = param(None, "fixed merge threshold on key cosine similarity; None: the EMA (as D2O)",
                                    min=-1.0, max=1.0)

    def build(self, model) -> D2OCache:
        return D2OCache(model.config, self)

    def density(self, call) -> float:
        """Normalised entropy of the last `window` query rows (averaged over rows and heads), in [0, 1]."""
        q_len, k_len = call.query.shape[2], call.key.shape[2]
        rows = slice(max(0, q_len - max(1, self.window)), q_len)
        entropy = reference.row_entropy(torch.softmax(reference.scores(call, rows), dim=-1))[0]  # (heads, rows)
        visible = torch.arange(rows.start, q_len, device=entropy.device) + (k_len - q_len) + 1
        normalised = entropy / visible.clamp_min(2).float().log()
        return float(normalised.mean())

    def allocate(self, base: int, densities: list[float], prompt_length: int) -> list[int]:
        """Per-layer budgets: shares of `base * layers` in proportion to each layer's attention density."""
        total = sum(densities)
        if prompt_length <= base or total <= 0:
            return [base] * len(densities)
        floor = self.sinks + self.window
        return [max(floor, round(base * len(densities) * d / total)) for d in densities]

    def merge(self, state, head, keep, drop) -> torch.Tensor:
        layer = state.layer
        keys, values = layer.head_keys[head], layer.head_values[head]
        into = torch.full((drop.shape[0],), -1, dtype=torch.long, device=drop.device)
        if drop.numel() == 0 or keep.numel() == 0:
            return into
        k, v = keys.float(), values.float()
        unit = F.normalize(k, dim=-1)
        best, nearest = (unit[drop] @ unit[keep].T).max(dim=1)  # nearest: index into keep
        tau = self.threshold
        if tau is None:
            previous = state.thresholds[head]
            current = float(best.mean())
            tau = current if previous is None else self.beta * previous + (1 - self.beta) * current
            state.thresholds[head] = tau
        merged = best >= tau
        into[merged] = layer.head_positions[head][keep[nearest[merged]]]
        for c in nearest[merged].unique().tolist():
            members = merged & (nearest == c)
            slot = keep[c]
            weights = torch.cat([best.new_ones(1), best[members]]).exp()  # exp(1) for the kept token itself
            weights = weights / weights.sum()
            group = torch.cat([slot.view(1), drop[members]])
            keys[slot] = (weights @ k[group]).to(keys.dtype)
            values[slot] = (weights @ v[group]).to(values.dtype)
        return into


class D2OState(LayerState):
    def __init__(self, index, layer):
        super().__init__(index, layer)
        self.thresholds: list[float | None] = []  # per KV head: the EMA merge threshold
        self.density: float | None = None  # the layer's attention density at the prefill


class D2OCache(EvictingCache):
    """Defers prefill eviction to the last layer, so budgets can follow every layer's attention density."""

    def __init__(self, config, policy: D2O):
        super().__init__(config, policy)
        self.states = [D2OState(i, layer) for i, layer in enumerate(self.layers)]

    def after_attention(self, call, result) -> None:
        state = self.states[call.layer]
        if not state.thresholds:
            state.thresholds = [None] * state.layer.num_heads
        if self.budgets is not None or call.query.shape[2] == 1:
            return super().after_attention(call, result)
        policy = self.policy
        policy.observe(state, call, result)
        state.density = policy.density(call)
        if call.layer < self.num_layers - 1:
            return
        seen = state.layer.seen
        base = policy.budget if policy.ratio is None else max(1, math.ceil(policy.ratio * seen))
        self.budgets = policy.allocate(base, [s.density for s in self.states], prompt_length=seen)
        if policy.compress == "decode":
            return
        for layer_state, budget in zip(self.states, self.budgets):
            for head, held in enumerate(layer_state.layer.held()):
                if held > budget:
                    self._evict(layer_state, head, budget, call, result)
