"""Cache policies and the cache object they build.

A `CachePolicy` is the registered component (with its parameters, e.g. a budget); for every run it builds a
fresh `KVCache`, a real transformers `Cache` that `model.generate` accepts as `past_key_values` too. The
cache reports the bytes its tensors hold and which positions each layer and KV head keeps, which is what the
trace records.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from workbench.registry import Component


class KVCache(DynamicCache):
    """A DynamicCache that can say what it holds. Policies that evict override `update` and the accounting."""

    def __init__(self, config, **kwargs):
        super().__init__(config=config, **kwargs)
        text = config.get_text_config(decoder=True)
        self.num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads

    def nbytes(self) -> int:
        """Bytes held by the cached key and value tensors (what the memory really costs)."""
        total = 0
        for layer in self.layers:
            for tensor in (layer.keys, layer.values):
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
        return total

    def tokens_held(self) -> torch.Tensor:
        """Int tensor (layers, kv_heads): how many tokens each layer and KV head keeps."""
        held = torch.tensor([layer.get_seq_length() for layer in self.layers], dtype=torch.long)
        return held[:, None].expand(-1, self.num_kv_heads)

    # -- hooks workbench's attention bridge calls for every layer (no-ops for a cache that never evicts) --------
    bridged = False  # True while the bridge serves this cache

    def wants(self, layer_idx: int) -> frozenset[str]:
        """Attention statistics this cache needs from the layer (see workbench.attention.base.STATISTICS)."""
        return frozenset()

    def attention_mask(self, layer_idx: int, call) -> torch.Tensor | None:
        """Bool (1, kv_heads, q_len, k_len) of the slots each query may see, when the plain causal mask is wrong.
        `call` (the layer's AttentionCall, query included) lets query-aware policies select slots per step."""
        return None

    def see_tokens(self, input_ids: torch.Tensor) -> None:
        """Called with the token ids (1, n) of each forward pass before it runs (sentence-aware policies)."""

    def after_attention(self, call, result) -> None:
        """Called once the layer's attention ran (eviction policies score and evict here)."""

    def drain_events(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """(layer, kv_head, evicted positions, merged-into positions or None) since the last call."""
        return []

    def slot_positions(self, layer_idx: int) -> torch.Tensor | None:
        """Long (kv_heads, k_len): the token position held in each key slot the layer's attention sees (-1 for
        padding), or None when slot i simply holds position i (nothing was evicted or reordered)."""
        return None

    def positions(self, layer_idx: int) -> torch.Tensor:
        """Long tensor (kv_heads, n): the absolute positions of the tokens a layer keeps, per KV head."""
        layer = self.layers[layer_idx]
        held = layer.get_seq_length()
        seen = getattr(layer, "cumulative_length", held)  # sliding-window layers count what they have seen
        return torch.arange(seen - held, seen).expand(self.num_kv_heads, held)


class CachePolicy(Component):
    """Base of cache policies: `build(model)` returns a fresh cache for one run."""

    def build(self, model) -> KVCache:
        raise NotImplementedError
