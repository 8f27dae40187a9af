"""`zipcache`: every token quantized, the salient ones (by normalized attention) at 4 bits, the rest at 2.

ZipCache (He et al., NeurIPS 2024; code: ThisisBillhe/ZipCache). Saliency is the normalized attention score: the
attention a token received, summed over every query, divided by the number of queries that could attend to it
(under a causal mask token p is seen by the queries at p, p + 1, ...: summed attention favours early tokens only
because more queries see them). The top `salient_ratio` of the tokens are quantized at `high_bits`, the rest at
`low_bits`, with channel-separable token-wise quantization (each channel divided by sqrt(max |x|), then one scale
and zero per token). The reference code's defaults: 4 and 2 bits, 40 % of the tokens at low precision
(salient_ratio 0.6), streaming: new tokens wait in full precision and are compressed every 100 decoding steps.

Here the prompt is quantized right after the prefill's attention (which reads it in full precision); decoded
tokens wait in the full-precision tier of a workbench.cache.mixed_precision_store.MixedPrecisionStore until `gap`
of them are held, and then they are split by the same rule, their normalized attention counting the queries since
each one. Inside a verify or rollout pass nothing is quantized; commit compresses once, on the committed state.

Byte budgets: with `budget_bytes` (the whole cache, every layer alike) the salient fraction is set at the prefill
from the prompt's length N: r = (b / N - c_low) / (c_high - c_low), with b = budget_bytes / (layers * kv_heads)
minus the balancers' bytes and c_high, c_low the bytes of a token at high_bits and low_bits (codes, scale and zero,
int32 position), clamped to [0, 1]; later chunks use the same fraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from workbench.cache.base import CachePolicy
from workbench.cache.kvcache import KVCache
from workbench.cache.mixed_precision_store import (MixedPrecisionStore, QuantizedPool, attended, head_dim, managed,
                                                   token_bytes)
from workbench.errors import ParameterError
from workbench.registry import param


def normalized_attention(received: torch.Tensor, positions: torch.Tensor, newest: int) -> torch.Tensor:
    """(kv_heads, slots): attention received over the number of queries (positions p..newest) that could see it."""
    return received / (newest - positions + 1).clamp_min(1).float()


@dataclass
class ZipCache(CachePolicy):
    name = "zipcache"
    summary = ("Quantize every token: the salient ones (top normalized attention: attention received over the "
               "queries that could see it) at 4 bits, the rest at 2 bits.")
    paper = ("ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token Identification "
             "(He et al., NeurIPS 2024)")
    departs = ("saliency from every query's attention (exact), not the paper's probe-query approximation; keys "
               "use the same channel-separable token-wise quantization as values (the reference quantizes keys "
               "per channel); the channel divisor is computed once per pool from the tokens held when it first "
               "receives some, not per compression; every `gap` decoded tokens only the newest ones are split "
               "and quantized (the reference re-assigns and re-quantizes the whole cache); codes packed in uint8 "
               "along the head dimension, float16 scales and zeros; the cache is dequantized for attention every "
               "step (memory is saved, not bandwidth)")

    salient_ratio: float = param(0.6, "fraction of tokens at high precision (the reference: 40 % at low)",
                                 min=0.0, max=1.0)
    high_bits: int = param(4, "bits of a salient token", choices=(2, 4, 8))
    low_bits: int = param(2, "bits of the other tokens", choices=(2, 4, 8))
    gap: int = param(100, "decoded tokens held in full precision before they are quantized (streaming gap)", min=1)
    budget_bytes: int | None = param(None, "bytes of the whole cache after the prefill: sets the salient fraction "
                                     "from the prompt length (see the module docstring)", min=1)
    group: int | None = param(None, "channels per scale/zero (None: the whole head, ZipCache's token-wise)", min=1)
    balance: bool = param(True, "divide channels by sqrt(max |x|) before quantizing (channel-separable)")

    needs: ClassVar[frozenset[str]] = frozenset({"key_mass"})
    tentative: ClassVar[bool] = False  # quantizing is not undone: inside a provisional pass, at commit

    def validate(self) -> None:
        if self.high_bits < self.low_bits:
            raise ParameterError(f"cache 'zipcache' high_bits ({self.high_bits}) must be at least low_bits "
                                 f"({self.low_bits})")

    @property
    def acts_while_decoding(self) -> bool:
        return True

    def build(self, model, forward=None) -> KVCache:
        dim = head_dim(model)
        group = self.group or dim
        if dim % group:
            divisors = [d for d in range(1, dim + 1) if dim % d == 0]
            raise ParameterError(f"cache 'zipcache' parameter 'group' is {group}: it must divide the model's head "
                                 f"dimension {dim}; allowed: {', '.join(map(str, divisors))}")
        pools = {"low": QuantizedPool(self.low_bits, group, self.balance),
                 "high": QuantizedPool(self.high_bits, group, self.balance)}  # index 1: "salient" routes here
        cache = KVCache(model.config, self, lambda: MixedPrecisionStore(pools_copy(pools), "salient", "residual"))
        cache.state["token_bytes"] = tuple(token_bytes(model, bits, group, position_bytes=4)
                                           for bits in (self.high_bits, self.low_bits))
        cache.state["balancer_bytes"] = 2 * 2 * dim * 2 if self.balance else 0  # two pools, two sides, float16
        cache.state["salient_ratio"] = self.salient_ratio
        return cache

    def begin_pass(self, cache, forward) -> None:
        if forward.phase == "prefill" and self.budget_bytes is not None:
            high, low = cache.state["token_bytes"]
            per_head = self.budget_bytes / (cache.num_layers * cache.num_kv_heads) - cache.state["balancer_bytes"]
            ratio = (per_head / forward.count - low) / (high - low) if high > low else 1.0
            cache.state["salient_ratio"] = min(1.0, max(0.0, ratio))

    def attended(self, layer, call):
        return attended(layer, call, call.key, call.value)

    def observe(self, layer, call, result) -> None:
        _, result = managed(layer, call, result)
        received = layer.extra("attention")  # per full-precision slot: attention received, summed over queries
        received += result.key_mass[0].float()

    def evict(self, layer, call, result) -> None:
        held = layer.held_at(call)
        if call.phase in ("decode", "verify", "rollout") and min(held) < self.gap:
            return
        positions, valid = layer.positions(), layer.valid(call)
        score = normalized_attention(layer.extra("attention"), positions, layer.newest(call))
        score = score.masked_fill(~valid, float("-inf"))
        ratio = layer.cache.state["salient_ratio"]
        salient = layer.extra("salient", False, torch.bool)
        salient.zero_()
        for h, n in enumerate(held):  # the reference's count: all but int((1 - ratio) * n) tokens
            top = n - int((1 - ratio) * n)
            if top:
                order = torch.sort(score[h], descending=True, stable=True).indices[:top]
                salient[h, order] = True
        layer.keep(torch.zeros_like(valid), [0] * len(held), call)  # everything moves to its pool


def pools_copy(pools: dict[str, QuantizedPool]) -> dict[str, QuantizedPool]:
    """Fresh, empty pools with the same settings (one set per layer)."""
    return {name: QuantizedPool(p.bits, p.group, p.balance, p.scale_dtype) for name, p in pools.items()}
