"""The dense reference a run is compared with when it records "fidelity".

After the run, the unmodified model (its own attention, a full cache, the native router) reads the prompt and the
tokens the run generated in one teacher-forced forward pass. Its next-token distribution at every step is what
a dense run would have predicted from the same history; the KL divergence KL(dense || run) per step says how much
the run's components (attention variant, cache policy) changed the model's prediction.
"""

from __future__ import annotations

import inspect

import torch

from workbench.models import Model


def dense_log_probs(model: Model, prompt_ids: torch.Tensor, generated: list[int]) -> torch.Tensor:
    """(steps, vocab) float32 log-probabilities the unmodified model gives each generated step."""
    history = torch.tensor([generated[:-1]], dtype=prompt_ids.dtype, device=prompt_ids.device)
    ids = torch.cat([prompt_ids, history], dim=1)
    keep = {"logits_to_keep": len(generated)} if "logits_to_keep" in inspect.signature(model.hf.forward).parameters \
        else {}
    with torch.inference_mode():
        logits = model.hf(input_ids=ids, use_cache=False, **keep).logits[0, -len(generated):]
    return torch.log_softmax(logits.float(), dim=-1)


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per row of two (rows, vocab) log-probability tensors, in nats."""
    return torch.where(reference > float("-inf"), reference.exp() * (reference - other), 0.0).sum(-1)
