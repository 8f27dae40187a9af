"""Triton kernels, each beside a plain-torch reference of the same function (importable as workbench.kernels).

Convention: `<name>_triton(...)` is the kernel launcher, `<name>_reference(...)` the torch reference, and
`<name>(...)` dispatches: the kernel for CUDA tensors when Triton is there, the reference otherwise.
Tests run every kernel against its reference under TRITON_INTERPRET=1 on CPU (see tests/conftest.py).
Importing this package registers the fused MoE forward with transformers as experts_implementation
"workbench_fused_moe".
"""

from workbench.kernels.dispatch import HAS_TRITON, use_triton
from workbench.kernels.flash_attention import (FlashOutput, flash_attention, flash_attention_reference,
                                               flash_attention_triton)
from workbench.kernels.fused_moe import (fused_moe, fused_moe_reference, fused_moe_triton, moe_align_block_size,
                                         register)
from workbench.kernels.softmax_entropy import (softmax_entropy, softmax_entropy_reference,
                                               softmax_entropy_triton)

__all__ = ["HAS_TRITON", "use_triton", "softmax_entropy", "softmax_entropy_reference", "softmax_entropy_triton",
           "FlashOutput", "flash_attention", "flash_attention_reference", "flash_attention_triton",
           "fused_moe", "fused_moe_reference", "fused_moe_triton", "moe_align_block_size"]

register()  # transformers' ExpertsInterface gains "workbench_fused_moe" (see kernels/fused_moe.py)
