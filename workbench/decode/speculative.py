"""Speculative decoding: a cheap drafter proposes k tokens, the target model checks them all in ONE verify pass,
the accepted prefix is committed and the rest rolled back through the session.

    accept(target, draft, draft_probs, generator, greedy)   the acceptance rule, one function
    Drafting                                                 the decoder step every drafter shares
    ModelDrafting                                            drafters that run a model over a session of their own
    SpeculativeDecoding (`speculative`)                      the drafter: a smaller model with the same tokenizer

Acceptance (Leviathan, Kalman, Matias, ICML 2023; Chen et al., 2023): draft token x_i, drawn from q_i, is kept
with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the token is drawn from the residual
max(0, p_i - q_i) (normalised), and when every draft token is kept a bonus token is drawn from p_{k+1}. The
output then follows the target's distribution p exactly. A deterministic drafter (prompt lookup) has q = a point
mass. In greedy mode a draft token is kept when it is the target's argmax, so the tokens equal plain greedy
decoding's. The target's distribution p is `sample`'s (temperature, top-k, top-p, min-p) of the target's logits.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import torch

from workbench.decode.sample import Sample
from workbench.errors import ParameterError
from workbench.registry import param


SCHEDULES = ("constant", "heuristic", "goodput")  # how a drafter chooses its draft length (see Drafting)


def accept(target: torch.Tensor, draft: list[int], draft_probs: torch.Tensor | None,
           generator: torch.Generator | None, greedy: bool) -> tuple[int, int]:
    """How many draft tokens to keep, and the token after them.

    target      -- (k + 1, vocab) the target's probabilities after the pending token and after each draft token
    draft       -- the k draft tokens
    draft_probs -- (k, vocab) the distributions they were drawn from; None for a deterministic draft"""
    if greedy:
        best = target.argmax(-1).tolist()
        for i, token in enumerate(draft):
            if best[i] != token:
                return i, best[i]
        return len(draft), best[len(draft)]
    for i, token in enumerate(draft):
        p = target[i]
        q = draft_probs[i] if draft_probs is not None else torch.nn.functional.one_hot(
            torch.tensor(token, device=p.device), p.shape[-1]).to(p.dtype)
        keep = torch.clamp(p[token] / q[token], max=1.0)
        if float(torch.rand((), generator=generator, device=p.device)) < float(keep):
            continue
        residual = (p - q).clamp_min(0)
        total = residual.sum()
        residual = residual / total if total > 0 else p  # total is 0 only if p == q, where nothing is rejected
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(draft), int(torch.multinomial(target[len(draft)], 1, generator=generator))


@dataclass
class Drafting(Sample):
    """The step every drafter shares: feed the pending token and the draft as one verify pass, keep what `accept`
    says, commit it. Subclasses implement `draft(ctx, pending)` -> (tokens, their distributions or None), drafting
    at most `self.length(ctx)` tokens, and may use `accepted(ctx, n)` to learn how many were kept.

    Draft length: `schedule="constant"` drafts `k` tokens every pass; "heuristic" is transformers' schedule for
    assisted generation, kept per run: start at k, +2 after a pass that kept the whole draft, -1 (down to 1)
    otherwise, so a drafter that keeps failing stops paying for long verify passes; "goodput" is SmartSpec's rule
    (see `goodput_length`): the length in 1..k that maximises the expected tokens per second, from this run's
    measured acceptance rate and draft and verify times."""

    lossless = True

    k: int = param(4, "draft tokens per verify pass (the first pass's with schedule='heuristic')", min=1)
    schedule: str = param("constant", "draft length: constant k, transformers' heuristic (+2 / -1), or "
                                      "SmartSpec's goodput rule (the best length up to k from measured costs)",
                          choices=SCHEDULES)
    greedy: bool = param(True, "accept on argmax equality (tokens equal greedy decoding); False: rejection "
                               "sampling, lossless for `sample` with the same temperature and filters")

    def length(self, ctx) -> int:
        """Draft tokens to propose now: the schedule's length, capped so that the pass emits no token beyond
        max_new_tokens (the kept draft plus the target's token)."""
        return self.planned(ctx) if ctx.remaining is None else max(0, min(self.planned(ctx), ctx.remaining - 1))

    def planned(self, ctx) -> int:
        return ctx.state.get("draft_length", self.k)

    def _schedule(self, ctx, drafted: int, kept: int, drafting: float, verifying: float) -> None:
        if self.schedule == "heuristic":
            ctx.state["draft_length"] = self.planned(ctx) + 2 if kept == drafted else max(1, self.planned(ctx) - 1)
        elif self.schedule == "goodput":
            costs = ctx.state.get("costs")
            if costs is None:  # after the first verify pass: the cache holds the prompt, as later passes see it
                costs = ctx.state["costs"] = PassCosts(verify_profile(ctx.session, self.k + 1, ctx.tokens[-1]))
            costs.add(drafted, kept, drafting, verifying)
            ctx.state["draft_length"] = goodput_length(costs.acceptance, costs.draft_seconds, costs.verify_seconds,
                                                       self.k)

    def draft(self, ctx, pending: list[int]) -> tuple[list[int], torch.Tensor | None]:
        raise NotImplementedError

    def accepted(self, ctx, kept: int) -> None:
        """Told after each verify pass how many draft tokens were kept."""

    def verify(self, ctx, ids: list[int]) -> torch.Tensor:
        """The verify pass of the pending token and the draft: (len(ids), vocab) logits (a hook: medusa keeps the
        pass's hidden states too)."""
        return ctx.session.feed(ids, "verify")

    def keep(self, ctx, rows: torch.Tensor, target: torch.Tensor | None, tokens: list[int],
             draft_probs: torch.Tensor | None) -> tuple[int, int]:
        """How many draft tokens to keep and the token after them: `accept` (a hook for other acceptance rules)."""
        return accept(rows if self.greedy else target, tokens, draft_probs, ctx.rng, self.greedy)

    def step(self, ctx) -> list[int]:
        pending = ctx.take_pending()
        # plain steps: the first token (from the prefill's logits), the second (this run's greedy step time) and
        # the run's last token (nothing left to verify)
        if not pending or not ctx.state.get("timed_plain") or self.length(ctx) == 0:
            ctx.state["timed_plain"] = bool(pending)
            ctx.pending = pending
            return self.plain_step(ctx)
        return self.speculate(ctx, pending)

    def speculate(self, ctx, pending: list[int]) -> list[int]:
        """Draft, verify the pending token and the draft in one pass, commit what is kept (a hook: medusa
        verifies a tree)."""
        device = ctx.session.model.device
        started = time.perf_counter()
        tokens, draft_probs = self.draft(ctx, pending)
        drafting = elapsed(started, device)
        if not tokens:  # nothing to propose: a plain decoding step
            ctx.pending = pending
            return self.plain_step(ctx)
        started = time.perf_counter()
        rows = self.verify(ctx, pending + tokens)
        verifying = elapsed(started, device)
        ctx.chose_from(rows[0])
        target = self.probabilities(rows) if not self.greedy or ctx.recording("target_prob") else None
        kept, after = self.keep(ctx, rows, target, tokens, draft_probs)
        started = time.perf_counter()
        ctx.session.commit(1 + kept)  # the pending token and the kept draft
        self.accepted(ctx, kept)
        committing = elapsed(started, device)
        self._schedule(ctx, len(tokens), kept, drafting, verifying)
        out = tokens[:kept] + [after]
        if target is not None:
            record_verify(ctx, out, len(tokens), kept, target, draft_probs, drafting, committing)
        return out

    def plain_step(self, ctx) -> list[int]:
        """One token from the next-token logits, as plain decoding would choose it."""
        token = super().step(ctx)
        if ctx.recording("token_origin"):
            ctx.record("token_origin", "plain")
            ctx.record("target_prob", float(self.probabilities(ctx.logits[None])[0, token[0]]))
        return token

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(-1)
        return super().choose(logits, generator)


def elapsed(started: float, device) -> float:
    """Seconds since `started` (time.perf_counter()), once the device has finished the work queued so far (CUDA
    runs kernels asynchronously: without the sync the time would be the launch time)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


class PassCosts:
    """What the goodput rule measures over a run's verify passes: the acceptance rate, seconds per draft token,
    and the verify time of n tokens: from a profile (`verify_profile`, seconds by n) where one was taken, else a
    line a + b * n fitted by least squares to the run's own verify passes."""

    def __init__(self, profile: dict[int, float] | None = None):
        self.profile = profile
        self.drafted = self.kept = self.tried = 0
        self.drafting = 0.0
        self.verifies: list[tuple[int, float]] = []  # (tokens fed, seconds)

    def add(self, drafted: int, kept: int, drafting: float, verifying: float) -> None:
        self.drafted += drafted
        self.kept += kept
        self.tried += min(kept + 1, drafted)  # the positions checked: the kept ones and the first rejected one
        self.drafting += drafting
        self.verifies.append((drafted + 1, verifying))

    @property
    def acceptance(self) -> float:
        """The per-token acceptance rate a of the i.i.d. model: kept / tried (its maximum-likelihood estimate;
        kept / drafted would count the positions after a rejection, never tried, as rejections)."""
        return self.kept / self.tried if self.tried else 0.0

    @property
    def draft_seconds(self) -> float:
        return self.drafting / self.drafted if self.drafted else 0.0

    def verify_seconds(self, n: int) -> float:
        if self.profile and n in self.profile:
            return self.profile[n]
        intercept, slope = self.verify_line
        return max(intercept, 0.0) + slope * n  # a negative fitted intercept, from noisy times, counts as 0

    @property
    def verify_line(self) -> tuple[float, float]:
        if not self.verifies:
            return 0.0, 0.0
        tokens = torch.tensor([n for n, _ in self.verifies], dtype=torch.float64)
        seconds = torch.tensor([t for _, t in self.verifies], dtype=torch.float64)
        if len(set(tokens.tolist())) < 2:  # one length seen: no slope to fit yet, the time is all overhead
            return float(seconds.mean()), 0.0
        centred = tokens - tokens.mean()
        slope = float((centred * (seconds - seconds.mean())).sum() / (centred ** 2).sum())
        return float(seconds.mean()) - slope * float(tokens.mean()), max(slope, 0.0)


_PROFILES: dict = {}  # (id of the hf model, device, attention, cache policy, longest) -> seconds by tokens fed


def verify_profile(session, longest: int, token: int) -> dict[int, float]:
    """Seconds of one verify pass of n tokens on this session, n = 1..longest (each fed on top of a fork of the
    session, so the run's cache and trace never see them, and rolled back; the faster of two tries): SmartSpec's
    profiled cost model, which it measures before serving. A forward's cost is not linear in its tokens on every
    machine (on a 2-core CPU, 4 tokens cost 1.5x 3 tokens: the matrix kernels change shape), so the rule reads
    the measured table. Taken once per model, device, attention variant, cache policy and length in a process
    (2 * longest forward passes: about 1.5 s for k = 10 on the embedded model on CPU)."""
    key = (id(session.model.hf), str(session.model.device), session.attention.name, session.policy.name, longest)
    if key not in _PROFILES:
        probe, device = session.fork(), session.model.device
        mark = probe.mark()
        profile = {}
        for n in range(1, longest + 1):
            tries = []
            for _ in range(2):
                started = time.perf_counter()
                probe.feed([token] * n, "verify", logits="none")
                tries.append(elapsed(started, device))
                probe.rollback(mark)
            profile[n] = min(tries)
        _PROFILES[key] = profile
    return _PROFILES[key]


def goodput_length(acceptance: float, draft_seconds: float, verify_seconds, longest: int) -> int:
    """SmartSpec's rule (Liu et al., 2024, "Optimizing Speculative Decoding for Serving Large Language Models Using
    Goodput"), for one sequence: the draft length k in 1..longest maximising

        goodput(k) = E[tokens per pass] / (k * draft_seconds + verify_seconds(k + 1)),
        E[tokens] = (1 - a^(k+1)) / (1 - a)

    with a the acceptance rate (tokens accepted independently with probability a, the paper's model) and
    verify_seconds(n) the verify time of n tokens (`PassCosts.verify_seconds`). SmartSpec chooses k per batch
    from the same estimates; a batch of one makes it per pass. Departure: SmartSpec may choose k = 0 (no
    speculation); here k >= 1, since a run that stopped drafting would never measure its acceptance again."""
    a = min(max(acceptance, 0.0), 1.0 - 1e-6)

    def goodput(k: int) -> float:
        seconds = max(k * draft_seconds + verify_seconds(k + 1), 1e-12)  # all 0 only before any measurement
        return (1 - a ** (k + 1)) / (1 - a) / seconds

    return max(range(1, longest + 1), key=goodput)


def record_verify(ctx, out: list[int], drafted: int, kept: int, target: torch.Tensor,
                  draft_probs: torch.Tensor | None, drafting: float, committing: float,
                  candidates: int | None = None) -> None:
    """The verify pass's telemetry (workbench.decode.telemetry): its counts and seconds, and per emitted token its
    origin, p(x), q(x) and min(1, p/q). `target` (drafted + 1, vocab) are the target's probabilities where each
    emitted token was chosen, `draft_probs` (drafted, vocab) the draft's (None: a deterministic draft, q = 1).
    A tree pass: `drafted` is its depth (the most it can keep) and `candidates` its node count."""
    ctx.record("verify_drafted", drafted)
    ctx.record("verify_candidates", drafted if candidates is None else candidates)
    ctx.record("verify_accepted", kept)
    ctx.record("verify_bonus", int(kept == drafted))
    ctx.record("draft_seconds", drafting)
    ctx.record("commit_seconds", committing)
    for i, token in enumerate(out):
        p = float(target[i, token])
        if i >= drafted:  # the bonus token: not drafted
            q = float("nan")
        elif draft_probs is None:  # a point mass on the draft token, which a resampled token never is
            q = 1.0 if i < kept else 0.0
        else:
            q = float(draft_probs[i, token])
        ctx.record("token_origin", "accepted" if i < kept else "bonus" if kept == drafted else "resampled")
        ctx.record("target_prob", p)
        ctx.record("draft_prob", q)
        ctx.record("accept_prob", min(1.0, p / q) if i < kept and q > 0 else float("nan"))


@dataclass
class ModelDrafting(Drafting):
    """A drafter that runs a model over a session of its own (kept in the run's state): it first feeds the tokens
    the target has and it has not, then drafts autoregressively as provisional `rollout` passes, which are
    committed as far as the target kept them and rolled back beyond. Subclasses say which session."""

    def draft_session(self, ctx):
        raise NotImplementedError

    def draft(self, ctx, pending: list[int]) -> tuple[list[int], torch.Tensor | None]:
        session = self.draft_session(ctx)
        logits = catch_up(session, ctx.tokens)
        tokens, probs, length = [], [], self.length(ctx)
        for i in range(length):
            probs.append(self.probabilities(logits[None])[0])  # q: for rejection sampling, and the telemetry
            tokens.append(self.pick(logits, probs[-1], ctx.rng))
            if i + 1 < length:
                logits = session.feed([tokens[-1]], "rollout", logits="last")[-1]
        return tokens, torch.stack(probs)

    def pick(self, logits: torch.Tensor, probs: torch.Tensor, generator) -> int:
        """A draft token: the argmax in greedy mode, else a draw from the draft's distribution `probs`."""
        return int(logits.argmax()) if self.greedy else int(torch.multinomial(probs, 1, generator=generator))

    def accepted(self, ctx, kept: int) -> None:
        session = ctx.state["draft_session"]
        session.commit(min(kept, session.position - session.committed))  # drafts it fed and the target kept


def catch_up(session, tokens: list[int]) -> torch.Tensor:
    """Feed a draft session the tokens of `tokens` (the target's sequence) it has not fed; (vocab,) logits for the
    token after them."""
    behind = tokens[session.position:]
    phase = "prefill" if session.position == 0 else "decode" if len(behind) == 1 else "append"
    return session.feed(behind, phase)[-1]


@dataclass
class SpeculativeDecoding(ModelDrafting):
    """Speculative decoding with a draft model that shares the target's tokenizer, over a full cache of its own."""

    name = "speculative"
    summary = "Speculative decoding: a small draft model proposes k tokens, the target verifies them in one pass."
    paper = ("Fast Inference from Transformers via Speculative Decoding (Leviathan, Kalman, Matias; ICML 2023); "
             "Accelerating LLM Decoding with Speculative Sampling (Chen et al., 2023)")

    draft_model: Any = param(None, "the draft model (same tokenizer as the target): a loaded workbench Model, or "
                                   "a name for workbench.load, loaded once (e.g. from the CLI or the panel)")

    def draft_session(self, ctx):
        from workbench.run.session import Session

        session = ctx.state.get("draft_session")
        if session is None:  # checked here, not at construction, so that describe() and the panel can build it
            draft_model = loaded(self.draft_model)
            check_same_vocabulary(ctx.session.model, draft_model)
            session = ctx.state["draft_session"] = Session(draft_model, "full", "sdpa")
        return session


def loaded(draft, decoder: str = "speculative", parameter: str = "draft_model"):
    """The draft model itself, or the one a name loads (once per name and process)."""
    from workbench.models import Model

    if isinstance(draft, Model):
        return draft
    if not isinstance(draft, str) or not draft:
        raise ParameterError(f"decoder '{decoder}' needs {parameter}=: a loaded workbench Model with the target's "
                             f"tokenizer (wb.load(...), wb.tiny(...)) or a name to load; got {draft!r}")
    return _load(draft)


@functools.lru_cache(maxsize=4)
def _load(name: str):
    from workbench.models import load

    return load(name)


def check_same_vocabulary(target, draft, role: str = "draft model", decoder: str = "speculative") -> None:
    """Refuse a second model whose tokenizer or vocabulary differs from the target's (`role`: what the decoder
    calls it; `decoder`: the decoder's name), since its tokens would mean other strings."""
    sizes = (target.text_config.vocab_size, draft.text_config.vocab_size)
    if sizes[0] != sizes[1] or target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
        raise ParameterError(f"the {role} {draft.name} has another tokenizer or vocabulary (sizes {sizes[1]} "
                             f"against the target's {sizes[0]}); decoder '{decoder}' needs the target's tokenizer")
