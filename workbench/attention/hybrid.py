"""`hybrid`: LongGen's layer mix - full attention in some layers, GPU-friendly sparse attention (attention sinks +
a recent window, and optionally strided key blocks) in the others.

Which layers are full (default: LongGen's placement): the middle `full_fraction` (1/3) of the layers, one block
centred in the network, sparse layers at both ends - e.g. 11 of 32 layers, 10..20. With `every` > 0 instead:
layers offset, offset + every, ... (interleaved, not LongGen's).

Training-free: LongGen fine-tunes the model into this architecture (on long-context data, while extending its
context length); here a pretrained model runs the mix as it is, so it loses more than LongGen's trained models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.attention import reference
from workbench.attention.sparsity import MaskedVariant, Sparsity, check_block_size, recent_keys
from workbench.errors import ParameterError
from workbench.registry import param

LONGGEN_FRACTION = 1 / 3


@dataclass
class Hybrid(MaskedVariant):
    name = "hybrid"
    summary = ("Full attention in the middle third of the layers (LongGen); elsewhere sinks + recent window "
               "(+ every `stride`-th block of keys). Training-free.")
    paper = ("A Little Goes a Long Way: Efficient Long Context Training and Inference with Partial Contexts "
             "(LongGen; Ge et al., 2024)")
    departs = ("training-free: LongGen fine-tunes the model into this layer mix; here a pretrained model runs it "
               "unchanged, so quality is below LongGen's")

    full_fraction: float = param(LONGGEN_FRACTION, "with every = 0: share of the layers with full attention, one "
                                 "block in the middle of the network (LongGen: 1/3)", min=0.0, max=1.0)
    every: int = param(0, "> 0: instead, one full-attention layer in every `every` from `offset` (1 = all full)",
                       min=0, max=64)
    offset: int = param(0, "with every > 0: the first full-attention layer", min=0, max=255)
    sinks: int = param(4, "sparse layers: initial keys every query sees", min=0, max=1024)
    window: int = param(256, "sparse layers: recent keys each query sees, itself included", min=1, max=131072)
    stride: int = param(0, "sparse layers: also keep key blocks 0, stride, 2*stride, ... (0 = no strided blocks)",
                        min=0, max=1024)
    block_size: int = param(64, "sparse layers: keys per strided block", min=16, max=1024)

    def validate(self) -> None:
        check_block_size(self, self.block_size)
        if self.sinks > self.window:
            raise ParameterError(f"attention '{self.name}': sinks ({self.sinks}) must be <= window ({self.window})")
        if self.every == 0 and self.offset:  # nothing a user sets is silently ignored
            raise ParameterError(f"attention '{self.name}': offset ({self.offset}) applies with every > 0 only")
        if self.every > 0 and self.full_fraction != LONGGEN_FRACTION:
            raise ParameterError(f"attention '{self.name}': full_fraction applies with every = 0 only (every is "
                                 f"{self.every})")

    def full_layers(self, num_layers: int) -> range:
        """LongGen's placement: round(full_fraction * layers) full layers, centred (an odd remainder puts the extra
        sparse layer on top)."""
        count = round(self.full_fraction * num_layers)
        start = (num_layers - count) // 2
        return range(start, start + count)

    def full_layer(self, layer: int, num_layers: int | None = None) -> bool:
        if self.every > 0:
            return layer >= self.offset and (layer - self.offset) % self.every == 0
        if num_layers is None:
            raise ParameterError(f"attention '{self.name}' places its full layers in the middle of the network and "
                                 "needs the model's layer count (module.config.num_hidden_layers); set every > 0 "
                                 "for a placement that does not")
        return layer in self.full_layers(num_layers)

    def sparsity(self, call) -> Sparsity:
        if self.full_layer(call.layer, model_layers(call.module)):
            return Sparsity()
        if self.stride == 0:  # sinks + window alone run natively in the kernel
            return Sparsity(window=self.window, sinks=self.sinks)
        # a union (band OR strided blocks): one token mask; the kernel still skips tiles it leaves empty
        block = torch.arange(call.key.shape[2], device=call.query.device) // self.block_size
        strided = block % self.stride == 0
        return Sparsity(mask=recent_keys(call, self.window, self.sinks) | (reference.allowed(call) & strided),
                        block_size=self.block_size)


def model_layers(module) -> int | None:
    """The layer count of the model an attention module belongs to (its config's num_hidden_layers), or None."""
    return getattr(getattr(module, "config", None), "num_hidden_layers", None)
