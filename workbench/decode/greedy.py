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

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)
