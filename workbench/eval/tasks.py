"""Evaluation task generators: seeded, sized in the model's own tokens.

Retrieval tasks hide needles (a pass key, a magic number) in a haystack of filler sentences and ask for them:
    Passkey    one pass key, one question                      (Mohtashami & Jaggi 2023; StreamingLLM's test)
    Needle     one "special magic number" sentence, one question (needle-in-a-haystack, RULER's NIAH wording)
    MultiKey   several labelled pass keys, one question about one of them (the others are distractors)
    MultiTurn  several labelled pass keys, all asked, one per turn, over ONE cache filled and compressed at the
               first turn and reused (SCBench's shared-context setting: later questions were not in view when
               the cache chose what to keep)
Perplexity     a window of datasets/harbor_town.txt: a context, then a continuation scored token by token.

    sample = Passkey(length=2000, depth=0.5).make(model, seed=0)     # length: prompt tokens with the template
    sample.messages(), sample.answers, sample.depths, sample.tokens

The question of the first turn comes after the context, so it sits inside a query-aware policy's observation
window (SnapKV's last 32 tokens) when the prompt is compressed.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from workbench.errors import ParameterError
from workbench.eval import data

SYSTEM = "You are a helpful assistant."
PASSKEY_INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                       "Find it and memorize it. I will quiz you about it.")
ANSWER_FORMAT = "Answer with the number only."
DOOR_LABELS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "golden",
               "brown", "grey", "pink", "violet", "copper", "bronze")
NEEDLE_WORDS = ("lighthouse", "violin", "harbor", "lantern", "compass", "anchor", "ferry", "salt", "raven",
                "orchard", "teapot", "glacier", "meadow", "falcon", "quarry", "chimney")


# -- samples -----------------------------------------------------------------------------------------------------
@dataclass
class RetrievalSample:
    """A context with needles and the questions asked about it; `answers[i]` answers `questions[i]`."""

    task: str
    seed: int
    instruction: str
    context: str
    questions: list[str]
    answers: list[str]
    depths: list[float]  # per needle: the fraction of the context's tokens before it
    system: str | None = SYSTEM
    tokens: int = 0  # tokens of the first turn's prompt, chat template included
    kind: ClassVar[str] = "retrieval"

    def messages(self, replies: list[str] | tuple = ()) -> list[dict[str, str]]:
        """The chat up to the next question: the context with the first question, then per earlier reply
        the reply and the following question."""
        chat = [{"role": "system", "content": self.system}] if self.system else []
        chat.append({"role": "user", "content": f"{self.instruction}\n\n{self.context}\n\n{self.questions[0]}"})
        for reply, question in zip(replies, self.questions[1:]):
            chat += [{"role": "assistant", "content": reply}, {"role": "user", "content": question}]
        return chat


@dataclass
class TextSample:
    """A context and the continuation whose tokens are scored (perplexity)."""

    task: str
    seed: int
    context_ids: list[int]
    continuation_ids: list[int]
    offset: int  # where the context starts in the text, in tokens
    kind: ClassVar[str] = "perplexity"

    @property
    def tokens(self) -> int:
        return len(self.context_ids) + len(self.continuation_ids)


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text of a chat, ready for the assistant's reply: the tokenizer's chat template, or for
    tokenizers without one a plain layout ("...question\\nAnswer:", replies verbatim after it)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    parts = []
    for message in messages:
        role, content = message["role"], message["content"]
        parts.append(content + ("\nAnswer:" if role == "user" else "\n\n"))
    return "".join(parts)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of already rendered text (the template put in any special tokens)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- tasks -------------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """Base of task generators. `make(model_or_tokenizer, seed)` returns one sample; the same seed gives the
    same sample. `label` names the task in results (default: the class's `name`)."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    label: str | None = field(default=None, kw_only=True)

    def __post_init__(self):
        self.label = self.label or self.name

    def make(self, tokenizer, seed: int):
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def rng(self, seed: int) -> random.Random:
        return random.Random(f"{self.name}:{seed}")  # str seeds are hashed deterministically by random


@dataclass
class _Retrieval(Task):
    """Shared by the needle tasks: a prompt of `length` tokens (within `tolerance`) with needles in filler."""

    length: int = 2000
    filler: str | Path = "repeat"
    digits: int = 5
    tolerance: int = 16
    kind: ClassVar[str] = "retrieval"
    instruction: ClassVar[str] = PASSKEY_INSTRUCTION

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.length, int) or self.length < 64:
            raise ParameterError(f"task '{self.label}' length must be an integer >= 64 tokens, got {self.length!r}")
        if not isinstance(self.digits, int) or not 1 <= self.digits <= 12:
            raise ParameterError(f"task '{self.label}' digits must be 1..12, got {self.digits!r}")
        data.filler_sentences(self.filler)  # fails early on an unknown filler

    def make(self, tokenizer, seed: int) -> RetrievalSample:
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        rng = self.rng(seed)
        needles, questions, answers = self.needles(rng)
        units = data.filler_sentences(self.filler)
        start = rng.randrange(len(units))
        sample = RetrievalSample(self.label, seed, self.instruction, "", questions, answers, [])
        fixed = len(encode(tokenizer, render(tokenizer, sample.messages())))
        least = fixed + len(encode(tokenizer, " " + " ".join(sentence for sentence, _ in needles)))
        if least > self.length + self.tolerance:
            raise ParameterError(f"task '{self.label}' length {self.length} is too short: the instruction, "
                                 f"question(s), template and needles alone take {least} tokens")
        target = self.length - fixed
        for _ in range(4):  # the pieces' token counts add up to within a few tokens of the whole; correct twice
            sample.context, sample.depths = haystack(tokenizer, units, start, needles, max(target, 1))
            sample.tokens = len(encode(tokenizer, render(tokenizer, sample.messages())))
            if abs(sample.tokens - self.length) <= self.tolerance:
                return sample
            target -= sample.tokens - self.length
        raise ParameterError(f"task '{self.label}' could not fit {self.length} +- {self.tolerance} tokens (got "
                             f"{sample.tokens}); raise the tolerance")

    def needles(self, rng: random.Random) -> tuple[list[tuple[str, float]], list[str], list[str]]:
        """(needle sentences with their requested depths, questions, answers)."""
        raise NotImplementedError

    def draw_keys(self, rng: random.Random, count: int) -> list[str]:
        """`count` distinct numbers of `digits` digits."""
        low = 10 ** (self.digits - 1) if self.digits > 1 else 0
        return [str(k) for k in rng.sample(range(low, 10 ** self.digits), count)]


