"""Moving cached keys to other positions: RoPE rotations compose, so a key rotated for position p is rotated for
p + delta by one more rotation of delta (StreamingLLM's positions inside the cache use it).

transformers' rotary layout (`rotate_half`: the two halves of the rotated dimensions are the pairs) with the
model's own inverse frequencies; partial rotary (fewer frequencies than head_dim / 2) rotates the leading dims."""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError


def inverse_frequencies(hf_model) -> torch.Tensor:
    """Float32 (dims / 2,): the model's RoPE inverse frequencies (its rotary embedding's `inv_freq`, which holds any
    frequency scaling); a clear error for models with none or with several (local and global RoPE)."""
    found = {id(m): m.inv_freq for m in hf_model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)}
    distinct = {tuple(f.tolist()) for f in found.values()}
    if len(distinct) != 1:
        what = "no rotary embedding" if not distinct else f"{len(distinct)} different rotary embeddings"
        raise WorkbenchError(f"{type(hf_model).__name__} has {what}: cached keys cannot be moved to positions "
                             "inside the cache; use positions='original'")
    return next(iter(found.values())).float()


def rotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """keys (..., slots, head_dim) rotated by delta (..., slots) more positions (negative: fewer)."""
    angles = delta.float()[..., None] * inv_freq.to(keys.device)  # (..., slots, rotated / 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated = 2 * inv_freq.shape[0]
    head, tail = keys[..., :rotated].float(), keys[..., rotated:]
    half = rotated // 2
    turned = torch.cat([-head[..., half:], head[..., :half]], dim=-1)
    return torch.cat([(head * cos + turned * sin).to(keys.dtype), tail], dim=-1)


def attention_scaling(hf_model) -> float:
    """The factor transformers multiplies RoPE's cos and sin by (`attention_scaling` of the rotary embedding: 1 but
    for YaRN-like scalings), so that a rotated key is rotate(key) * factor."""
    for module in hf_model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            return float(getattr(module, "attention_scaling", 1.0))
    return 1.0
