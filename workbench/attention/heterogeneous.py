"""`mpcvit`: heterogeneous attention - chosen heads drop the softmax (expensive under secure multi-party
computation) for a cheap normalization, the others keep it.

With s = q.k * scaling over the n keys a query may see (causal):
    kind="relu"   -- weights ReLU(s) / sum ReLU(s) (MPCViT's ReLU attention); a row whose scores are all <= 0
                     gets zero weights (output 0) instead of a division by zero. relu_norm="n": ReLU(s) / n
    kind="linear" -- weights s / n (MPCViT's scaling attention)
The weights of these heads need not sum to 1 (linear ones may be negative); their entropy, rows and key mass are
reported for the normalized magnitudes |w| / sum |w|, so maps compare across heads. MPCViT searches per-head
choices per layer; here the same heads are chosen in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.attention.base import AttentionCall, AttentionResult, AttentionVariant
from workbench.attention.weighted import weighted_attention
from workbench.errors import ParameterError
from workbench.registry import param


@dataclass
class MPCViT(AttentionVariant):
    name = "mpcvit"
    summary = "Heterogeneous attention: chosen heads use softmax-free ReLU or scaled-linear attention."
    paper = ("MPCViT: Searching for Accurate and Efficient MPC-Friendly Vision Transformer with Heterogeneous "
             "Attention (Zeng et al., ICCV 2023)")
    departs = ("the softmax-free heads are chosen by parameter, the same in every layer (MPCViT searches them per "
               "layer and trains the model with them)")

    kind: str = param("relu", "the softmax-free attention of the chosen heads", choices=("relu", "linear"))
    relu_norm: str = param("sum", "kind=relu: divide by the row's sum of ReLU scores (MPCViT) or by n, the keys "
                           "it sees", choices=("sum", "n"))
    heads: str = param("", "query heads without softmax, comma-separated (e.g. '0,3'); empty: use fraction")
    fraction: float = param(0.5, "with heads empty: share of the heads without softmax (the first ones)",
                            min=0.0, max=1.0)

    def validate(self) -> None:
        self._listed()

    def _listed(self) -> list[int] | None:
        if not self.heads.strip():
            return None
        try:
            listed = [int(part) for part in self.heads.split(",") if part.strip()]
        except ValueError:
            raise ParameterError(f"attention '{self.name}' parameter 'heads' is {self.heads!r}; expected "
                                 "comma-separated head indices such as '0,3'") from None
        if any(h < 0 for h in listed):
            raise ParameterError(f"attention '{self.name}' parameter 'heads' is {self.heads!r}; head indices "
                                 "must be >= 0")
        return listed

    def cheap_heads(self, num_heads: int) -> list[int]:
        """The query heads without softmax for a model with `num_heads` heads."""
        listed = self._listed()
        if listed is None:
            return list(range(round(self.fraction * num_heads)))
        wrong = [h for h in listed if h >= num_heads]
        if wrong:
            raise ParameterError(f"attention '{self.name}' parameter 'heads' names head(s) "
                                 f"{', '.join(map(str, wrong))}, but the model has {num_heads} query heads "
                                 f"(0..{num_heads - 1})")
        return sorted(set(listed))

    def kept_mask(self, call: AttentionCall) -> None:
        return None  # the attention function changes, not the keys: there is no kept set

    def attend(self, call: AttentionCall, want: frozenset[str]) -> AttentionResult:
        cheap = torch.zeros(call.query.shape[1], dtype=torch.bool, device=call.query.device)
        cheap[self.cheap_heads(call.query.shape[1])] = True
        cheap = cheap[None, :, None, None]

        tiny = torch.finfo(torch.float32).tiny

        def weigh(scores: torch.Tensor, rows: slice):
            seen = torch.isfinite(scores)
            free = scores.clamp_min(0) if self.kind == "relu" else scores.where(seen, 0.0)
            if self.kind == "relu" and self.relu_norm == "sum":
                free = free / free.sum(-1, keepdim=True).clamp_min(tiny)  # all scores <= 0: zero weights
            else:
                free = free / seen.sum(-1, keepdim=True).clamp_min(1)
            magnitude = free.abs()
            normalized = magnitude / magnitude.sum(-1, keepdim=True).clamp_min(tiny)
            soft = torch.softmax(scores, dim=-1)
            return torch.where(cheap, free, soft), torch.where(cheap, normalized, soft)

        return weighted_attention(call, want, weigh, self.name)
