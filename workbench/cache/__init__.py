"""KV cache policies: what is kept between decoding steps. A registry of small named components.

    workbench.cache.get("snapkv", budget=128).build(model)  -> a transformers Cache for one run

A cache is a store per layer (workbench.cache.storage: dense or per-KV-head ragged; workbench.cache.quantized_store:
packed quantized) x a policy (this registry),
and transactional (workbench.cache.kvcache: provisional passes, commit, rollback).
"""

from workbench.cache.base import CachePolicy
from workbench.cache.kvcache import CacheLayer, ForwardPass, KVCache
from workbench.cache.storage import DenseStore, RaggedStore
from workbench.cache.cake import CAKE
from workbench.cache.d2o import D2O
from workbench.cache.eviction import EvictionPolicy
from workbench.cache.full import Full
from workbench.cache.h2o import H2O
from workbench.cache.knorm import KNorm
from workbench.cache.kvmerger import KVMerger
from workbench.cache.lazy_eviction import LazyEviction
from workbench.cache.mpcache import MPCache
from workbench.cache.pyramidkv import PyramidKV
from workbench.cache.razor_attention import RazorAttention
from workbench.cache.sentence_kv import SentenceKV
from workbench.cache.snapkv import SnapKV
from workbench.cache.streaming_llm import StreamingLLM
from workbench.cache.tova import TOVA
from workbench.cache.epicache import EpiCache
from workbench.cache.chelsea import Chelsea
from workbench.cache.elastic import ElasticCache
from workbench.cache.compresskv import CompressKV
from workbench.cache.kvcrush import KVCrush
from workbench.cache.lacache import LaCache
from workbench.cache.kivi import KIVI
from workbench.cache.int_per_token import IntPerToken
from workbench.cache.kvquant import KVQuant
from workbench.cache.fp8 import Fp8
from workbench.cache.offload import Offload, offloaded
from workbench.cache.mikv import MiKV
from workbench.cache.zipcache import ZipCache
from workbench.cache.shadowkv import ShadowKV
from workbench.cache.xquant import XQuant
from workbench.cache.quantized_store import KiviStore, PerTokenStore, QuantizedStore
from workbench.registry import Registry

registry = Registry("cache", CachePolicy)
register, available, get, describe = registry.register, registry.available, registry.get, registry.describe

POLICIES = (Full, StreamingLLM, H2O, SnapKV, TOVA, KNorm, PyramidKV, CAKE, LazyEviction, RazorAttention, KVMerger,
            D2O, MPCache, SentenceKV, EpiCache, Chelsea, ElasticCache, CompressKV, KVCrush, LaCache,
            KIVI, IntPerToken, KVQuant, Fp8, Offload, MiKV, ZipCache, XQuant, ShadowKV)
for _policy in POLICIES:
    register(_policy)

__all__ = ["CachePolicy", "KVCache", "CacheLayer", "ForwardPass", "DenseStore", "RaggedStore", "QuantizedStore",
           "KiviStore", "PerTokenStore", "EvictionPolicy",
           "registry", "register", "offloaded",
           "available", "get", "describe", "POLICIES", *(policy.__name__ for policy in POLICIES)]
