"""`bild`: Big Little Decoder. A little model decodes greedily while it is confident; the big model checks its tokens
in one pass and rolls back the ones it finds too unlikely.

The rules of the reference (github kssteven418/BigLittleDecoder, T5BiLDModel in models/t5/modeling_t5.py; its
defaults fallback_threshold 0.6, rollback_threshold 5.0, num_small_iters 10):

  * the big model emits the first token (the prefill's argmax);
  * fallback: the little model, over a session of its own, emits its argmax while its top probability is >= alpha,
    at most `max_little` tokens in a row; the token it would emit below alpha is discarded;
  * the big model then feeds the token before the little run and every little token in ONE verify pass. Rollback:
    at the first little token x_i whose cross-entropy under the big model, -log p_big(x_i), exceeds beta, that
    token and the ones after it are dropped (both sessions roll back) and the big model's argmax there is emitted;
    the reference's loop then lets the big model decode the next token too before the little one resumes;
  * with no token above beta, every little token is kept and the big model's argmax after them follows (the
    fallback token), and the little model resumes.

A little run that falls back at once leaves a plain big decode step. Kept little tokens have p_big >= exp(-beta),
so with a tiny beta every token is the big model's argmax and the output is the big model's greedy decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from workbench.decode.greedy import Greedy
from workbench.decode.speculative import check_same_vocabulary, loaded, record_verify
from workbench.errors import ParameterError
from workbench.registry import param


@dataclass
class BiLD(Greedy):
    name = "bild"
    summary = ("Big Little Decoder: a little model decodes while confident, the big model verifies its tokens in "
               "one pass and rolls back the unlikely ones.")
    paper = ("Speculative Decoding with Big Little Decoder (Kim, Mangalam, Moon, Malik, Mahoney, Gholami, Keutzer; "
             "NeurIPS 2023)")
    departs = ("decoder-only models sharing a tokenizer (the reference runs T5 encoder-decoders for translation); "
               "rollback at the first little token above beta always (the reference's optional shortcut keeps the "
               "whole little run when the big model's argmax there equals the little token); a little "
               "end-of-sequence token ends its run and is verified (the reference stops on it unverified); the "
               "little run stops where the run's length limit would; no logits processors before the fallback test")

    lossless = False  # kept little tokens need only p_big >= exp(-beta), not to be the big model's argmax

    little_model: Any = param(None, "the little model (same tokenizer as the run's model): a loaded workbench "
                                    "Model, or a name for workbench.load, loaded once")
    alpha: float = param(0.6, "fallback threshold in (0, 1]: the little model keeps going while its top "
                              "probability is >= alpha")
    beta: float = param(5.0, "rollback threshold > 0 (nats): a little token x with -log p_big(x) > beta is "
                             "rolled back and replaced by the big model's argmax")
    max_little: int = param(10, "most tokens the little model emits before the big model verifies (the "
                                "reference's num_small_iters)", min=1)

    def validate(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise ParameterError(f"decoder 'bild' parameter 'alpha' is {self.alpha!r}; the fallback threshold "
                                 "must be in (0, 1]")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 0:
            raise ParameterError(f"decoder 'bild' parameter 'beta' is {self.beta!r}; the rollback threshold must "
                                 "be > 0 (nats)")

    def little_session(self, ctx):
        from workbench.run.session import Session

        session = ctx.state.get("little_session")
        if session is None:  # checked here, not at construction, so that describe() and the panel can build it
            little = loaded(self.little_model, "bild", "little_model")
            check_same_vocabulary(ctx.session.model, little, "little model", "bild")
            session = ctx.state["little_session"] = Session(little, "full", "sdpa")
        return session

    def step(self, ctx) -> list[int]:
        little = self.little_session(ctx)
        if not ctx.pending or ctx.state.pop("big_next", False):  # the first token, or the one after a rollback
            return self.big_step(ctx)
        started = time.perf_counter()
        tokens, little_probs = self.little_run(ctx, little)
        drafting = time.perf_counter() - started
        if not tokens:  # fell back at once: the big model decodes the pending token itself
            return self.big_step(ctx)
        pending = ctx.take_pending()
        rows = ctx.session.feed(pending + tokens, "verify")  # row i: the big model's logits after input i
        ctx.chose_from(rows[0])
        log_p = torch.log_softmax(rows, -1)
        index = torch.tensor(tokens, device=rows.device)
        surprise = -log_p[torch.arange(len(tokens), device=rows.device), index]  # each little token's cross-entropy
        above = (surprise > self.beta).nonzero().flatten()
        kept = int(above[0]) if len(above) else len(tokens)
        after = int(rows[kept].argmax())
        started = time.perf_counter()
        ctx.session.commit(1 + kept)  # the pending token and the kept little tokens
        little.commit(min(kept, little.position - little.committed))  # what it fed of them; the rest rolled back
        committing = time.perf_counter() - started
        if kept < len(tokens):
            ctx.state["big_next"] = True  # the reference's loop stays with the big model for one more token
        out = tokens[:kept] + [after]
        for i in range(len(out)):
            ctx.record("decode_decision", "little" if i < kept else "big")
        if ctx.recording("verify_drafted"):
            record_verify(ctx, out, len(tokens), kept, log_p.exp(), little_probs, drafting, committing)
        return out

    def little_run(self, ctx, little) -> tuple[list[int], torch.Tensor]:
        """The little model's greedy tokens while its top probability stays >= alpha, and their distributions."""
        longest = self.max_little if ctx.remaining is None else min(self.max_little, ctx.remaining - 1)
        tokens, probs = [], []
        if longest < 1:  # only the big model's token fits in the run
            return tokens, torch.empty(0)
        behind = ctx.tokens[little.position:]  # tokens the run has and the little model has not fed
        phase = "prefill" if little.position == 0 else "decode" if len(behind) == 1 else "append"
        logits = little.feed(behind, phase)[-1]
        while len(tokens) < longest:
            p = torch.softmax(logits.float(), -1)
            top, token = p.max(-1)
            if float(top) < self.alpha:
                break  # fallback: this token is discarded, the big model takes over
            tokens.append(int(token))
            probs.append(p)
            if tokens[-1] in ctx.stop_ids or len(tokens) == longest:
                break
            logits = little.feed([tokens[-1]], "rollout", logits="last")[-1]
        return tokens, torch.stack(probs) if probs else torch.empty(0)

    def big_step(self, ctx) -> list[int]:
        token = int(ctx.logits.argmax())
        ctx.record("decode_decision", "big")
        if ctx.recording("token_origin"):
            ctx.record("token_origin", "plain")
            ctx.record("target_prob", float(torch.softmax(ctx.logits, -1)[token]))
        return [token]
