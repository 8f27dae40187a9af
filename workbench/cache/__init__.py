"""KV cache policies: what is kept between decoding steps. A registry of small named components.

    workbench.cache.get("snapkv", budget=128).build(model)  -> a transformers Cache for one run
"""

from workbench.cache.base import CachePolicy, KVCache
from workbench.cache.eviction import EvictingCache, EvictionPolicy
from workbench.cache.full import Full, FullCache
from workbench.cache.h2o import H2O
from workbench.cache.knorm import KNorm
from workbench.cache.pyramidkv import PyramidKV
from workbench.cache.snapkv import SnapKV
from workbench.cache.streaming_llm import StreamingLLM
from workbench.cache.tova import TOVA
from workbench.registry import Registry

registry = Registry("cache", CachePolicy)
register = registry.register
available = registry.available
get = registry.get
describe = registry.describe

for _policy in (Full, StreamingLLM, H2O, SnapKV, TOVA, KNorm, PyramidKV):
    register(_policy)

__all__ = ["CachePolicy", "KVCache", "EvictingCache", "EvictionPolicy", "Full", "FullCache", "StreamingLLM", "H2O",
           "SnapKV", "TOVA", "KNorm", "PyramidKV", "registry", "register", "available", "get", "describe"]
