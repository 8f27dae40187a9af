"""`sample`: ancestral sampling with temperature, top-k, top-p (nucleus) and min-p filtering."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.decode import truncation
from workbench.decode.base import Decoder
from workbench.errors import ParameterError
from workbench.registry import param


@dataclass
class Sample(Decoder):
    name = "sample"
    summary = "Sample the next token after temperature, top-k, top-p and min-p filtering (seeded)."
    paper = ("The Curious Case of Neural Text Degeneration (Holtzman et al., ICLR 2020) for top-p; "
             "min-p: Nguyen et al., 2024")

    temperature: float = param(1.0, "divide logits by this; lower is more deterministic", min=0.0, max=100.0)
    top_k: int = param(0, "keep only the k most likely tokens (0: off)", min=0)
    top_p: float = param(1.0, "keep the smallest set of tokens whose probability reaches p (1: off)", min=0.0, max=1.0)
    min_p: float = param(0.0, "drop tokens below min_p times the top token's probability (0: off)", min=0.0, max=1.0)
    seed: int | None = param(0, "random seed (None: a fresh random seed each run)", min=0)

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ParameterError("decoder 'sample' parameter 'temperature' must be > 0; use decoder 'greedy' "
                                 "for temperature 0")
        if self.top_p <= 0:
            raise ParameterError("decoder 'sample' parameter 'top_p' must be in (0, 1]")

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution `choose` samples from, after every filter (rows sum to 1)."""
        return torch.softmax(self.truncate(logits.float() / self.temperature), dim=-1)

    def truncate(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled logits with the dropped tokens at -inf: top-k, then top-p, then min-p (the order of
        transformers' logits processors; subclasses add their rule after these)."""
        if self.top_k > 0:
            logits = truncation.top_k(logits, self.top_k)
        if self.top_p < 1.0:
            logits = truncation.top_p(logits, self.top_p)
        if self.min_p > 0.0:
            logits = truncation.min_p(logits, self.min_p)
        return logits

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one token per row from `probabilities` with the run's generator (`ctx.rng`)."""
        return torch.multinomial(self.probabilities(logits), 1, generator=generator).squeeze(-1)
