"""`mikv`: the tokens an eviction policy would drop are kept at low precision instead of being freed.

MiKV (Yang et al., 2024): a selector (H2O in the paper) picks the important tokens, which stay in high precision;
the others, which an eviction cache would lose, are kept at INT2/INT4 (here 4 bits by default) with an
outlier-aware balancer, so no token is left behind. Here the selector is any registered eviction policy (`policy`, with its budget and `options`): it
runs unchanged on the full-precision tier of a workbench.cache.mixed_precision_store.MixedPrecisionStore, whose
slots, statistics and budget are exactly those of the plain policy, and whatever it frees goes to a low-bit pool
(per-token codes over groups of `group` channels after a per-channel balancer). Attention reads both tiers; the
policy observes the attention its own tokens received (the low tier's columns are cut off).

Byte budgets: with `budget_bytes` (the whole cache, every layer alike) the high-precision token count per layer
and KV head is fixed at the prefill from the prompt's length N: n_high = (b - N * c_low) / (c_high - c_low), with
b = budget_bytes / (layers * kv_heads), c_high the bytes of a full-precision token (key + value, the model's
dtype) and c_low those of a low-precision one (codes, scale and zero per group, int32 position), clamped to
[1, N]: right after the prefill the held tokens cost budget_bytes (buffer slack aside); each decoded token then
adds c_low, as every token is kept. A plain eviction policy's budget for the same bytes is
`tokens_for_bytes(model, budget_bytes)` (workbench.cache.mixed_precision_store).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workbench.cache.base import CachePolicy
from workbench.cache.kvcache import KVCache
from workbench.cache.mixed_precision_store import (MixedPrecisionStore, QuantizedPool, attended, head_dim, managed,
                                                   token_bytes)
from workbench.errors import ParameterError
from workbench.registry import param


def eviction_policies() -> list[str]:
    """Registered policies a mixed-precision cache can wrap: eviction policies that only keep or drop tokens on a
    plain store (no merging, no store or keys of their own)."""
    from workbench.cache import registry

    return [name for name in registry.available() if wrappable(registry.component_class(name))]


def wrappable(cls) -> bool:
    from workbench.cache.eviction import EvictionPolicy

    return (issubclass(cls, EvictionPolicy) and not cls.merges and cls.build is CachePolicy.build
            and cls.attended is CachePolicy.attended)


def parse_options(name: str, options: str) -> dict[str, str]:
    """'window=8, sinks=4' -> {'window': '8', 'sinks': '4'} (the registry converts the strings)."""
    out = {}
    for part in filter(None, (p.strip() for p in options.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ParameterError(f"cache '{name}' parameter 'options' has {part!r}; expected comma-separated "
                                 "name=value pairs of the wrapped policy, e.g. 'window=8,sinks=4'")
        out[key.strip()] = value.strip()
    return out


@dataclass
class MiKV(CachePolicy):
    name = "mikv"
    summary = ("Mixed precision: a wrapped eviction policy (H2O by default) picks the tokens kept in full "
               "precision; those it would drop are kept at low precision (4-bit) instead of being lost.")
    paper = ("No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed Precision "
             "Quantization (Yang et al., 2024)")
    departs = ("the important tokens stay in the model's dtype (the paper's FP16 high-precision configs; its INT8/"
               "INT4 high tiers are not offered); the outlier-aware balancer is simplified to a per-channel "
               "divisor sqrt(max |x|) per KV head and side, computed once from the tokens held when the first ones "
               "go to low precision, applied to keys and values alike (the paper balances keys against the "
               "queries); low-precision codes are per token over groups of `group` channels with float16 scale and "
               "zero; the default low precision is 4 bits (measured on the embedded model: 2-bit per-token codes "
               "with this balancer lose to plain H2O at a whole-head group and about tie with it at a group of 16 "
               "(4 bits per element), while 4-bit codes at a whole-head group (4.5 bits) come within 0.002 nats "
               "of the full cache); any registered non-merging eviction policy can select (the paper: H2O); the "
               "selector sees the "
               "attention its own tokens received, the low tier's share cut off; the whole cache is dequantized "
               "for attention every step (memory is saved, not bandwidth); a byte budget fixes the high-precision "
               "count at the prefill")

    policy: str = param("h2o", "the eviction policy that picks the important tokens (kept in full precision)")
    budget: int = param(128, "full-precision tokens per layer and KV head (the wrapped policy's budget)", min=1)
    ratio: float | None = param(None, "keep this fraction of the prompt in full precision instead", min=0.0, max=1.0)
    budget_bytes: int | None = param(None, "bytes of the whole cache after the prefill: sets the full-precision "
                                     "count from the prompt length (see the module docstring)", min=1)
    options: str = param("", "other parameters of the wrapped policy, e.g. 'window=8,sinks=4'")
    bits: int = param(4, "bits of a low-precision token's codes (the paper: 2 to 4)", choices=(2, 4, 8))
    group: int | None = param(None, "channels per scale/zero of a low-precision token (None: the whole head)", min=1)
    balance: bool = param(True, "divide channels by an outlier-aware balancer before quantizing")

    def validate(self) -> None:
        from workbench.cache import registry

        allowed = eviction_policies()
        if self.policy not in allowed:
            raise ParameterError(f"cache 'mikv' parameter 'policy' is {self.policy!r}; it wraps a registered "
                                 f"eviction policy: {', '.join(allowed)}")
        inner = parse_options("mikv", self.options)
        for reserved in ("budget", "ratio"):
            if reserved in inner:
                raise ParameterError(f"cache 'mikv': give '{reserved}' as mikv's own parameter, not in options")
        self.selector = registry.get(self.policy, budget=self.budget, ratio=self.ratio, **inner)

    # -- the cache --------------------------------------------------------------------------------------------
    def build(self, model, forward=None) -> KVCache:
        dim = head_dim(model)
        group = self.group or dim
        if dim % group or dim * self.bits % 8:
            divisors = [d for d in range(1, dim + 1) if dim % d == 0]
            raise ParameterError(f"cache 'mikv' parameter 'group' is {group}: it must divide the model's head "
                                 f"dimension {dim}; allowed: {', '.join(map(str, divisors))}")
        cache = KVCache(model.config, self, lambda: MixedPrecisionStore(
            {"low": QuantizedPool(self.bits, group, self.balance)}))
        cache.state["token_bytes"] = (token_bytes(model), token_bytes(model, self.bits, group, position_bytes=4))
        cache.state["balancer_bytes"] = 2 * dim * 2 if self.balance else 0  # per layer and KV head, float16
        return cache

    def high_tokens(self, cache, prompt_length: int) -> int:
        """Full-precision tokens per layer and KV head that `budget_bytes` allows (see the module docstring)."""
        high, low = cache.state["token_bytes"]
        per_head = self.budget_bytes / (cache.num_layers * cache.num_kv_heads) - cache.state["balancer_bytes"]
        return max(1, min(prompt_length, math.floor((per_head - prompt_length * low) / (high - low))))

    # -- the hooks: the wrapped policy on the full-precision tier --------------------------------------------
    @property
    def acts_while_decoding(self) -> bool:
        return True  # rows one by one, and commit keeps a prefix only: a tree's dropped branches must not be pooled

    @property
    def tentative(self) -> bool:
        return self.selector.tentative

    def begin_pass(self, cache, forward) -> None:
        self.selector.begin_pass(cache, forward)
        if forward.phase == "prefill" and self.budget_bytes is not None:
            base = self.high_tokens(cache, forward.count)
            cache.state["high_tokens"] = base
            self.selector.set_budgets(cache, self.selector.layer_budgets(base, cache.num_layers, forward.count))

    def wants(self, layer, phase):
        return self.selector.wants(layer, phase)

    def visible(self, layer, call):
        return self.selector.visible(layer, call)

    def attended(self, layer, call):
        return attended(layer, call, *self.selector.attended(layer, call))

    def observe(self, layer, call, result) -> None:
        self.selector.observe(layer, *managed(layer, call, result))

    def evict(self, layer, call, result) -> None:
        self.selector.evict(layer, *managed(layer, call, result))
        if layer.tail is None:
            layer.store.absorb_holes()  # a slot dropped in place goes to low precision now, before the next query
