"""When to run a Triton kernel and when its torch reference."""

from __future__ import annotations

import os
import warnings

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # e.g. macOS or Windows: everything runs on the references
    HAS_TRITON = False

_warned: set[str] = set()


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor, kernel: str) -> bool:
    """Whether `kernel` should run as Triton for this tensor. CUDA tensors use the kernel; CPU tensors use the
    reference (the interpreter is for tests, far too slow for real runs). A CUDA tensor without Triton falls
    back to the reference with a one-time warning, never silently."""
    if not tensor.is_cuda:
        return False
    if not HAS_TRITON:
        if kernel not in _warned:
            _warned.add(kernel)
            warnings.warn(f"Triton is not installed: {kernel} runs its torch reference on the GPU (slower)",
                          RuntimeWarning, stacklevel=3)
        return False
    return True
