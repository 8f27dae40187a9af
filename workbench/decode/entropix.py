"""`entropix`: choose how to decode each token from the next-token entropy and varentropy.

The entropix reference sampler (github xjdr-alt/entropix, entropix/sampler.py: `sample` and its `SamplerConfig`
defaults) measures the entropy H = E[-log2 p] and the varentropy V = Var[-log2 p] of the next-token distribution,
in bits as the reference does, and picks a regime, tested in this order:

    argmax    H < 0.1 and V < 0.1          confident: the most likely token
    clarify   H > 5.0 and V < 0.1          uniformly unsure: the reference inserts a "clarifying question" token
                                           (id 2564 of its Llama tokenizer) unless the last token is one, then
                                           samples at temperature min(1.5, 1.3 * T); here it samples at once
    explore   H < 5.0 and V > 5.0          a few strong candidates and a long tail: T * 1.2 (at most 1.5), top-k
                                           1.5 * top_k (at least 5)
    resample  H > 3.0 and V > 5.0          lost (H >= 5 in effect: explore is tested first): temperature
                                           max(2.0, 2 * T), top-p max(0.5, top_p)
    adaptive  otherwise                    temperature T * (1 + 0.3 (H + V)), min-p clip(min_p (1 - 0.5 (H + V)),
                                           0.01, 0.5); draw `adaptive_samples` tokens and keep the best scored

with T = 0.666, top_k = 27, top_p = 0.9, min_p = 0.03 (SamplerConfig). In the reference every adjustment also has
an attention term (the last layer's attention entropy and varentropy across heads, the heads' agreement, the
interaction strength |scores|). A session pass here gives no attention weights unless the run observes attention
(an extra eager computation), so those statistics are taken as 0 and each adjustment keeps its constant part; the
adaptive regime's score of a sample is then its log-probability plus a constant, so the best of the samples is the
most likely one. The decision and the varentropy (in nats^2, the trace's unit) are recorded for every token
(`decode_decision`, `varentropy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.decode import truncation
from workbench.decode.base import Decoder
from workbench.decode.telemetry import surprisal_moments
from workbench.errors import ParameterError
from workbench.registry import param

REGIMES = ("argmax", "clarify", "explore", "resample", "adaptive")
LN_2 = math.log(2.0)

# SamplerConfig's regime actions with the attention statistics at 0 (helv/lehv/hehv offsets, ada_* coefficients)
CLARIFY_TEMPERATURE, EXPLORE_TEMPERATURE, RESAMPLE_TEMPERATURE = 1.3, 1.2, 2.0
MAX_TEMPERATURE, MIN_RESAMPLE_TEMPERATURE, MIN_RESAMPLE_TOP_P = 1.5, 2.0, 0.5
EXPLORE_TOP_K, MIN_EXPLORE_TOP_K = 1.5, 5  # top_k * (1 + 0.5 * (1 - agreement)), agreement 0
ADAPTIVE_TEMPERATURE, ADAPTIVE_MIN_P = 0.3, 0.5  # ada_temp_logits, ada_min_p


@dataclass
class Entropix(Decoder):
    name = "entropix"
    summary = ("Entropix: pick argmax, sampling, exploring or resampling per token from the next-token entropy and "
               "varentropy.")
    paper = ("entropix, entropy-based sampling (xjdr-alt/entropix on GitHub, 2024; no paper): the reference "
             "sampler entropix/sampler.py and its SamplerConfig defaults")
    departs = ("the attention statistics of the reference's adjustments (attention entropy and varentropy, head "
               "agreement, interaction strength) are taken as 0, since a pass here gives no attention weights "
               "without an extra eager computation; the 'clarify' regime samples at the reference's after-question "
               "temperature instead of inserting a clarifying-question token; top-k, top-p and min-p are the "
               "standard filters (workbench.decode.truncation: the reference's _sample computes its min-p mask "
               "without using it and applies top-p from the least likely of the top-k up)")

    lossless = False  # its own rule: the distribution changes with the regime

    temperature: float = param(0.666, "base temperature T of the sampling regimes", min=0.0, max=100.0)
    top_k: int = param(27, "base top-k of the sampling regimes", min=1)
    top_p: float = param(0.90, "base top-p of the sampling regimes", min=0.0, max=1.0)
    min_p: float = param(0.03, "base min-p (the adaptive regime scales it with the uncertainty)", min=0.0, max=1.0)
    low_entropy: float = param(0.1, "entropy (bits) below which a token is 'low entropy'", min=0.0)
    low_varentropy: float = param(0.1, "varentropy (bits^2) below which a token is 'low varentropy'", min=0.0)
    medium_entropy: float = param(3.0, "entropy (bits) above which high varentropy means 'resample'", min=0.0)
    high_entropy: float = param(5.0, "entropy (bits) above which a token is 'high entropy'", min=0.0)
    high_varentropy: float = param(5.0, "varentropy (bits^2) above which a token is 'high varentropy'", min=0.0)
    adaptive_samples: int = param(5, "tokens drawn in the adaptive regime, the most likely kept", min=1, max=64)
    seed: int | None = param(0, "random seed (None: a fresh random seed each run)", min=0)

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ParameterError("decoder 'entropix' parameter 'temperature' must be > 0")
        if self.top_p <= 0:
            raise ParameterError("decoder 'entropix' parameter 'top_p' must be in (0, 1]")

    def regime(self, entropy_bits: float, varentropy_bits: float) -> str:
        """The regime for entropy and varentropy in bits, tested in the reference's order."""
        if entropy_bits < self.low_entropy and varentropy_bits < self.low_varentropy:
            return "argmax"
        if entropy_bits > self.high_entropy and varentropy_bits < self.low_varentropy:
            return "clarify"
        if entropy_bits < self.high_entropy and varentropy_bits > self.high_varentropy:
            return "explore"
        if entropy_bits > self.medium_entropy and varentropy_bits > self.high_varentropy:
            return "resample"
        return "adaptive"

    def decide(self, logits: torch.Tensor) -> tuple[str, float, float]:
        """(regime, entropy in nats, varentropy in nats^2) for (vocab,) logits."""
        entropy, varentropy = surprisal_moments(logits)
        return self.regime(entropy / LN_2, varentropy / LN_2 ** 2), entropy, varentropy

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Per row, the distribution its regime draws from (the adaptive regime keeps the most likely of its
        draws from it, so its tokens lean to the likely ones)."""
        rows = [self._filtered(row, self.decide(row)[0])[0] for row in logits.float()]
        return torch.stack([torch.softmax(row, -1) for row in rows])

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        tokens = [self._draw(row, self.decide(row)[0], generator) for row in logits.float()]
        return torch.tensor(tokens, dtype=torch.long, device=logits.device)

    def step(self, ctx) -> list[int]:
        regime, _, varentropy = self.decide(ctx.logits)
        ctx.record("decode_decision", regime)
        ctx.record("varentropy", varentropy)
        return [self._draw(ctx.logits.float(), regime, ctx.rng)]

    def _filtered(self, logits: torch.Tensor, regime: str) -> tuple[torch.Tensor, int]:
        """The regime's temperature-scaled, filtered (vocab,) logits, and how many tokens it draws."""
        temperature, top_k, top_p, min_p, draws = self.temperature, self.top_k, self.top_p, self.min_p, 1
        if regime == "argmax":
            return truncation.top_k(logits[None], 1)[0], 1
        if regime == "clarify":
            temperature = min(MAX_TEMPERATURE, temperature * CLARIFY_TEMPERATURE)
        elif regime == "explore":
            temperature = min(MAX_TEMPERATURE, temperature * EXPLORE_TEMPERATURE)
            top_k = max(MIN_EXPLORE_TOP_K, int(top_k * EXPLORE_TOP_K))
        elif regime == "resample":
            temperature = max(MIN_RESAMPLE_TEMPERATURE, temperature * RESAMPLE_TEMPERATURE)
            top_p = max(MIN_RESAMPLE_TOP_P, top_p)
        else:  # adaptive: the uncertainty in bits, as the reference's thresholds
            entropy, varentropy = surprisal_moments(logits)
            uncertainty = entropy / LN_2 + varentropy / LN_2 ** 2
            temperature = temperature * (1 + ADAPTIVE_TEMPERATURE * uncertainty)
            min_p = min(max(min_p * (1 - ADAPTIVE_MIN_P * uncertainty), 0.01), 0.5)
            draws = self.adaptive_samples
        scaled = truncation.top_k(logits[None] / temperature, top_k)
        if top_p < 1.0:
            scaled = truncation.top_p(scaled, top_p)
        if min_p > 0.0:
            scaled = truncation.min_p(scaled, min_p)
        return scaled[0], draws

    def _draw(self, logits: torch.Tensor, regime: str, generator: torch.Generator | None) -> int:
        if regime == "argmax":
            return int(logits.argmax())
        scaled, draws = self._filtered(logits, regime)
        drawn = torch.multinomial(torch.softmax(scaled, -1), draws, replacement=True, generator=generator)
        # the reference scores each draw by log p(x) plus a confidence that is the same for every draw
        return int(drawn[logits[drawn].argmax()])
