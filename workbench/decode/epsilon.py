"""`epsilon` and `eta`: truncation sampling with an absolute and an entropy-dependent probability cut-off."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.decode import truncation
from workbench.decode.sample import Sample
from workbench.errors import ParameterError
from workbench.registry import param

PAPER = ("Truncation Sampling as Language Model Desmoothing (Hewitt, Manning, Liang; Findings of EMNLP 2022)")


class _Cutoff(Sample):
    def validate(self) -> None:
        super().validate()
        if not 0 < self.epsilon < 1:
            raise ParameterError(f"decoder '{self.name}' parameter 'epsilon' must be in (0, 1), got {self.epsilon}")


@dataclass
class Epsilon(_Cutoff):
    """Drops every token whose probability is below `epsilon` (the top token always stays), then samples. Applied
    after temperature, top-k, top-p and min-p (off by default), as transformers' `epsilon_cutoff` is."""

    name = "epsilon"
    summary = "Epsilon sampling: drop tokens with probability below epsilon, then sample."
    paper = PAPER

    epsilon: float = param(3e-4, "probability below which a token is dropped (the paper uses 1e-4 to 9e-4)",
                           min=0.0, max=1.0)

    def truncate(self, logits: torch.Tensor) -> torch.Tensor:
        return truncation.epsilon(super().truncate(logits), self.epsilon)


@dataclass
class Eta(_Cutoff):
    """Drops every token whose probability is below eta = min(epsilon, sqrt(epsilon) * exp(-entropy)): a high-
    entropy distribution keeps more of its tail. The top token always stays. Applied after temperature, top-k,
    top-p and min-p (off by default), as transformers' `eta_cutoff` is."""

    name = "eta"
    summary = "Eta sampling: drop tokens below min(epsilon, sqrt(epsilon) * exp(-entropy)), then sample."
    paper = PAPER

    epsilon: float = param(3e-4, "the cut-off's ceiling (the paper uses 3e-4 to 2e-3)", min=0.0, max=1.0)

    def truncate(self, logits: torch.Tensor) -> torch.Tensor:
        return truncation.eta(super().truncate(logits), self.epsilon)
