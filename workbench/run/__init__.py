"""The run: the Session (the only place a forward pass happens), the bridge that binds components to its passes,
and the generation loop driven by the decoder."""

from workbench.run.parallel_encoding import ape
from workbench.run.blend import cacheblend
from workbench.run.bridge import use_attention
from workbench.run.chunks import ChunkCache
from workbench.run.context import StepContext
from workbench.run.generate import generate
from workbench.run.prefix import PrefixCache
from workbench.run.result import Run, StepEvent
from workbench.run.session import Session, build_cache, probe

__all__ = ["generate", "PrefixCache", "ChunkCache", "cacheblend", "ape", "Run", "StepEvent", "Session", "StepContext",
           "build_cache", "probe", "use_attention"]
