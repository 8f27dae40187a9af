"""The dense reference a run is compared with when it records "fidelity".

After the run, the unmodified model (dense attention, a full cache, the native router) reads the prompt and the
tokens the run generated, teacher-forced. Its next-token distribution at every step is what a dense run would
have predicted from the same history, so per step
    KL(dense || run)     how much the run's components (attention variant, cache policy) changed the prediction;
    cache dropped mass   the share of the dense model's attention (that step's query, per layer and head) that
                         falls on positions the run's cache had already evicted: what eviction hid from the model.
The replay reads everything but the last `steps` tokens in one pass, then those last queries in a second pass
over the full cache, so only a (heads, steps, positions) slice of attention is ever materialized per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workbench.models import Model
from workbench.run.session import Session


@dataclass
class DenseReplay:
    log_probs: torch.Tensor  # (steps, vocab) float32
    dropped_mass: np.ndarray | None  # (steps, layers, heads), None when nothing was evicted


def dense_replay(model: Model, prompt_ids: torch.Tensor, generated: list[int],
                 evictions: list[tuple[int, int, int, np.ndarray, np.ndarray | None]]) -> DenseReplay:
    """Replay prompt + generated tokens through the unmodified model; see the module docstring.

    evictions -- (step, layer, kv_head, positions, merged_into) as the recorder collected them"""
    steps = len(generated)
    history = torch.tensor([generated[:-1]], dtype=prompt_ids.dtype, device=prompt_ids.device)
    ids = torch.cat([prompt_ids, history], dim=1)
    head, tail = ids[:, :-steps], ids[:, -steps:]  # the tail's queries chose the generated tokens
    gone = _evicted_before_each_step(evictions, model, steps, ids.shape[1])
    probe = _DroppedMassProbe(gone, model.num_heads // model.num_kv_heads) if gone is not None else None
    with Session(model, "full", "sdpa") as session:
        if head.shape[1]:
            session.feed(head, "prefill", logits="none")
        session.binding.observer = probe  # only the tail's queries are measured
        logits = session.feed(tail, "append" if head.shape[1] else "prefill", logits="all")
    dropped = None if probe is None else np.stack([probe.mass[layer] for layer in range(model.num_layers)], 1)
    return DenseReplay(torch.log_softmax(logits.float(), dim=-1), dropped)


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per row of two (rows, vocab) log-probability tensors, in nats."""
    return torch.where(reference > float("-inf"), reference.exp() * (reference - other), 0.0).sum(-1)


def _evicted_before_each_step(evictions, model: Model, steps: int, positions: int) -> torch.Tensor | None:
    """Bool (layers, kv_heads, steps, positions): gone from the cache when step s attended (evicted at an earlier
    step; a step's own eviction happens after its attention). None when nothing was evicted."""
    if not evictions:
        return None
    evicted_at = torch.full((model.num_layers, model.num_kv_heads, positions), steps, dtype=torch.long)
    for step, layer, kv_head, where, _ in evictions:
        evicted_at[layer, kv_head, torch.as_tensor(where, dtype=torch.long)] = step
    return evicted_at[:, :, None, :] < torch.arange(steps)[None, None, :, None]


class _DroppedMassProbe:
    """An attention observer over the replay's last queries: dense attention mass on evicted positions."""

    def __init__(self, gone: torch.Tensor, groups: int):
        self.gone, self.groups = gone, groups
        self.mass: dict[int, np.ndarray] = {}

    def wants(self, layer: int) -> frozenset[str]:
        return frozenset({"probs"})

    def observe(self, call, result) -> None:
        probs = result.probs[0].float()  # (heads, steps, positions)
        gone = self.gone[call.layer].to(probs.device).repeat_interleave(self.groups, dim=0)
        self.mass[call.layer] = (probs * gone).sum(-1).T.cpu().numpy()  # (steps, heads)