def _depth(value, rng: random.Random, label: str) -> float:
    """A depth in [0, 1], or a (low, high) range drawn from per seed."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        low, high = map(float, value)
        if not 0 <= low <= high <= 1:
            raise ParameterError(f"task '{label}' depth range must satisfy 0 <= low <= high <= 1, got {value!r}")
        return rng.uniform(low, high)
    if isinstance(value, (int, float)) and 0 <= value <= 1:
        return float(value)
    raise ParameterError(f"task '{label}' depth must be a number in [0, 1] or a (low, high) range, got {value!r}")


@dataclass
class Passkey(_Retrieval):
    """One pass key at `depth` (a fraction of the context, or a (low, high) range drawn per seed)."""

    name: ClassVar[str] = "passkey"
    depth: float | tuple[float, float] = 0.5

    def needles(self, rng):
        depth = _depth(self.depth, rng, self.label)
        key = self.draw_keys(rng, 1)[0]
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        return [(needle, depth)], [f"What is the pass key? {ANSWER_FORMAT}"], [key]


@dataclass
class Needle(_Retrieval):
    """RULER-style needle: "One of the special magic numbers for <word> is: <number>." in (by default) prose."""

    name: ClassVar[str] = "needle"
    instruction: ClassVar[str] = ("Some special magic numbers are hidden within the following text. Make sure to "
                                  "memorize it. I will quiz you about the numbers afterwards.")
    filler: str | Path = "text"
    digits: int = 7
    depth: float | tuple[float, float] = 0.5

    def needles(self, rng):
        depth = _depth(self.depth, rng, self.label)
        word, number = rng.choice(NEEDLE_WORDS), self.draw_keys(rng, 1)[0]
        needle = f"One of the special magic numbers for {word} is: {number}."
        question = f"What is the special magic number for {word} mentioned in the provided text? {ANSWER_FORMAT}"
        return [(needle, depth)], [question], [number]


@dataclass
class MultiKey(_Retrieval):
    """`keys` labelled pass keys spread evenly over `depths` (low, high); one question about one of them."""

    name: ClassVar[str] = "multikey"
    keys: int = 4
    depths: tuple[float, float] = (0.1, 0.9)
    questions_asked: ClassVar[int | None] = 1

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.keys, int) or not 1 <= self.keys <= len(DOOR_LABELS):
            raise ParameterError(f"task '{self.label}' keys must be 1..{len(DOOR_LABELS)}, "
                                 f"got {self.keys!r}")
        low, high = self.depths
        if not 0 <= low <= high <= 1:
            raise ParameterError(f"task '{self.label}' depths must satisfy 0 <= low <= high <= 1, got {self.depths!r}")

    def needles(self, rng):
        n = self.keys
        labels = rng.sample(DOOR_LABELS, n)
        keys = self.draw_keys(rng, n)
        low, high = self.depths
        spots = [low + (high - low) * i / max(n - 1, 1) for i in range(n)] if n > 1 else [(low + high) / 2]
        needles = [(f"The pass key for the {label} door is {key}.", depth)
                   for label, key, depth in zip(labels, keys, spots)]
        order = rng.sample(range(n), n)[: self.questions_asked or n]
        questions = [f"What is the pass key for the {labels[i]} door? {ANSWER_FORMAT}" for i in order]
        return needles, questions, [keys[i] for i in order]


@dataclass
class MultiTurn(MultiKey):
    """MultiKey with every key asked, one per turn, over one cache compressed once (at the first turn)."""

    name: ClassVar[str] = "multiturn"
    questions_asked: ClassVar[int | None] = None


@dataclass
class Perplexity(Task):
    """A window of `context` + `continuation` tokens of a text (default datasets/harbor_town.txt), at an offset
    drawn per seed. The continuation's tokens are scored given the context held in the cache."""

    name: ClassVar[str] = "perplexity"
    kind: ClassVar[str] = "perplexity"
    context: int = 2000
    continuation: int = 128
    text: str | Path = data.TEXT

    def __post_init__(self):
        super().__post_init__()
        for what in ("context", "continuation"):
            value = getattr(self, what)
            if not isinstance(value, int) or value < 1:
                raise ParameterError(f"task '{self.label}' {what} must be an integer >= 1 token, got {value!r}")

    def make(self, tokenizer, seed: int) -> TextSample:
        ids = encode(tokenizer, data.read_text(self.text))
        need = self.context + self.continuation
        if len(ids) < need:
            raise ParameterError(f"task '{self.label}': the text has {len(ids)} tokens, fewer than context + "
                                 f"continuation = {need}; shorten them or give a longer text")
        offset = self.rng(seed).randint(0, len(ids) - need)
        window = ids[offset:offset + need]
        return TextSample(self.label, seed, window[:self.context], window[self.context:], offset)


