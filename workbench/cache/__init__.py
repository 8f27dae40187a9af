"""KV cache policies: what is kept between decoding steps. A registry of small named components.

    workbench.cache.get("full").build(model)  -> a transformers Cache usable by model.generate
"""

from workbench.cache.base import CachePolicy, KVCache
from workbench.cache.full import Full, FullCache
from workbench.registry import Registry

registry = Registry("cache", CachePolicy)
register = registry.register
available = registry.available
get = registry.get
describe = registry.describe

register(Full)

__all__ = ["CachePolicy", "KVCache", "Full", "FullCache", "registry", "register", "available", "get", "describe"]
