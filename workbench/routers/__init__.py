"""Routers: which parameters a token goes through. A registry of small named components."""

from workbench.registry import Registry
from workbench.routers.base import Router, moe_gates
from workbench.routers.native import Native

registry = Registry("router", Router)
register, available, get, describe = registry.register, registry.available, registry.get, registry.describe

register(Native)

__all__ = ["Router", "Native", "moe_gates", "registry", "register", "available", "get", "describe"]
