"""`hybrid`: LongGen's layer mix - full attention in every `every`-th layer, GPU-friendly sparse attention
(attention sinks + a recent window, and optionally strided key blocks) in the others."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.attention import reference
from workbench.attention.sparsity import MaskedVariant, Sparsity, check_block_size, recent_keys
from workbench.errors import ParameterError
from workbench.registry import param


@dataclass
class Hybrid(MaskedVariant):
    name = "hybrid"
    summary = ("Full attention in every `every`-th layer; elsewhere sinks + recent window (+ every "
               "`stride`-th block of keys).")
    paper = ("A Little Goes a Long Way: Efficient Long Context Training and Inference with Partial Contexts "
             "(LongGen; Ge et al., 2024)")

    every: int = param(3, "one full-attention layer in every `every` (LongGen: 1 in 3); 1 = all full",
                       min=1, max=64)
    offset: int = param(0, "the first full-attention layer; layers offset, offset+every, ... are full",
                        min=0, max=255)
    sinks: int = param(4, "sparse layers: initial keys every query sees", min=0, max=1024)
    window: int = param(256, "sparse layers: recent keys each query sees, itself included", min=1, max=131072)
    stride: int = param(0, "sparse layers: also keep key blocks 0, stride, 2*stride, ... (0 = no strided blocks)",
                        min=0, max=1024)
    block_size: int = param(64, "sparse layers: keys per strided block", min=16, max=1024)

    def validate(self) -> None:
        check_block_size(self, self.block_size)
        if self.sinks > self.window:
            raise ParameterError(f"attention '{self.name}': sinks ({self.sinks}) must be <= window ({self.window})")

    def full_layer(self, layer: int) -> bool:
        return layer >= self.offset and (layer - self.offset) % self.every == 0

    def sparsity(self, call) -> Sparsity:
        if self.full_layer(call.layer):
            return Sparsity()
        if self.stride == 0:  # sinks + window alone run natively in the kernel
            return Sparsity(window=self.window, sinks=self.sinks)
        # a union (band OR strided blocks): one token mask; the kernel still skips tiles it leaves empty
        block = torch.arange(call.key.shape[2], device=call.query.device) // self.block_size
        strided = block % self.stride == 0
        return Sparsity(mask=recent_keys(call, self.window, self.sinks) | (reference.allowed(call) & strided),
                        block_size=self.block_size)
