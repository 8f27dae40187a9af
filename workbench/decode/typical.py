"""`typical`: locally typical sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.decode import truncation
from workbench.decode.sample import Sample
from workbench.errors import ParameterError
from workbench.registry import param


@dataclass
class Typical(Sample):
    """Keeps the tokens whose information content (-log p) is closest to the distribution's entropy, the closest
    first, until they hold `typical_p` of the probability; then samples. Applied after temperature, top-k, top-p
    and min-p (off by default), as transformers' `typical_p` is."""

    name = "typical"
    summary = "Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to a mass."
    paper = "Locally Typical Sampling (Meister, Pimentel, Wiher, Cotterell; TACL 2023)"

    typical_p: float = param(0.95, "probability mass of the most typical tokens kept", min=0.0, max=1.0)

    def validate(self) -> None:
        super().validate()
        if self.typical_p <= 0:
            raise ParameterError("decoder 'typical' parameter 'typical_p' must be in (0, 1]")

    def truncate(self, logits: torch.Tensor) -> torch.Tensor:
        return truncation.typical(super().truncate(logits), self.typical_p)
