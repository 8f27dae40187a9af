"""`sliding_window` and `sink_window`: each query sees only recent keys, plus (StreamingLLM) the first few.

Both run natively in the fused kernel (its window/sinks arguments), so tiles outside the band are never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.attention.sparsity import MaskedVariant, Sparsity
from workbench.errors import ParameterError
from workbench.registry import param


@dataclass
class SlidingWindow(MaskedVariant):
    name = "sliding_window"
    summary = "Each query attends to its `window` most recent keys (itself included)."
    paper = "Longformer: The Long-Document Transformer (Beltagy et al., 2020) - local sliding-window attention"

    window: int = param(256, "recent keys each query sees, itself included", min=1, max=131072)

    def sparsity(self, call) -> Sparsity:
        return Sparsity(window=self.window)


@dataclass
class SinkWindow(MaskedVariant):
    name = "sink_window"
    summary = "Attention sinks: each query sees the first `sinks` keys plus its `window` most recent ones."
    paper = "Efficient Streaming Language Models with Attention Sinks (StreamingLLM; Xiao et al., ICLR 2024)"

    sinks: int = param(4, "initial keys (attention sinks) every query sees", min=0, max=1024)
    window: int = param(256, "recent keys each query sees, itself included", min=1, max=131072)

    def validate(self) -> None:
        if self.sinks > self.window:  # StreamingLLM keeps a few sinks beside a much larger recent window
            raise ParameterError(f"attention '{self.name}': sinks ({self.sinks}) must be <= window "
                                 f"({self.window}); the sinks are a few initial tokens beside the recent window")

    def sparsity(self, call) -> Sparsity:
        return Sparsity(window=self.window, sinks=self.sinks)
