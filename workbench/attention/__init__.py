"""Attention variants: what a layer computes from q, k, v. A registry of small named components.

    workbench.attention.available()          -> ["eager", "sdpa", "flash", "sliding_window", ...]
    workbench.attention.get("sink_window", sinks=4, window=64)
    workbench.attention.describe("block_sparse")  -> what it does, which paper, its parameters

Dense: eager, sdpa, flash (fused Triton kernel with statistics). Sparse (a kept-key mask per query, run inside
the flash kernel's tiling on GPU, by the dense reference on CPU): sliding_window, sink_window, hybrid,
block_sparse, pbs, topk_retrieval. Changed attention functions: mpcvit (softmax-free heads), entropy_guided
(entropy-based temperature per head), ape (a temperature and scaling of parallel-encoded contexts, for
workbench.run.parallel_encoding; dense elsewhere).
"""

from workbench.attention.ape import APE
from workbench.attention.base import AttentionCall, AttentionResult, AttentionVariant
from workbench.attention.block_sparse import BlockSparse
from workbench.attention.eager import Eager
from workbench.attention.entropy_guided import EntropyGuided
from workbench.attention.flash import Flash
from workbench.attention.heterogeneous import MPCViT
from workbench.attention.hybrid import Hybrid
from workbench.attention.pbs import PBS
from workbench.attention.sdpa import SDPA
from workbench.attention.sparsity import MaskedVariant, Sparsity
from workbench.attention.topk_retrieval import TopKRetrieval
from workbench.attention.window import SinkWindow, SlidingWindow
from workbench.registry import Registry

registry = Registry("attention", AttentionVariant)
register, available, get, describe = registry.register, registry.available, registry.get, registry.describe

VARIANTS = (Eager, SDPA, Flash, SlidingWindow, SinkWindow, Hybrid, BlockSparse, PBS, TopKRetrieval, MPCViT,
            EntropyGuided, APE)
for variant in VARIANTS:
    register(variant)

__all__ = ["AttentionCall", "AttentionResult", "AttentionVariant", "MaskedVariant", "Sparsity",
           "registry", "register", "available", "get", "describe", "VARIANTS", *(v.__name__ for v in VARIANTS)]
