"""`sentence_kv`: each decoding query attends to the sentences whose mean key it matches best.

SentenceKV works at the granularity of sentences:

- sentences: the token ids of every forward pass (they travel with the pass) are decoded with the model's
  tokenizer; a sentence ends with a token containing '.', '!', '?' or a newline.
- summaries: a sentence's semantic vector, per layer and KV head, is the mean of the keys it holds there.
- selection: at each decoding step, per KV head, the sentences are scored by query . summary, summed over the
  group's query heads; the query attends to the sinks, the latest `window` tokens, the sentence it is in, and the
  `top_sentences` best of the other sentences (through the cache's attention mask).
- memory: SentenceKV's saving comes from offloading token KV to CPU and fetching the selected sentences; here every
  token stays in the cache (the selection saves compute only) unless `budget` is set: then, when a head holds more,
  whole sentences are evicted, the lowest-scoring for the latest query first (the current sentence last; the one
  that only partly fits loses its earliest tokens), sinks and window always kept.

`cache.layers[i].state["selected_fraction"]` holds, after each decoding step, the fraction of the layer's held
tokens the latest queries could see (absent before the first decoding step).

Simplified against the paper: sentences are split by punctuation rather than grouped by semantic similarity, the
summaries are recomputed from the held keys at every step instead of being kept apart from the offloaded KV, and
selection takes a fixed number of sentences rather than filling a token budget.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from workbench.cache.eviction import EvictionPolicy
from workbench.cache.kvcache import KVCache
from workbench.errors import ParameterError, WorkbenchError
from workbench.registry import param

SENTENCE_ENDS = (".", "!", "?", "\n")


@dataclass
class SentenceKV(EvictionPolicy):
    name = "sentence_kv"
    summary = ("Split the context into sentences (by punctuation); each decoding query attends to the sentences "
               "whose mean key it matches best, plus sinks, the recent window and its own sentence.")
    paper = ("SentenceKV: Efficient LLM Inference via Sentence-Level Semantic KV Caching "
             "(Zhu et al., arXiv 2025)")
    departs = ("sentences split by punctuation (not semantic grouping), summaries recomputed from the held "
                   "keys, a fixed number of sentences selected; without a budget nothing is offloaded or evicted")

    budget: int | None = param(None, "tokens kept per layer and KV head, evicting whole low-scoring sentences; "
                                     "None: keep every token (SentenceKV offloads rather than evicts)", min=1)
    top_sentences: int = param(8, "other sentences each decoding query attends to (besides sinks, window, its own)",
                               min=1)

    def validate(self) -> None:
        if self.budget is not None or self.ratio is not None:
            super().validate()

    @property
    def acts_while_decoding(self) -> bool:
        return True  # every decoding query selects its own sentences

    def build(self, model, forward=None) -> KVCache:
        if model.tokenizer is None:
            raise ParameterError("cache 'sentence_kv' needs the model's tokenizer to find sentence ends")
        cache = super().build(model, forward)
        cache.state["sentences"] = Sentences(model.tokenizer)
        return cache

    def begin_pass(self, cache, forward) -> None:
        super().begin_pass(cache, forward)
        if forward.token_ids is None:
            raise WorkbenchError("cache 'sentence_kv' needs the token ids of every forward pass to find sentences: "
                                 "run it through workbench (generate, Session or workbench.run.use_attention)")
        cache.state["sentences"].see(forward.start, forward.token_ids.tolist())

    def layer_budgets(self, base, num_layers, prompt_length):
        return [sys.maxsize if base is None else base] * num_layers

    def sentence_means(self, layer, sentence: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """(kv_heads, sentences, d): each sentence's mean key over the slots `seen` (bool (kv_heads, slots)) per head."""
        keys = layer.held_keys().float() * seen[..., None]
        count = layer.cache.state["sentences"].count
        sums = keys.new_zeros(keys.shape[0], count, keys.shape[-1]).scatter_add_(
            1, sentence[..., None].expand_as(keys), keys)
        counts = keys.new_zeros(keys.shape[0], count).scatter_add_(1, sentence, seen.float())
        return sums / counts.clamp_min(1)[..., None]

    def sentence_scores(self, layer, call, row: int, sentence: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """(kv_heads, sentences): query row `row` . each sentence's mean key, summed over each KV head's group."""
        query = call.query[0, :, row].float().view(sentence.shape[0], call.groups, -1)
        return (query @ self.sentence_means(layer, sentence, seen).transpose(1, 2)).sum(1)

    def score(self, layer, call, result) -> torch.Tensor:
        """Per token: the rank of its sentence for the latest query (its own sentence ranks first), plus a
        fraction growing with position, so whole sentences go lowest first and a cut one keeps its latest tokens."""
        sentences = layer.cache.state["sentences"]
        valid, positions = layer.valid(call), layer.positions()
        sentence = sentences.of(positions.clamp_min(0))
        newest = layer.newest(call)
        by_sentence = self.sentence_scores(layer, call, call.num_queries - 1, sentence, valid)
        by_sentence[:, sentences.of_position(newest)] = float("inf")
        rank = by_sentence.argsort(dim=1).argsort(dim=1).float()  # the rank of each sentence's score
        return rank.gather(1, sentence) + positions.float() / (newest + 1)

    def visible(self, layer, call) -> torch.Tensor | None:
        """Bool (kv_heads, q, slots): per decoding query, its sinks, its recent window, its own sentence and the
        `top_sentences` best other sentences. Sets layer.state["selected_fraction"] (a 0-d tensor)."""
        sentences = layer.cache.state["sentences"]
        if not call.decoding or self.top_sentences >= sentences.count:
            return None  # not decoding, or every sentence is selected: plain attention
        valid, positions = layer.valid(call), layer.positions()
        sentence = sentences.of(positions.clamp_min(0))
        visible = torch.zeros(positions.shape[0], call.num_queries, positions.shape[1], dtype=torch.bool,
                              device=positions.device)
        for row in range(call.num_queries):
            now = call.start + row
            seen = valid & (positions <= now)
            always = seen & ((positions < self.sinks) | (positions > now - self.window)
                             | (sentence == sentences.of_position(now)))
            partial = torch.zeros(sentence.shape[0], sentences.count, device=positions.device).scatter_add_(
                1, sentence, (seen & ~always).float()) > 0  # sentences not fully visible anyway
            scores = self.sentence_scores(layer, call, row, sentence, seen).masked_fill(~partial, float("-inf"))
            best = scores.topk(min(self.top_sentences, sentences.count), dim=1)
            chosen = torch.zeros_like(partial).scatter_(1, best.indices, best.values > float("-inf"))
            visible[:, row] = always | (seen & chosen.gather(1, sentence))
        held = valid[:, None, :]
        layer.state["selected_fraction"] = (visible & held).sum() / (held.sum() * call.num_queries)
        return visible


class Sentences:
    """The sentence id of every position seen so far, from the token ids and the tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ends: dict[int, bool] = {}  # token id -> whether it ends a sentence
        self.ids: list[int] = []  # per position
        self.closed: list[bool] = []  # per position: its token ends its sentence
        self._tensor: torch.Tensor | None = None

    @property
    def count(self) -> int:
        """Sentence ids given so far (the last may still be open)."""
        return self.ids[-1] + 1 if self.ids else 0

    def ends_sentence(self, token_id: int) -> bool:
        if token_id not in self.ends:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self.ends[token_id] = any(mark in text for mark in SENTENCE_ENDS)
        return self.ends[token_id]

    def see(self, start: int, token_ids: list[int]) -> None:
        """The tokens at positions start, start + 1, ... (anything recorded from `start` on is replaced: a pass
        after a rollback starts where the kept tokens end)."""
        del self.ids[start:], self.closed[start:]
        for token_id in token_ids:
            self.ids.append(0 if not self.ids else self.ids[-1] + self.closed[-1])
            self.closed.append(self.ends_sentence(token_id))
        self._tensor = None

    def of_position(self, position: int) -> int:
        return self.ids[position]

    def of(self, positions: torch.Tensor) -> torch.Tensor:
        """The sentence id at each position (a tensor of positions, any shape)."""
        if self._tensor is None or self._tensor.device != positions.device:
            self._tensor = torch.tensor(self.ids, dtype=torch.long, device=positions.device)
        return self._tensor[positions]
