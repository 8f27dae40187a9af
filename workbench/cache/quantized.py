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
        dim = head_dim(model)
        if dim % self.group:
            divisors = [d for d in range(1, dim + 1) if dim % d == 0]
            raise ParameterError(f"cache '{self.name}' parameter 'group' is {self.group}: it must divide the "
                                 f"model's head dimension {dim} (per-token groups are channels of one head); allowed: "
                                 f"{', '.join(map(str, divisors))}")
        if dim * self.bits % 8:
            raise ParameterError(f"cache '{self.name}': {self.bits}-bit codes of a head dimension of {dim} do not "
                                 "fill whole bytes")
        return KVCache(model.config, self, self.new_store)
