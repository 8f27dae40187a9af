"""`adadec`: AdaDec, greedy decoding that pauses to look ahead where the model is uncertain.

At each step, with H the entropy (nats) of the next-token distribution p:

    H <  threshold:  the argmax (greedy)
    H >= threshold:  for each of the top-`beam` candidates c, roll out `lookahead` more tokens l_1..l_n greedily after
                     it and score  (log p(c) + sum_i log p(l_i | ..., c, l_1..l_{i-1})) / (n + 1);
                     the best-scoring candidate is chosen (the first in p's order on ties)

This is the authors' AdaFixL score (Generator.lookahead_scoring_function in github.com/SYSUSELab/AdaDec) for one
sequence: their history score and lambda are the same for every candidate, so they drop out of the argmax. A
rollout ends early at an end-of-sequence token (counted, as the authors count the token that ends a rollout). Each
candidate's rollout runs as provisional `rollout` passes on the run's session, rolled back to the step's mark before
the next candidate, so the cache (and an evicting policy's statistics) is exactly as if no look-ahead had run; one
token is returned per step. The threshold is learned per model (workbench.decode.adadec_threshold,
bench/adadec_threshold.py); the default is the one learned for the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.decode.base import Decoder
from workbench.errors import ParameterError, WorkbenchError
from workbench.registry import param

# Learned for the embedded SmolLM2-135M-Instruct (float32, CPU) by `.venv/bin/python bench/adadec_threshold.py` on
# 2026-12-02: 358 reference tokens of its 16 hand-written tasks (289 ranked first), class-balanced logistic fit
# P(first | H) = sigmoid(1.5318 - 1.5599 H), which crosses 0.5 at H = 0.981991 nats (AUC 0.83).
LEARNED_THRESHOLD = 0.981991


@dataclass
class AdaDec(Decoder):
    name = "adadec"
    summary = ("Greedy, except where the next-token entropy reaches a learned threshold: there the top-B candidates "
               "are reranked by the mean log-probability of each candidate and its greedy L-token look-ahead.")
    paper = ("Towards Better Code Generation: Adaptive Decoding with Uncertainty Guidance (He, Liu, Wang, Li, Wang, "
             "Peng, Zheng; arXiv 2506.08980, 2025)")
    departs = ("a rollout stops at an end-of-sequence token rather than at the authors' code-layout stops (four blank "
               "lines, or an unindented line, which assume a HumanEval function body), a candidate that is itself an "
               "end-of-sequence token is scored by its own log-probability, and rollouts stop at the model's context "
               "length; one sequence only (the authors also combine it with beam search); the default threshold was "
               "learned on 16 hand-written tasks (bench/adadec_threshold.py) with a class-weighted fit crossing 0.5, "
               "where the authors down-sample and tune the probability cutoff on a held-out split")

    lossless = False  # its own deterministic rule, not a draw from `probabilities`

    threshold: float | None = param(LEARNED_THRESHOLD, "entropy (nats) at or above which a step looks ahead (None: "
                                    "the value learned for the embedded SmolLM2-135M-Instruct; inf: always greedy)",
                                    min=0.0)
    beam: int = param(3, "B: candidates reranked at a look-ahead step (the authors' lookahead_beam_size)", min=1)
    lookahead: int = param(5, "L: greedy tokens rolled out after each candidate (the authors' lookahead_length)",
                           min=1)

    def validate(self) -> None:
        if self.threshold is None:
            self.threshold = LEARNED_THRESHOLD
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or math.isnan(
                self.threshold):
            raise ParameterError(f"decoder 'adadec' parameter 'threshold' must be an entropy in nats >= 0 (or None "
                                 f"for the learned default, inf for always greedy); got {self.threshold!r}")
        for name in ("beam", "lookahead"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParameterError(f"decoder 'adadec' parameter '{name}' must be an integer >= 1; got {value!r}")

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's next-token distribution p, which look-ahead steps rerank (not what the tokens follow)."""
        return torch.softmax(logits.float(), dim=-1)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise WorkbenchError("decoder 'adadec' chooses in step(ctx): its look-ahead needs a session")

    def step(self, ctx) -> list[int]:
        logits = ctx.logits  # feeds the pending token
        if float(ctx.entropy) < self.threshold:
            ctx.record("decode_decision", "greedy")
            return [int(logits.argmax())]
        ctx.record("decode_decision", "lookahead")
        return [self.rerank(ctx, logits)]

    def rerank(self, ctx, logits: torch.Tensor) -> int:
        """The top-`beam` candidate whose greedy look-ahead has the best mean log-probability."""
        log_p = torch.log_softmax(logits.float(), dim=-1)
        top_log_p, top_ids = log_p.topk(min(self.beam, log_p.shape[-1]))
        session = ctx.session
        mark = session.mark()
        limit = session.model.max_positions
        # the candidate is fed at `mark`, rollout token i (never the last) at mark + i: positions below `limit`
        horizon = self.lookahead if limit is None else max(0, min(self.lookahead, limit - mark))
        scores = []
        for candidate, candidate_log_p in zip(top_ids.tolist(), top_log_p.tolist()):
            total, count, token = candidate_log_p, 1, candidate
            if candidate not in ctx.stop_ids:
                for _ in range(horizon):
                    row = torch.log_softmax(session.feed([token], "rollout", logits="last")[-1], dim=-1)
                    token = int(row.argmax())
                    total, count = total + float(row[token]), count + 1
                    if token in ctx.stop_ids:
                        break
                session.rollback(mark)
            scores.append(total / count)
        return int(top_ids[max(range(len(scores)), key=scores.__getitem__)])
