"""`full`: keep every key and value (the reference every eviction policy is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from workbench.cache.base import CachePolicy, KVCache


class FullCache(KVCache):
    """transformers' DynamicCache with workbench's accounting; nothing is ever evicted."""


@dataclass
class Full(CachePolicy):
    name = "full"
    summary = "Keep every token's keys and values (the transformers DynamicCache)."
    paper = None

    def build(self, model) -> FullCache:
        return FullCache(model.config)
