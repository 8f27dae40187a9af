"""`entropy_guided`: keep every attention row's entropy inside a band, by a per-row softmax temperature.

Entropy-Guided Attention for Private LLMs identifies two failure modes of attention heads: entropic overload
(rows near uniform, typically early layers) and entropy collapse (rows on a single key, deep layers), and
trains with an entropy regularizer and learnable temperatures to avoid both. This inference-time version
applies the temperature directly, without training. The rule, for each query row of each head, with scores
s = q.k * scaling over the n keys the query may see and normalized entropy h(beta) = H(softmax(beta * s)) / log n:
    h(1) > max_entropy  (overload): sharpen - the beta >= 1 with h(beta) = max_entropy
    h(1) < min_entropy  (collapse): soften  - the beta <= 1 with h(beta) = min_entropy
    otherwise: beta = 1 (plain softmax)
beta stays within [1 / max_temperature, max_temperature] (a row that cannot reach the band gets the bound) and
is found by bisection (h falls monotonically as beta grows). Rows over a single key are left alone.
`temperatures(call)` and `normalized_entropy(call)` expose the per-row diagnostics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.attention import reference
from workbench.attention.base import AttentionCall, AttentionResult, AttentionVariant
from workbench.attention.weighted import weighted_attention
from workbench.errors import ParameterError
from workbench.registry import param

BISECTION_STEPS = 24  # beta to ~1e-6 relative precision over the widest allowed range


@dataclass
class EntropyGuided(AttentionVariant):
    name = "entropy_guided"
    summary = ("Per-row temperature keeps each attention row's entropy within [min_entropy, max_entropy] "
               "x log(keys): sharpens overloaded rows, softens collapsed ones.")
    paper = "Entropy-Guided Attention for Private LLMs (Jha & Reagen, 2025)"

    max_entropy: float = param(0.9, "rows above this share of the maximum entropy log(n) are sharpened (1 = off)",
                               min=0.0, max=1.0)
    min_entropy: float = param(0.05, "rows below this share of log(n) are softened (0 = off)", min=0.0, max=1.0)
    max_temperature: float = param(10.0, "largest sharpening or softening factor applied to the scores",
                                   min=1.0, max=1000.0)

    def validate(self) -> None:
        if self.min_entropy >= self.max_entropy:
            raise ParameterError(f"attention '{self.name}': min_entropy ({self.min_entropy}) must be below "
                                 f"max_entropy ({self.max_entropy})")

    def kept_mask(self, call: AttentionCall) -> None:
        return None  # every key stays; the attention function changes

    def attend(self, call: AttentionCall, want: frozenset[str]) -> AttentionResult:
        def weigh(scores: torch.Tensor, rows: slice):
            probs = torch.softmax(scores * self.inverse_temperature(scores)[..., None], dim=-1)
            return probs, probs

        return weighted_attention(call, want, weigh, self.name)

    def inverse_temperature(self, scores: torch.Tensor) -> torch.Tensor:
        """beta (batch, heads, rows) for scaled scores (batch, heads, rows, K) with -inf where masked."""
        log_n = torch.isfinite(scores).sum(-1).float().log()
        h = normalized(scores, log_n)
        over, under = h > self.max_entropy, h < self.min_entropy
        over, under = over & (log_n > 0), under & (log_n > 0)
        if not (over.any() or under.any()):
            return torch.ones_like(h)
        bound = math.log(self.max_temperature)
        target = torch.where(over, self.max_entropy, self.min_entropy)
        low = torch.where(over, 0.0, -bound)  # log beta, bracketing the target
        high = torch.where(over, bound, 0.0)
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            too_flat = normalized(scores * middle.exp()[..., None], log_n) > target
            low, high = torch.where(too_flat, middle, low), torch.where(too_flat, high, middle)
        return torch.where(over | under, ((low + high) / 2).exp(), 1.0)

    # -- diagnostics -------------------------------------------------------------------------------------------
    def temperatures(self, call: AttentionCall) -> torch.Tensor:
        """Float32 (batch, heads, Q): the temperature 1/beta this variant applies to each row."""
        return torch.cat([1 / self.inverse_temperature(reference.scores(call, rows))
                          for rows in reference.row_chunks(call.query.shape[2])], dim=2)

    @staticmethod
    def normalized_entropy(call: AttentionCall) -> torch.Tensor:
        """Float32 (batch, heads, Q): each row's plain softmax entropy over log(keys it sees), in [0, 1]
        (0 for rows over a single key). Its mean over queries is the per-head overload/collapse diagnostic."""
        parts = []
        for rows in reference.row_chunks(call.query.shape[2]):
            scores = reference.scores(call, rows)
            parts.append(normalized(scores, torch.isfinite(scores).sum(-1).float().log()))
        return torch.cat(parts, dim=2)


def normalized(scores: torch.Tensor, log_n: torch.Tensor) -> torch.Tensor:
    """Softmax entropy of each row over log(n); 0 where n = 1."""
    entropy = reference.row_entropy(torch.softmax(scores, dim=-1))
    return torch.where(log_n > 0, entropy / log_n.clamp_min(1e-12), 0.0)