@dataclass
class PromptSample:
    """A chat prompt to generate from (speed)."""

    task: str
    seed: int
    messages: list[dict[str, str]]
    new_tokens: int
    kind: ClassVar[str] = "speed"


@dataclass
class Speed(Task):
    """Generation speed: `new_tokens` tokens generated after a chat prompt (end-of-sequence ignored, so every
    configuration generates the same number). The prompt is one of a few open-ended requests, chosen per seed
    (or `prompt` when given). Measured in `wb.sweep`; `evaluate` runs retrieval and perplexity tasks only."""

    name: ClassVar[str] = "speed"
    kind: ClassVar[str] = "speed"
    new_tokens: int = 32
    prompt: str | None = None

    PROMPTS: ClassVar[tuple[str, ...]] = (
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Explain to a ten-year-old how a steam engine works.",
        "Describe a walk through a busy harbor town at dawn.",
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.new_tokens, bool) or not isinstance(self.new_tokens, int) or self.new_tokens < 1:
            raise ParameterError(f"task '{self.label}' new_tokens must be an integer >= 1, got {self.new_tokens!r}")

    def make(self, tokenizer, seed: int) -> PromptSample:
        prompt = self.prompt or self.PROMPTS[seed % len(self.PROMPTS)]
        return PromptSample(self.label, seed, [{"role": "user", "content": prompt}], self.new_tokens)


