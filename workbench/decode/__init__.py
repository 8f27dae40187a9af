"""Decoders: how the next tokens are chosen. A registry of small named components."""

from workbench.decode.base import Decoder
from workbench.decode.greedy import Greedy
from workbench.decode.sample import Sample
from workbench.registry import Registry

registry = Registry("decoder", Decoder)
register, available, get, describe = registry.register, registry.available, registry.get, registry.describe

register(Greedy)
register(Sample)

__all__ = ["Decoder", "Greedy", "Sample", "registry", "register", "available", "get", "describe"]
