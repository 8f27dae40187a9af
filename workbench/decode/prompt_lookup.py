"""`prompt_lookup`: speculative decoding whose draft is copied from the text so far (no draft model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.decode.speculative import SCHEDULES, Drafting
from workbench.registry import param


@dataclass
class PromptLookup(Drafting):
    """Prompt lookup decoding: the last n tokens (n from `max_ngram` down to 1, the longest that matches) are
    looked up in the prompt and the text generated so far; the `k` tokens that followed their MOST RECENT earlier
    occurrence are the draft, verified in one pass. Inputs that the output copies from (summaries, edits, code
    changes, retrieval answers) accept long drafts; open-ended text accepts few.

    The n-gram index (n-gram -> the latest position after it) lives in the run's state and grows by the new tokens
    of each step, so a lookup costs a dictionary access, not a scan of the text. transformers' prompt lookup scans
    the text and takes the EARLIEST match instead, with a constant draft length; both are lossless.

    The default draft length follows SmartSpec's goodput rule (see Drafting and `verify_profile`): the run's
    measured acceptance against the verify cost of each length, profiled once per model and process (about 1.5 s
    for k = 10 on the embedded model on CPU). Measured on the embedded model on CPU (bench/decode.py, 96 tokens):
    on the input-grounded prompt 1.57x greedy with goodput, 1.23x with transformers' heuristic (+2 / -1) and 1.30x
    for transformers' own constant 10-token prompt lookup; on open-ended text all of ours stay at 1.0x greedy where
    the constant draft falls to 0.76x. The rule mostly drafts 2 tokens there: on a 2-core CPU a pass of 4 tokens
    costs 1.5x one of 3."""

    name = "prompt_lookup"
    summary = "Prompt lookup decoding: draft the tokens that followed the latest match of the last n-gram."
    paper = "Prompt Lookup Decoding (Saxena, 2023; transformers' prompt_lookup_num_tokens)"
    departs = ("the most recent match of the longest n-gram (transformers: the earliest), and SmartSpec's goodput "
               "rule for the draft length by default (transformers: constant)")

    k: int = param(10, "draft tokens per verify pass (at most; the first pass's)", min=1)
    schedule: str = param("goodput", "draft length: SmartSpec's goodput rule (the default here: the best length "
                                     "up to k from measured acceptance and verify costs), transformers' heuristic "
                                     "(+2 / -1) or a constant k", choices=SCHEDULES)
    max_ngram: int = param(3, "longest n-gram looked up (then shorter ones)", min=1)

    def draft(self, ctx, pending: list[int]) -> tuple[list[int], torch.Tensor | None]:
        index = ctx.state.setdefault("ngrams", NgramIndex(self.max_ngram))
        tokens = ctx.tokens
        index.extend(tokens)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            start = index.latest.get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start:start + self.length(ctx)], None
        return [], None


class NgramIndex:
    """For every n-gram (n <= longest) of a growing token list: the position right after its latest occurrence
    that has a token after it (so the tail's own occurrence is never its match)."""

    def __init__(self, longest: int):
        self.longest = longest
        self.latest: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in the index

    def extend(self, tokens: list[int]) -> None:
        for end in range(max(self.indexed, 1), len(tokens)):  # an n-gram ending at `end` has tokens[end] after it
            for n in range(1, min(self.longest, end) + 1):
                self.latest[tuple(tokens[end - n:end])] = end
        self.indexed = max(self.indexed, len(tokens))
