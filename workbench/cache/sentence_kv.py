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

    def sentence_scores(self, keys: torch.Tensor, sentence: torch.Tensor, query: torch.Tensor):
        """For one head: the sentence ids it holds, each token's index into them, and each sentence's score,
        query (group heads, d) . the sentence's mean key, summed over the group's heads."""
        ids, inverse = torch.unique(sentence, return_inverse=True)
        sums = keys.new_zeros(len(ids), keys.shape[-1]).float().index_add_(0, inverse, keys.float())
        counts = torch.bincount(inverse, minlength=len(ids)).clamp_min(1)
        return ids, inverse, (query.float() @ (sums / counts[:, None]).T).sum(0)

    def score(self, layer, call, result) -> torch.Tensor:
        """Per token: the rank of its sentence for the latest query (its own sentence ranks first), plus a
        fraction growing with position, so whole sentences go lowest first and a cut one keeps its latest tokens."""
        sentences, groups = layer.cache.state["sentences"], call.groups
        valid, positions, keys = layer.valid(call), layer.positions(), layer.held_keys()
        scores = torch.full(positions.shape, float("-inf"), device=positions.device)
        own = sentences.of(torch.tensor([layer.newest(call)], device=positions.device))[0]
        for head in range(positions.shape[0]):
            slots = valid[head]
            held = positions[head][slots]
            sentence = sentences.of(held)
            query = call.query[0, head * groups:(head + 1) * groups, -1]
            ids, inverse, by_sentence = self.sentence_scores(keys[head][slots], sentence, query)
            by_sentence[ids == own] = float("inf")
            rank = torch.empty(len(ids), dtype=torch.long, device=positions.device)
            rank[by_sentence.argsort()] = torch.arange(len(ids), device=positions.device)
            scores[head][slots] = rank[inverse].float() + held.float() / (held.max().float() + 1)
        return scores

    def visible(self, layer, call) -> torch.Tensor | None:
        """Bool (kv_heads, q, slots): per decoding query, its sinks, its recent window, its own sentence and the
        `top_sentences` best other sentences. Sets layer.state["selected_fraction"] (a 0-d tensor)."""
        if not call.decoding:
            return None
        sentences, groups = layer.cache.state["sentences"], call.groups
        valid, positions, keys = layer.valid(), layer.positions(), layer.held_keys()
        visible = torch.zeros(positions.shape[0], call.num_queries, positions.shape[1], dtype=torch.bool,
                              device=positions.device)
        for row in range(call.num_queries):
            now = call.start + row
            own = sentences.of(torch.tensor([now], device=positions.device))[0]
            for head in range(positions.shape[0]):
                slots = valid[head] & (positions[head] <= now)
                held = positions[head][slots]
                sentence = sentences.of(held)
                query = call.query[0, head * groups:(head + 1) * groups, row]
                ids, inverse, by_sentence = self.sentence_scores(keys[head][slots], sentence, query)
                always = (held < self.sinks) | (held > now - self.window) | (sentence == own)
                hidden = torch.bincount(inverse[~always], minlength=len(ids)) > 0  # sentences not fully visible
                by_sentence = by_sentence.masked_fill(~hidden, float("-inf"))
                best = torch.topk(by_sentence, min(self.top_sentences, len(ids)))
                chosen = best.indices[best.values > float("-inf")]
                visible[head, row, slots] = always | torch.isin(inverse, chosen)
        held = layer.valid(call)[:, None, :]
        layer.state["selected_fraction"] = (visible & held).sum() / (held.sum() * call.num_queries)
        return None if bool((visible | ~held).all()) else visible  # everything selected: plain attention


class Sentences:
    """The sentence id of every position seen so far, from the token ids and the tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ends: dict[int, bool] = {}  # token id -> whether it ends a sentence
        self.ids: list[int] = []  # per position
        self.closed: list[bool] = []  # per position: its token ends its sentence

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

    def of(self, positions: torch.Tensor) -> torch.Tensor:
        if len(positions) and int(positions.max()) >= len(self.ids):
            raise WorkbenchError("cache 'sentence_kv' needs the token ids of every forward pass to find sentences")
        return torch.tensor(self.ids, dtype=torch.long, device=positions.device)[positions]
