"""`d2o`: per-layer budgets from attention density, and similarity-gated merging of evicted tokens.

Dynamic Discriminative Operations decide at two levels:

- layer level: at the prefill, each layer's attention density is measured as the normalised entropy of the
  prompt's last `window` query rows (entropy / log(keys visible), averaged over rows and heads: 1 for uniform
  attention, 0 for attention on one token). Layers with denser attention keep more:
      budget_l = round(budget * L * density_l / Σ_j density_j), at least sinks + window
  (uniform when the prompt fits the budget). As in D2O's code, layers 0, 1 and the last are never compressed
  (`full_layers`), and the cache is first compressed at the first decoding step (compress="decode"), when every
  layer's density is known.
- token level: what is evicted is chosen as in H2O (accumulated attention received, plus sinks and a recent
  window). Each evicted token e finds the kept token c with the most similar key, u = cos(k_e, k_c). It is merged
  when u >= the threshold tau, else dropped; tau is an exponential moving average, per layer and KV head, of the
  mean best similarity of the tokens evicted at each eviction, averaged over the layer's KV heads (one threshold
  per layer, as D2O's code gates merges by the head mean; tau <- beta tau + (1 - beta) mean u with beta = 0.5,
  starting at the first mean), unless a fixed `threshold` is given. A kept token c absorbing the set E_c is updated as
      k_c <- (e k_c + Σ_{e in E_c} exp(u_e) k_e) / (e + Σ exp(u_e))    (e = exp(1): c's similarity to itself)
  and likewise for its value.

Simplified against the paper: the density is a normalised entropy (the paper measures the variance of attention
weights per layer) and the allocation is a plain proportional share; merge decisions are final at eviction time
(the paper can still recall recently discarded tokens); merged tokens keep their own accumulated score.

Inside a verify or rollout pass (see workbench.cache.kvcache) this policy evicts once, at commit: its merges change
kept keys and values and cannot be tentative, so the pass's rows see the cache as it was before the pass's own
evictions, and commit observes the accepted rows and evicts once. tests/test_transactions.py measures the KL this
costs against feeding the same tokens one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.attention import reference
from workbench.cache.eviction import PHASES
from workbench.cache.h2o import H2O
from workbench.registry import param


@dataclass
class D2O(H2O):
    name = "d2o"
    summary = ("Layers with denser attention keep more tokens; evicted tokens (H2O scores) are merged into their "
               "most similar kept token when the key similarity clears an EMA threshold.")
    paper = ("D2O: Dynamic Discriminative Operations for Efficient Generative Inference of Large Language Models "
             "(Wan et al., arXiv 2024)")
    departs = ("density is a normalised entropy and the allocation a plain proportional share; merge decisions are "
               "final; one merge threshold per layer (our reading of the code's head mean); inside a verify or "
               "rollout pass it evicts once, at commit (merges cannot be tentative)")

    window: int = param(32, "most recent tokens always kept (and the rows that measure the density)", min=0)
    compress: str = param("decode", "when to evict (D2O: from the first decoding step on)", choices=PHASES)
    full_layers: str = param("0,1,-1", "layers never compressed (D2O keeps layers 0, 1 and the last whole)")
    beta: float = param(0.5, "EMA weight of the past merge threshold (the rest: this eviction's mean similarity)",
                        min=0.0, max=1.0)
    threshold: float | None = param(None, "fixed merge threshold on key cosine similarity; None: the EMA (as D2O)",
                                    min=-1.0, max=1.0)

    tentative = False  # merges cannot be undone: inside a provisional pass it evicts at commit

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

    def evict(self, layer, call, result) -> None:
        """At the prefill, wait for the last layer, then give every layer its budget and compress them all."""
        if call.phase != "prefill":
            return super().evict(layer, call, result)
        cache = layer.cache
        densities = cache.state.setdefault("densities", [None] * cache.num_layers)
        densities[layer.index] = self.density(call)
        if layer.index < cache.num_layers - 1:
            return
        n = call.num_queries
        self.set_budgets(cache, self.allocate(self.base_budget(n), densities, n))
        if self.compress == "decode":
            return
        for each, budgets in zip(cache.layers, cache.state["budgets"]):
            if max(each.held) > budgets[0]:
                self.evict_to(each, call, result, budgets)

    merges = True

    def merge(self, layer, gone, going, alive, call) -> torch.Tensor:
        keys, positions = layer.held_keys().float(), layer.positions()
        unit = F.normalize(keys, dim=-1)
        gone_unit = unit.gather(1, gone[..., None].expand(-1, -1, unit.shape[-1]))
        similarity = (gone_unit @ unit.transpose(1, 2)).masked_fill(~(alive[:, None, :] & going[..., None]),
                                                                     float("-inf"))
        best, nearest = similarity.max(dim=-1)  # nearest: the most similar kept slot
        tau = self.threshold_now(layer, torch.where(going, best, 0.0), going)
        merged = going & (best >= tau[:, None])
        weights = torch.where(merged, best.exp(), 0.0)
        layer.merge(nearest, gone, weights, torch.full(positions.shape, math.e, device=keys.device))  # kept: e
        return torch.where(merged, positions.gather(1, nearest), -1)

    def threshold_now(self, layer, best: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """(kv_heads,) merge threshold, the same for every head of the layer: the fixed one, or the EMA of each
        eviction's mean best similarity (the mean over the heads that evict of each head's mean)."""
        if self.threshold is not None:
            return torch.full((best.shape[0],), self.threshold, device=best.device)
        count = dropped.sum(-1)
        evicting = count > 0
        if not evicting.any():
            return torch.full((best.shape[0],), float("nan"), device=best.device)
        current = (best.sum(-1)[evicting] / count[evicting]).mean()
        previous = layer.state.get("threshold")
        tau = current if previous is None else self.beta * previous + (1 - self.beta) * current
        layer.state["threshold"] = tau  # replaced, never changed in place (states are snapshotted shallowly)
        return tau.expand(best.shape[0])
