"""Answer a retrieval sample's questions turn by turn over ONE cache (SCBench's shared-context setting).

Turn 1 prefills the whole first prompt (context + first question) in one forward pass, so a compressing cache
compresses the context once, with the first question in view. Each later turn appends only the new tokens - the
end of the previous reply and the next question, as the chat template renders them - to the same, already
compressed cache, as an "append" pass (a prefill-only policy does not re-compress the first turn). Replies are greedy and stop at an end-of-sequence token or after `max_new_tokens`.
A single-question sample is just a one-turn conversation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.run import Session
from workbench.eval.prefill import prefill
from workbench.eval.tasks import RetrievalSample, encode, render


@dataclass
class Conversation:
    replies: list[str]  # the model's replies, one per question (special tokens removed, stripped)
    correct: list[bool]  # per question: is the first number in the reply the expected answer
    peak_cache_bytes: int  # the most at any moment (a turn's uncompressed prefill included)
    held_cache_bytes: int  # the most held after a forward pass
    prompt_tokens: int  # tokens of the first turn's prompt
    reply_ids: list[list[int]] = field(default_factory=list)
    replayed: bool = False  # the first prompt's prefill was replayed from a PrefillRecord

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


def prompt_ids(model, sample: RetrievalSample) -> list[int]:
    """The first turn's prompt tokens (what converse prefills)."""
    return encode(model.tokenizer, render(model.tokenizer, sample.messages()))


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def is_correct(reply: str, answer: str) -> bool:
    """The first number in the reply is the answer (a reply naming a distractor first is wrong)."""
    return first_number(reply) == answer


def converse(model, sample: RetrievalSample, cache: Any = "full", max_new_tokens: int = 16,
             attention: Any = "sdpa", record=None, router: Any = "native") -> Conversation:
    """Ask the sample's questions in turn over one cache of policy `cache`; score each reply.
    record -- a PrefillRecord of the first prompt to replay instead of running the prefill (see prefill.py)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise WorkbenchError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    tokenizer = model.tokenizer
    stop = model.eos_token_ids
    replies, reply_ids = [], []
    fed_text = render(tokenizer, sample.messages())
    inputs = prompt_ids(model, sample)
    prompt_tokens = len(inputs)
    limit = model.max_positions
    replayed = False
    with Session(model, cache, attention, router=router) as session:
        for turn in range(len(sample.questions)):
            if turn > 0:
                inputs, fed_text = _next_turn(tokenizer, sample, replies, reply_ids[-1], fed_text)
            if limit is not None and session.position + len(inputs) + max_new_tokens > limit:
                raise WorkbenchError(f"turn {turn + 1} of sample '{sample.task}' would pass the model's context "
                                     f"of {limit} tokens; use a shorter length or fewer new tokens")
            generated: list[int] = []
            for step in range(max_new_tokens):
                if turn == 0 and step == 0:
                    logits, replayed = prefill(session, inputs, record)
                else:
                    logits = session.feed(inputs, "append" if step == 0 else "decode")
                token = int(torch.argmax(logits[-1]))
                generated.append(token)
                if token in stop:
                    break
                inputs = [token]
            reply_ids.append(generated)
            replies.append(model.decode(generated, skip_special_tokens=True))
    stripped = [r.strip() for r in replies]
    return Conversation(stripped, [is_correct(r, a) for r, a in zip(stripped, sample.answers)], session.peak_bytes,
                        session.held_peak_bytes, prompt_tokens, reply_ids, replayed)


def _next_turn(tokenizer, sample, replies, last_reply_ids, fed_text):
    """The tokens that bring the cache from the end of the last reply to the next question's prompt.

    The cache holds the previous prompt and all reply tokens but the last (which was chosen, not yet fed). The
    template renders the reply verbatim, so the new text is the reply's text plus a tail: feed the last reply
    token and the tail's tokens."""
    full = render(tokenizer, sample.messages(replies))
    reply_text = tokenizer.decode(last_reply_ids, skip_special_tokens=False)
    delta = full[len(fed_text):] if full.startswith(fed_text) else None
    if delta is None or not delta.startswith(reply_text):
        raise WorkbenchError("the tokenizer's chat template does not render earlier turns verbatim, so a later turn "
                             "cannot be appended to the cache; multi-turn tasks need a prefix-stable template")
    return [last_reply_ids[-1]] + encode(tokenizer, delta[len(reply_text):]), full
