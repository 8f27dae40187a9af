"""`cake`: CAKE slices one cache budget over the layers by each layer's attention preference, in a cascade.

At the prefill, for each layer in turn, the last `window` prompt queries (the observation window) give:
  * the layer's preference P_l = H_l^(1/tau1) * V_l^(1/tau2), where H_l (spatial dispersion) is the entropy
    -sum p log p of the window's attention to the tokens before the window, and V_l (temporal shift) is the
    variance of that attention over the window's queries, summed over tokens (both summed over heads);
  * each token's eviction indicator: mean + gamma * variance of the attention it gets from the window's queries
    (per query head, averaged over `kernel` neighbours, then over the query heads of its KV group).
The whole cache, `budget` x layers tokens, holds every layer's sinks and window plus a pool that layers share in
proportion to P_l. Cascading: after layer l, the pool is re-sliced over layers 0..l and the layers already
compressed shrink to their new share (never grow), so the compressed layers never hold more than the whole
budget (a layer holds its full prompt only between its own attention and its compression).
Tokens with the lowest indicator go. Compression is at the prefill; with compress="both" a layer over its
budget while decoding evicts by the current query's (pooled) attention, as the authors' code does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.cache.eviction import EvictionPolicy
from workbench.cache.scoring import window_rows
from workbench.errors import ParameterError
from workbench.registry import param


@dataclass
class CAKE(EvictionPolicy):
    name = "cake"
    summary = ("Per-layer budgets from attention dispersion and shift, re-sliced layer by layer at the prefill "
               "(cascading); tokens kept by mean + gamma x variance of the window's attention.")
    paper = "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences (Qin et al., ICLR 2025)"

    budget: int = param(128, "average tokens kept per layer and KV head (the whole cache is budget x layers)", min=1)
    sinks: int = param(0, "first tokens always kept", min=0)
    window: int = param(32, "observation window: the last prompt tokens, which are measured and always kept",
                        min=2)
    tau1: float = param(1.0, "temperature of the dispersion (entropy) in the layer preference", min=1e-3)
    tau2: float = param(1.0, "temperature of the shift (variance) in the layer preference", min=1e-3)
    gamma: float = param(200.0, "weight of the attention's variance in the token eviction indicator", min=0.0)
    kernel: int = param(5, "average the indicator over this many neighbouring tokens (odd; 1: off)", min=1)
    compress: str = param("prefill", "CAKE allocates and evicts at the prefill; 'both' also evicts while decoding",
                          choices=("prefill", "both"))

    def validate(self) -> None:
        super().validate()
        if self.kernel % 2 == 0:
            raise ParameterError(f"cache 'cake' parameter 'kernel' is {self.kernel}; it must be odd")

    def layer_budgets(self, base: int, num_layers: int, prompt_length: int) -> list[int]:
        return [prompt_length] * num_layers  # every layer holds its prompt until the cascade slices the budget

    def score(self, layer, call, result) -> torch.Tensor:
        if call.phase == "prefill":  # the indicator measured over the observation window
            return layer.extra("indicator")
        probs = window_rows(call, 1)  # (heads, 1, keys)
        return _pool(probs[:, 0], self.kernel).view(-1, call.groups, probs.shape[-1]).mean(1)

    def evict(self, layer, call, result) -> None:
        if call.phase != "prefill":  # decoding (compress="both"): the base evicts to the final budgets
            return super().evict(layer, call, result)
        cache, n = layer.cache, call.num_queries
        base = self.base_budget(n)
        protected = self.sinks + self.window
        probs = window_rows(call, self.window)
        preferences = cache.state.get("preferences", [])[:layer.index] + [
            layer_preference(probs, self.window, self.tau1, self.tau2)]
        cache.state["preferences"] = preferences
        layer.extra("indicator")[:] = eviction_indicator(probs, call.groups, self.gamma, self.kernel)
        shares = allocate(max(0, base - protected) * cache.num_layers, preferences,
                          [max(0, n - protected)] * len(preferences))
        budgets = cache.state["budgets"]
        for index, share in enumerate(shares):  # the cascade: earlier layers shrink to their new share
            budget = min(budgets[index][0], protected + share)
            budgets[index] = [budget] * cache.num_kv_heads
            earlier = cache.layers[index]
            if max(earlier.held) > budget:
                self.evict_to(earlier, call, result, budgets[index])


def layer_preference(probs: torch.Tensor, window: int, tau1: float, tau2: float) -> float:
    """P = H^(1/tau1) * V^(1/tau2) from the window's attention rows (heads, rows, keys) to the tokens before it."""
    before = probs[..., :max(0, probs.shape[-1] - window)]
    if before.shape[-1] == 0 or probs.shape[1] < 2:
        return 0.0
    dispersion = float(torch.special.entr(before).sum())
    shift = float(before.var(dim=1).sum())
    return dispersion ** (1 / tau1) * shift ** (1 / tau2)


def eviction_indicator(probs: torch.Tensor, groups: int, gamma: float, kernel: int) -> torch.Tensor:
    """(kv_heads, keys): mean + gamma * variance over the window's rows, pooled, averaged over each KV group."""
    rows = probs.shape[1]
    indicator = probs.mean(1) + gamma * (probs.var(1) if rows > 1 else 0.0)
    return _pool(indicator, kernel).view(-1, groups, probs.shape[-1]).mean(1)


def allocate(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Split `total` slots in proportion to `weights`, none above its cap: what a cap cuts off goes to the others
    (as CAKE's budget adjustment does); the largest remainders get the slots rounding leaves over."""
    shares, open_, left = [0] * len(weights), list(range(len(weights))), total
    while open_ and left > 0:
        mass = sum(weights[i] for i in open_)
        exact = {i: left * (weights[i] / mass if mass > 0 else 1 / len(open_)) for i in open_}
        capped = [i for i in open_ if exact[i] >= caps[i]]
        if not capped:
            for i in open_:
                shares[i] = int(exact[i])
            spare = left - sum(shares[i] for i in open_)
            for i in sorted(open_, key=lambda i: shares[i] - exact[i])[:spare]:
                shares[i] += 1
            break
        for i in capped:
            shares[i], left = caps[i], left - caps[i]
            open_.remove(i)
    return shares


def _pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    if kernel <= 1:
        return scores
    return F.avg_pool1d(scores[:, None], kernel, stride=1, padding=kernel // 2, count_include_pad=False)[:, 0]
