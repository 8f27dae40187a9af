"""`greedy`: always the most likely next token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.decode.base import Decoder


@dataclass
class Greedy(Decoder):
    name = "greedy"
    summary = "Pick the most likely next token (argmax); deterministic."
    paper = None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """One-hot on the argmax: greedy decoding draws from a point mass."""
        logits = logits.float()
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return logits.argmax(dim=-1)
