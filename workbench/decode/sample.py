"""`sample`: ancestral sampling with temperature, top-k, top-p (nucleus) and min-p filtering."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        logits = logits.float() / self.temperature
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the tokens before it already reach top_p (the top token always stays)
            drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        if self.min_p > 0.0:
            probs = torch.softmax(logits, dim=-1)
            logits = logits.masked_fill(probs < self.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one token per row from `probabilities` with the run's generator (`ctx.rng`)."""
        return torch.multinomial(self.probabilities(logits), 1, generator=generator).squeeze(-1)
