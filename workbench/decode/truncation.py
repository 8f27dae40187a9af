"""Truncation rules for sampling: each takes float logits (rows, vocab) and returns them with the tokens it drops
set to -inf. They compose (a dropped token stays dropped), and every rule keeps at least one token per row (the most likely one; for `typical` the most typical one).

    top_k     the k most likely tokens
    top_p     nucleus: the smallest set of most likely tokens whose probability reaches p (Holtzman et al., 2020)
    min_p     tokens with at least min_p times the top token's probability (Nguyen et al., 2024)
    typical   locally typical: tokens ranked by how far their information -log p is from the entropy H, the
              closest kept until their probability reaches the mass (Meister et al., TACL 2023)
    epsilon   tokens with probability >= epsilon (Hewitt et al., "Truncation Sampling as Language Model
              Desmoothing", EMNLP Findings 2022)
    eta       tokens with probability >= eta = min(epsilon, sqrt(epsilon) * exp(-H)): the cut-off falls as the
              distribution's entropy rises (same paper)
"""

from __future__ import annotations

import torch

DROPPED = float("-inf")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Nats, (rows, 1); dropped tokens (-inf) contribute nothing."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -torch.where(log_p > DROPPED, log_p.exp() * log_p, 0.0).sum(-1, keepdim=True)


def _keep_top(logits: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Drop `drop` but never a row's most likely token."""
    top = torch.zeros_like(drop).scatter_(-1, logits.argmax(-1, keepdim=True), True)
    return logits.masked_fill(drop & ~top, DROPPED)


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, DROPPED)


def _smallest_set_reaching(logits: torch.Tensor, order: torch.Tensor, mass: float) -> torch.Tensor:
    """Keep, per row, the first tokens in `order` until their probabilities reach `mass` (the token that reaches
    it included, so the first one always stays); drop the rest."""
    probs = torch.softmax(logits, dim=-1).gather(-1, order)
    before = probs.cumsum(dim=-1) - probs  # what the tokens ranked ahead of each one already hold
    drop_sorted = before >= mass
    return logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), DROPPED)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    return _smallest_set_reaching(logits, logits.argsort(dim=-1, descending=True), p)


def min_p(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < fraction * probs.max(dim=-1, keepdim=True).values, DROPPED)


def typical(logits: torch.Tensor, mass: float) -> torch.Tensor:
    surprise_gap = (-torch.log_softmax(logits, dim=-1) - entropy(logits)).abs()  # inf for dropped tokens
    return _smallest_set_reaching(logits, surprise_gap.argsort(dim=-1, stable=True), mass)


def epsilon(logits: torch.Tensor, cutoff: float) -> torch.Tensor:
    return _keep_top(logits, torch.softmax(logits, dim=-1) < cutoff)


def eta(logits: torch.Tensor, cutoff: float) -> torch.Tensor:
    threshold = torch.minimum(torch.tensor(cutoff), cutoff ** 0.5 * torch.exp(-entropy(logits)))
    return _keep_top(logits, torch.softmax(logits, dim=-1) < threshold)
