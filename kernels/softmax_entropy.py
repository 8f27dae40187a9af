"""Fused softmax statistics over the vocabulary: log-sum-exp and Shannon entropy of each row of logits, in one
pass over the row without materializing the probabilities. The trace uses it for next-token entropy.

Online formulation: with running max m, S = sum exp(x - m) and T = sum exp(x - m) * x,
    lse = m + log S,    entropy = -sum p log p = lse - T / S.
"""

from __future__ import annotations

import torch

from workbench.kernels.dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _softmax_entropy_kernel(logits_ptr, lse_ptr, entropy_ptr, n_cols, row_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * row_stride
        neg_inf = float("-inf")
        m = tl.full([BLOCK], neg_inf, tl.float32)  # per-lane running max
        s = tl.zeros([BLOCK], tl.float32)  # per-lane sum of exp(x - m)
        t = tl.zeros([BLOCK], tl.float32)  # per-lane sum of exp(x - m) * x
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=neg_inf).to(tl.float32)
            m_new = tl.maximum(m, x)
            alive = m_new > neg_inf  # lanes that have seen a finite logit
            alpha = tl.where(alive, tl.exp(m - m_new), 0.0)
            p = tl.where(x > neg_inf, tl.exp(x - m_new), 0.0)
            s = s * alpha + p
            t = t * alpha + tl.where(x > neg_inf, p * x, 0.0)
            m = m_new
        row_max = tl.max(m, axis=0)
        scale = tl.where(m > neg_inf, tl.exp(m - row_max), 0.0)
        total = tl.sum(s * scale, axis=0)
        weighted = tl.sum(t * scale, axis=0)
        lse = row_max + tl.log(total)
        tl.store(lse_ptr + row, lse)
        tl.store(entropy_ptr + row, lse - weighted / total)


def softmax_entropy_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, entropy) over the last dim, float32, computed the plain way: softmax, then -sum p log p."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    probs = torch.exp(x - lse[..., None])
    return lse, torch.special.entr(probs).sum(-1)


def softmax_entropy_triton(logits: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, entropy) over the last dim, float32, by the Triton kernel (one program per row)."""
    if not HAS_TRITON:
        raise RuntimeError("softmax_entropy_triton needs Triton (pip install triton)")
    shape, n_cols = logits.shape[:-1], logits.shape[-1]
    rows = logits.reshape(-1, n_cols)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    lse = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(lse)
    if rows.shape[0] > 0:
        block = min(block, triton.next_power_of_2(n_cols))
        _softmax_entropy_kernel[(rows.shape[0],)](rows, lse, entropy, n_cols, rows.stride(0), BLOCK=block)
    return lse.view(shape), entropy.view(shape)


def softmax_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, entropy) of softmax(logits) over the last dim: the kernel on CUDA, the reference elsewhere."""
    if use_triton(logits, "softmax_entropy"):
        return softmax_entropy_triton(logits)
    return softmax_entropy_reference(logits)