TASKS = {cls.name: cls for cls in (Passkey, Needle, MultiKey, MultiTurn, Perplexity, Speed)}


# -- the haystack ----------------------------------------------------------------------------------------------
def haystack(tokenizer, units: list[str], start: int, needles: list[tuple[str, float]],
             target: int) -> tuple[str, list[float]]:
    """Filler sentences (cycling through `units` from `start`) with each needle inserted at the sentence boundary
    nearest its depth, about `target` tokens in all. Returns the text and each needle's actual depth (the
    fraction of the text's tokens before it), in the order given."""
    count = _counter(tokenizer)
    needle_tokens = sum(count(sentence) for sentence, _ in needles)
    fill = max(target - needle_tokens, 0)
    chosen, sizes, total = [], [], 0
    while total < fill:
        unit = units[(start + len(chosen)) % len(units)]
        size = count(unit)
        if total + size > fill:  # the last sentence is cut to the words that fit
            unit = _words_that_fit(unit, fill - total, count)
            size = count(unit) if unit else 0
            if not unit:
                break
        chosen.append(unit)
        sizes.append(size)
        total += size
    before = [0]
    for size in sizes:
        before.append(before[-1] + size)
    whole = total + needle_tokens
    # the boundary for each needle: the filler and the shallower needles before it come closest to depth * whole
    spots = []
    for i, (_, depth) in enumerate(needles):
        shallower = sum(count(s) for j, (s, d) in enumerate(needles) if d < depth or (d == depth and j < i))
        spots.append(min(range(len(before)), key=lambda b: abs(before[b] + shallower - depth * whole)))
    pieces = list(chosen)
    for spot, _, sentence in sorted(((spot, i, needles[i][0]) for i, spot in enumerate(spots)), reverse=True):
        pieces.insert(spot, sentence)  # insert from the back so earlier indices stay valid
    depths = []
    for i, ((sentence, _), spot) in enumerate(zip(needles, spots)):
        earlier = sum(count(s) for j, (s, _) in enumerate(needles) if spots[j] < spot or (spots[j] == spot and j < i))
        depths.append((before[spot] + earlier) / max(whole, 1))
    return " ".join(pieces), depths


def _words_that_fit(sentence: str, room: int, count) -> str:
    """The longest word prefix of `sentence` of at most `room` tokens ("" if not even one word fits)."""
    words = sentence.split(" ")
    low, high = 0, len(words)  # binary search on the number of words
    while low < high:
        mid = (low + high + 1) // 2
        if count(" ".join(words[:mid])) <= room:
            low = mid
        else:
            high = mid - 1
    return " ".join(words[:low])


def _counter(tokenizer):
    cache: dict[str, int] = {}

    def count(sentence: str) -> int:
        if sentence not in cache:
            cache[sentence] = len(encode(tokenizer, " " + sentence))
        return cache[sentence]
    return count


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
