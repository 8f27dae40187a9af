"""Decoders: how the next tokens are chosen. A registry of small named components."""

from workbench.decode import telemetry  # noqa: F401  (declares the "decoding" trace variables)
from workbench.decode.adadec import AdaDec
from workbench.decode.base import Decoder
from workbench.decode.beam import Beam
from workbench.decode.bild import BiLD
from workbench.decode.cache_draft import CacheDraft
from workbench.decode.contrastive import Contrastive
from workbench.decode.dola import DoLa
from workbench.decode.entropix import Entropix
from workbench.decode.epsilon import Epsilon, Eta
from workbench.decode.greedy import Greedy
from workbench.decode.layer_skip import LayerSkip
from workbench.decode.medusa import Medusa
from workbench.decode.prompt_lookup import PromptLookup
from workbench.decode.sample import Sample
from workbench.decode.speculative import SpeculativeDecoding
from workbench.decode.typical import Typical
from workbench.registry import Registry

registry = Registry("decoder", Decoder)
register, available, get, describe = registry.register, registry.available, registry.get, registry.describe

for _decoder in (Greedy, Sample, Typical, Epsilon, Eta, PromptLookup, SpeculativeDecoding, LayerSkip, Contrastive,
                 DoLa, CacheDraft, Beam, Entropix, BiLD, AdaDec, Medusa):
    register(_decoder)

__all__ = ["Decoder", "Greedy", "Sample", "Typical", "Epsilon", "Eta", "PromptLookup", "SpeculativeDecoding",
           "LayerSkip", "Contrastive", "DoLa", "CacheDraft", "Beam", "Entropix", "BiLD", "AdaDec", "Medusa",
           "registry", "register", "available", "get", "describe"]
