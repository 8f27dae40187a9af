"""`sentence_kv`: each decoding query attends to the sentences whose mean key it matches best.

SentenceKV works at the granularity of sentences:

- sentences: the token ids of every forward pass (the cache's `see_tokens` hook) are decoded with the model's
  tokenizer; a sentence ends with a token containing '.', '!', '?' or a newline.
- summaries: a sentence's semantic vector, per layer and KV head, is the mean of the keys it holds there.
- selection: at each decoding step, per KV head, the sentences are scored by query . summary, summed over the
  group's query heads; the query attends to the sinks, the latest `window` tokens, the sentence it is in, and the
  `top_sentences` best of the other sentences (through the cache's attention mask).
- memory: SentenceKV's saving comes from offloading token KV to CPU and fetching the selected sentences; here every
  token stays in the cache (the selection saves compute only) unless `budget` is set: then, when a head holds more,
  whole sentences are evicted, the lowest-scoring for the latest query first (the current sentence last; the one
  that only partly fits loses its earliest tokens), sinks and window always kept.

`cache.selected_fraction[layer]` holds, after each decoding step, the fraction of the layer's held tokens that
the latest query could see (None before the first decoding step).

Simplified against the paper: sentences are split by punctuation rather than grouped by semantic similarity, the
summaries are recomputed from the held keys at every step instead of being kept apart from the offloaded KV, and
selection takes a fixed number of sentences rather than filling a token budget.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from workbench.cache.eviction import EvictingCache, EvictionPolicy
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

    budget: int | None = param(None, "tokens kept per layer and KV head, evicting whole low-scoring sentences; "
                                     "None: keep every token (SentenceKV offloads rather than evicts)", min=1)
    top_sentences: int = param(8, "other sentences each decoding query attends to (besides sinks, window, its own)",
                               min=1)

    def validate(self) -> None:
        if self.budget is not None or self.ratio is not None:
            super().validate()

    def build(self, model) -> SentenceKVCache:
        return SentenceKVCache(model.config, self, model.tokenizer)

    def layer_budgets(self, base, num_layers, prompt_length):
        return [sys.maxsize if base is None else base] * num_layers

    def sentence_scores(self, keys: torch.Tensor, sentence: torch.Tensor, query: torch.Tensor):
        """For one head: the sentence ids it holds, each token's index into them, and each sentence's score,
        query (group heads, d) . the sentence's mean key, summed over the group's heads."""
        ids, inverse = torch.unique(sentence, return_inverse=True)
        sums = keys.new_zeros(len(ids), keys.shape[-1]).float().index_add_(0, inverse, keys.float())
        counts = torch.bincount(inverse, minlength=len(ids)).clamp_min(1)
        return ids, inverse, (query.float() @ (sums / counts[:, None]).T).sum(0)

    def score(self, state, head, call, result) -> torch.Tensor:
        """Per token: the rank of its sentence for the latest query (its own sentence ranks first), plus a
        fraction growing with position, so whole sentences go lowest first and a cut one keeps its latest tokens."""
        positions = state.layer.head_positions[head]
        sentence = state.sentences.of(positions)
        groups = call.groups
        query = call.query[0, head * groups:(head + 1) * groups, -1]
        ids, inverse, scores = self.sentence_scores(state.layer.head_keys[head], sentence, query)
        scores[ids == sentence[-1]] = float("inf")
        rank = torch.empty(len(ids), dtype=torch.long, device=positions.device)
        rank[scores.argsort()] = torch.arange(len(ids), device=positions.device)
        return rank[inverse].float() + positions.float() / (float(positions.max()) + 1)


class Sentences:
    """The sentence id of every position seen so far, from the token ids and the tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ends: dict[int, bool] = {}  # token id -> whether it ends a sentence
        self.ids = torch.zeros(0, dtype=torch.long)  # per position
        self.next = 0  # the id the next token's sentence gets

    def ends_sentence(self, token_id: int) -> bool:
        if token_id not in self.ends:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self.ends[token_id] = any(mark in text for mark in SENTENCE_ENDS)
        return self.ends[token_id]

    def see(self, token_ids: list[int]) -> None:
        ids = []
        for token_id in token_ids:
            ids.append(self.next)
            if self.ends_sentence(token_id):
                self.next += 1
        self.ids = torch.cat([self.ids, torch.tensor(ids, dtype=torch.long)])

    def of(self, positions: torch.Tensor) -> torch.Tensor:
        if len(positions) and int(positions.max()) >= len(self.ids):
            raise WorkbenchError("cache 'sentence_kv' needs the token ids of every forward pass to find sentences: "
                                 "use workbench.generate, or call cache.see_tokens(input_ids) before each forward")
        return self.ids.to(positions.device)[positions]


class SentenceKVCache(EvictingCache):
    """An evicting cache that tracks sentences and masks each decoding query to its selected sentences."""

    def __init__(self, config, policy: SentenceKV, tokenizer):
        super().__init__(config, policy)
        if tokenizer is None:
            raise ParameterError("cache 'sentence_kv' needs the model's tokenizer to find sentence ends")
        self.sentences = Sentences(tokenizer)
        for state in self.states:
            state.sentences = self.sentences
        self.selected_fraction: list[float | None] = [None] * self.num_layers

    def see_tokens(self, input_ids: torch.Tensor) -> None:
        if input_ids.shape[0] != 1:
            raise WorkbenchError(f"compressing caches hold one sequence; got a batch of {input_ids.shape[0]}")
        self.sentences.see(input_ids[0].tolist())

    def attention_mask(self, layer_idx: int, call) -> torch.Tensor | None:
        base = super().attention_mask(layer_idx, call)
        if call.query.shape[2] != 1:
            return base
        layer, policy, groups = self.layers[layer_idx], self.policy, call.groups
        held = layer.held()
        now = int(layer.last_query_positions[-1])
        own = int(self.sentences.of(layer.last_query_positions[-1:])[0])  # the query's own sentence
        visible = torch.zeros(len(held), max(held), dtype=torch.bool, device=call.query.device)
        for head, positions in enumerate(layer.head_positions):
            sentence = self.sentences.of(positions)
            query = call.query[0, head * groups:(head + 1) * groups, 0]
            ids, inverse, scores = policy.sentence_scores(layer.head_keys[head], sentence, query)
            always = (positions < policy.sinks) | (positions > now - policy.window) | (sentence == own)
            hidden = torch.bincount(inverse[~always], minlength=len(ids)) > 0  # sentences not fully visible
            scores[~hidden] = float("-inf")
            chosen = torch.topk(scores, min(policy.top_sentences, int(hidden.sum()))).indices
            visible[head, :held[head]] = always | torch.isin(inverse, chosen)
        self.selected_fraction[layer_idx] = float(visible.sum()) / sum(held)
        mask = visible[None, :, None, :]
        if base is not None:
            return mask & base
        return None if bool(visible.all()) else mask
