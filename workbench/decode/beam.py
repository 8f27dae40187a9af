"""`beam`: beam search, as transformers' `generate(num_beams=...)` runs it.

Keep the `num_beams` best partial sequences by summed log-probability; at each step extend every one by every
token, keep the top K = max(2, 1 + #eos) * num_beams candidates, send those that end (an eos, or the length limit)
among the top num_beams to the finished pool with score sum log p / len ** length_penalty, and continue with the
best num_beams that did not end. The pool keeps the best num_beams; the best of it is the output. When to stop
(`early_stopping`), transformers' three rules:
  True    -- as soon as num_beams hypotheses are finished;
  False   -- also when the best running beam, scored at its current length, cannot beat the worst finished one
             (transformers' heuristic, its default);
  "never" -- the same test with the best length a running beam could reach when length_penalty > 0 (the
             canonical rule only with length_penalty = 0).
Every step mirrors transformers' `_beam_search` (candidate order, the -1e9 masks, ties broken by `topk`), so the
tokens equal `model.generate(num_beams=N, do_sample=False, length_penalty=..., early_stopping=...)`'s.

How it runs here: the whole search happens on the run's first step, from the prefill's logits, over sessions of
its own, one per live beam, forked from the run's session (`Session.fork`: a copy of the cache, so an evicting
cache policy and the attention variant apply to every beam as they apply to the run); a beam chosen by several
candidates is forked once per extra child. The chosen hypothesis is kept in the run's state, and each step then
emits its next token while the run's session feeds it as a plain decode pass, so the trace (entropy, attention,
cache) describes the emitted sequence, re-fed. Cost: about (num_beams + 1) x greedy's forward passes, one cache
per beam held at once, and a cache copy for each beam chosen twice in a step. The run's cache figures (peak
bytes, the trace's cache variables) are its own session's: the beams' caches are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.decode.base import Decoder
from workbench.errors import ParameterError, WorkbenchError
from workbench.registry import param

EARLY_STOPPING = (True, False, "never")
NEG = -1.0e9  # transformers' mask for candidates that must not be chosen


@dataclass
class Beam(Decoder):
    name = "beam"
    summary = "Beam search: the best-scoring sequence among num_beams kept partial sequences (transformers')."
    paper = ("Sequence to Sequence Learning with Neural Networks (Sutskever, Vinyals, Le; NeurIPS 2014), as "
             "transformers' generate(num_beams=...) runs it")
    departs = ("transformers' rules, not the paper's plain search: its length penalty (sum log p / len**lp), its "
               "early_stopping heuristics, K = max(2, 1 + #eos) x num_beams candidates per step, num_beams=1 is "
               "greedy; beams run as separate batch-1 sessions (one pass per beam per step) instead of one "
               "batched pass, so near-ties may break differently than in a batched run; the search happens at "
               "the run's first step and the run's session then re-feeds the chosen tokens")

    lossless = False  # a search over sequences, not a draw from `probabilities`

    num_beams: int = param(4, "partial sequences kept at each step (1: greedy, as transformers runs it)", min=1)
    length_penalty: float = param(1.0, "finished score = sum log p / length ** length_penalty (> 0 favours longer, "
                                       "< 0 shorter)")
    early_stopping: bool | str = param(False, "stop when num_beams are finished (True), when no running beam can "
                                              "win by transformers' heuristic (False), or by the best length "
                                              "reachable ('never')", choices=EARLY_STOPPING)

    def __post_init__(self) -> None:
        # types first: the registry's range check would compare a string with a number
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int):
            raise ParameterError(f"decoder 'beam' parameter 'num_beams' must be an integer >= 1, got "
                                 f"{self.num_beams!r}")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)):
            raise ParameterError(f"decoder 'beam' parameter 'length_penalty' must be a number, got "
                                 f"{self.length_penalty!r}")
        if not any(self.early_stopping is c or self.early_stopping == c and isinstance(c, str)
                   for c in EARLY_STOPPING):
            raise ParameterError(f"decoder 'beam' parameter 'early_stopping' is {self.early_stopping!r}; allowed: "
                                 "True, False, 'never'")
        self.length_penalty = float(self.length_penalty)
        super().__post_init__()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's next-token distribution, over which the search runs (not what the tokens follow)."""
        return torch.softmax(logits.float(), dim=-1)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise WorkbenchError("decoder 'beam' chooses in step(ctx): it searches over sequences, through sessions")

    def step(self, ctx) -> list[int]:
        if self.num_beams == 1:  # transformers runs num_beams=1 as greedy decoding, not as a beam of one
            return [int(ctx.logits.argmax())]
        plan = ctx.state.get("beam")
        if plan is None:
            if ctx.pending or not ctx.logits_seen:
                raise WorkbenchError("decoder 'beam' searches from the prefill's logits: it must drive the run "
                                     "from its first step")
            if ctx.remaining is None:
                raise WorkbenchError("decoder 'beam' needs a length limit (max_new_tokens)")
            plan = ctx.state["beam"] = self.search(ctx.session, ctx.logits, ctx.remaining, ctx.stop_ids)
            ctx.state["beam_at"] = 0
        at = ctx.state["beam_at"]
        if at >= len(plan):
            raise WorkbenchError(f"decoder 'beam' chose {len(plan)} tokens, which ended without an eos")
        ctx.state["beam_at"] = at + 1
        ctx.logits  # noqa: B018  (the run's session feeds the previous chosen token: its trace follows the output)
        return [plan[at]]

    def search(self, session, logits: torch.Tensor, length: int, stop_ids) -> list[int]:
        """The best finished hypothesis (its new tokens) of a beam search of at most `length` tokens after the
        state of `session`, whose next-token logits are `logits` (vocab,); `session` itself is not fed."""
        beams, lp, stopping = self.num_beams, self.length_penalty, self.early_stopping
        k = max(2, 1 + len(stop_ids)) * beams
        device = logits.device
        stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        top_mask = torch.arange(k, device=device) < beams  # only the top num_beams candidates may finish
        base = session.fork()
        base.cache.record_events = False  # nobody reads a beam's evictions
        sessions = [base] * beams  # every beam starts as the prompt; beams 1.. are masked out at -1e9
        running = [[] for _ in range(beams)]
        running_scores = torch.zeros(beams, device=device)
        running_scores[1:] = NEG
        finished: list[list[int]] = [[] for _ in range(beams)]
        finished_scores = torch.full((beams,), NEG, device=device)
        is_finished = torch.zeros(beams, dtype=torch.bool, device=device)
        unsatisfied = torch.ones((), dtype=torch.bool, device=device)  # improvement still possible (sticky)
        rows = logits.float()[None].expand(beams, -1)
        done = 0  # tokens in every running beam
        while True:
            log_probs = torch.log_softmax(rows, dim=-1) + running_scores[:, None]
            vocab = log_probs.shape[-1]
            top_scores, top_index = torch.topk(log_probs.reshape(-1), k)
            parents, tokens = (top_index // vocab).tolist(), top_index % vocab
            candidates = [running[p] + [t] for p, t in zip(parents, tokens.tolist())]
            hits = torch.isin(tokens, stops) | (done + 1 >= length)
            # the best num_beams candidates that did not end continue
            alive = top_scores + hits.float() * NEG
            order = torch.topk(alive, beams).indices
            running, running_scores = [candidates[i] for i in order.tolist()], alive[order]
            chosen = [(parents[i], candidates[i][-1]) for i in order.tolist()]
            # those among the top num_beams that ended join the pool if they beat its worst
            ended = hits & top_mask
            scores = top_scores / ((done + 1) ** lp)
            scores = scores + (bool(is_finished.all()) and stopping is True) * NEG
            scores = scores + (~unsatisfied).float() * NEG
            scores = scores + (~ended).float() * NEG
            merged = torch.cat((finished_scores, scores))
            keep = torch.topk(merged, beams).indices
            pool = finished + candidates
            finished = [pool[i] for i in keep.tolist()]
            finished_scores, is_finished = merged[keep], torch.cat((is_finished, ended))[keep]
            done += 1
            reach = length if stopping == "never" and lp > 0.0 else done
            best_possible = running_scores[:1] / (reach ** lp)
            worst = torch.where(is_finished, finished_scores.min(), torch.tensor(NEG, device=device))
            unsatisfied = unsatisfied & (best_possible > worst).any()
            if not (bool(unsatisfied) and not (bool(is_finished.all()) and stopping is True) and not bool(hits.all())):
                break
            sessions = _branch(sessions, chosen)
            rows = torch.stack([s.feed([token], "decode")[-1] for s, (_, token) in zip(sessions, chosen)])
        return finished[0] or running[0]  # nothing finished (every beam masked out): the best running one


def _branch(sessions: list, chosen: list[tuple[int, int]]) -> list:
    """The session of each new beam, before its token is fed: its parent's, moved to the first child that
    takes it and forked for every other (forks first, so that each copies the parent's state)."""
    taken: set[int] = set()
    out = []
    for parent, _ in chosen:
        session = sessions[parent]
        if id(session) in taken:
            session = session.fork()
        else:
            taken.add(id(session))
        out.append(session)
    return out
