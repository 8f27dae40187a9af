"""Routers: which parameters a token goes through. A registry of small named components."""

from workbench.registry import Registry
from workbench.routers.base import Router, RouterCall, Routing, find_routers
from workbench.routers.cache_aware import CacheAware
from workbench.routers.capacity import Capacity
from workbench.routers.drop import Drop
from workbench.routers.layer_skip import LayerSkipRouter
from workbench.routers.native import Native
from workbench.routers.random_routing import RandomRouting
from workbench.routers.top_k import TopK
from workbench.routers.top_p import TopP

registry = Registry("router", Router)
register, available, get, describe = registry.register, registry.available, registry.get, registry.describe

for router in (Native, TopK, TopP, Drop, RandomRouting, Capacity, CacheAware, LayerSkipRouter):
    register(router)

__all__ = ["Router", "RouterCall", "Routing", "Native", "find_routers", "registry", "register", "available", "get",
           "describe"]
