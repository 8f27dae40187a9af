"""Decoders: how the next token is chosen from the model's logits."""

from __future__ import annotations

import torch

from workbench.registry import Component


class Decoder(Component):
    """Base of decoders. `start` is called once per run (reset state such as a seeded RNG); `choose` picks the
    next token for each row of float32 logits (batch, vocab)."""

    def start(self, device: torch.device) -> None:
        pass

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
