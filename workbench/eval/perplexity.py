"""Perplexity of a continuation given a context held in a (possibly compressing) cache.

The context is prefilled in one forward pass (a compressing cache compresses it as it would a prompt); then the
continuation is teacher-forced `chunk` tokens per forward pass (default 1: every token is a decode pass, so
decode-time eviction - H2O, TOVA, StreamingLLM - acts between tokens exactly as it would while generating; larger
chunks are "append" passes) and -log p of each continuation token is summed. The first continuation token is predicted by the prefill's logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from workbench.errors import ParameterError
from workbench.eval.prefill import prefill
from workbench.run import Session


@dataclass
class PerplexityResult:
    nll: float  # summed negative log-likelihood (nats) of the continuation's tokens
    tokens: int  # how many tokens were scored
    peak_cache_bytes: int  # the most at any moment (the context's uncompressed prefill included)
    held_cache_bytes: int  # the most held after a forward pass
    replayed: bool = False  # the context's prefill was replayed from a PrefillRecord

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def perplexity(model, context_ids, continuation_ids, cache: Any = "full", chunk: int = 1,
               attention: Any = "sdpa", record=None, router: Any = "native") -> PerplexityResult:
    """Score `continuation_ids` after `context_ids` with a fresh cache of policy `cache`.
    record -- a PrefillRecord of `context_ids` to replay instead of running the prefill (see prefill.py)."""
    context_ids, continuation_ids = list(map(int, context_ids)), list(map(int, continuation_ids))
    if not context_ids or not continuation_ids:
        raise ParameterError("perplexity needs a non-empty context and continuation")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ParameterError(f"chunk must be an integer >= 1 (tokens per forward pass), got {chunk!r}")
    nll = 0.0
    with Session(model, cache, attention, router=router) as session:
        logits, replayed = prefill(session, context_ids, record)  # predicts continuation[0]
        scored = 0
        while True:
            targets = continuation_ids[scored:scored + logits.shape[0]]
            nll += float(torch.nn.functional.cross_entropy(logits[:len(targets)].double(),
                                                           torch.tensor(targets, device=logits.device),
                                                           reduction="sum"))
            scored += len(targets)
            if scored >= len(continuation_ids):
                break
            # feed the tokens just scored: their logits predict the next ones
            step = continuation_ids[scored - 1:scored - 1 + min(chunk, len(continuation_ids) - scored)]
            logits = session.feed(step, "decode" if len(step) == 1 else "append", logits="all")
    return PerplexityResult(nll, len(continuation_ids), session.peak_bytes, session.held_peak_bytes, replayed)
