"""`full`: keep every key and value (the reference every eviction policy is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from workbench.cache.base import CachePolicy


@dataclass
class Full(CachePolicy):
    name = "full"
    summary = "Keep every token's keys and values (a dense store, like transformers' DynamicCache)."
    paper = None
    needs_bridge = False  # nothing to evict: works in any forward, with or without workbench's attention
