"""Base of the policies that keep every token, quantized in a packed store (workbench.cache.quantized_store).

Such a policy evicts nothing and never acts on attention (it works in any forward, like `full`); what it decides
is how its store is built: bits, group G and full-precision residual R, checked against the model's head
dimension when the cache is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.cache.base import CachePolicy
from workbench.cache.kvcache import KVCache
from workbench.errors import ParameterError


def head_dim(model) -> int:
    text = model.config.get_text_config(decoder=True)
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


@dataclass
class QuantizedPolicy(CachePolicy):
    """Subclasses declare `bits`, `group` and `residual` and build their store in `new_store`."""

    needs_bridge = False  # nothing to evict: works in any forward, with or without workbench's attention

    def build(self, model, forward=None) -> KVCache:
        check_packing(self, head_dim(model), "the model's head dimension", "channels of one head")
        return KVCache(model.config, self, self.new_store)


def check_packing(policy, width: int, what: str, groups: str) -> None:
    """One-line errors unless `policy.group` divides the `width`-wide stream it quantizes per token (`what` it is,
    `groups`: what a per-token group holds) and `policy.bits`-bit codes of it fill whole bytes."""
    if width % policy.group:
        divisors = [d for d in range(1, width + 1) if width % d == 0]
        raise ParameterError(f"cache '{policy.name}' parameter 'group' is {policy.group}: it must divide {what} "
                             f"{width} (per-token groups are {groups}); allowed: {', '.join(map(str, divisors))}")
    if width * policy.bits % 8:
        raise ParameterError(f"cache '{policy.name}': {policy.bits}-bit codes of {what} {width} do not fill whole "
                             "bytes")
