"""Attention variants: what a layer computes from q, k, v. A registry of small named components.

    workbench.attention.available()          -> ["eager", "sdpa", ...]
    workbench.attention.get("sdpa")          -> a component
    workbench.attention.describe("eager")    -> what it does, which paper, its parameters
"""

from workbench.attention.base import AttentionCall, AttentionResult, AttentionVariant
from workbench.attention.bridge import use_attention
from workbench.attention.eager import Eager
from workbench.attention.sdpa import SDPA
from workbench.registry import Registry

registry = Registry("attention", AttentionVariant)
register, available, get, describe = registry.register, registry.available, registry.get, registry.describe

register(Eager)
register(SDPA)

__all__ = ["AttentionCall", "AttentionResult", "AttentionVariant", "use_attention", "registry", "register",
           "available", "get", "describe", "Eager", "SDPA"]
