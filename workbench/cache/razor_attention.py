"""`razor_attention`: retrieval heads keep everything; the other heads keep sinks, a local window and one
compensation token holding the mean of every key and value they dropped.

Retrieval heads are found once per model (`find_retrieval_heads`): the model reads a probe, `probe_length`
random distinct tokens repeated twice, and each query in the second copy should attend to the token that
followed its previous occurrence (induction, the copy behaviour retrieval relies on). A query head's score is
the mean attention it pays to that token; a KV head gets the best score of its query heads (GQA: one retrieval
query head needs the whole KV head). The top `retrieval_fraction` of (layer, KV head) pairs are retrieval heads.

Every other KV head keeps `budget` tokens (or `ratio` of the prompt but at least sinks + window + 1, like the
paper's buffer max(S0, N / C)): its `sinks`, the compensation token, and the most recent rest. A dropped token
is folded into the compensation token, a running mean weighted by how many tokens each entry stands for; the
trace's `cache_merged_into` names the compensation token's position.
Simplifications: induction scoring only (the paper also protects "echo" heads); the compensation token is
attended like any other key (the base offers no per-slot score bias for the number of tokens it stands for).

Inside a verify or rollout pass (see workbench.cache.kvcache) this policy evicts once, at commit: its merges change
kept keys and values and cannot be tentative, so the pass's rows see the cache as it was before the pass's own
evictions, and commit observes the accepted rows and evicts once. tests/test_transactions.py measures the KL this
costs against feeding the same tokens one by one.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import weakref
from dataclasses import dataclass, field

import torch

from workbench.cache.eviction import EvictionPolicy
from workbench.cache.kvcache import KVCache
from workbench.errors import ParameterError
from workbench.registry import param

_HEAD_SCORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # hf model -> {(length, seed): scores}
FULL = sys.maxsize  # a retrieval head's budget: never evicts


@dataclass
class RazorAttention(EvictionPolicy):
    name = "razor_attention"
    summary = ("Retrieval heads (found by an induction probe) keep the full cache; other heads keep sinks, a "
               "local window and one compensation token averaging what they dropped.")
    paper = ("RazorAttention: Efficient KV Cache Compression Through Retrieval Heads "
             "(Tang et al., ICLR 2025)")
    departs = ("induction scoring only (no echo heads); the compensation token is attended like any key; inside a "
                      "verify or rollout pass it evicts once, at commit; a layer with a retrieval head allocates that "
                      "head's length for all its KV heads (one padded buffer per layer), and the bytes say so")

    budget: int = param(128, "tokens a non-retrieval head keeps: sinks + compensation token + the most recent",
                        min=2)
    retrieval_fraction: float = param(0.15, "fraction of (layer, KV head) pairs kept whole as retrieval heads",
                                      min=0.0, max=1.0)
    probe_length: int = param(64, "random tokens in the probe (read twice) that scores the heads", min=4)
    seed: int = param(0, "seed of the probe's random tokens", min=0)

    retrieval_heads: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    tentative = False  # folding entries cannot be undone: inside a provisional pass it evicts at commit
    merges = True

    def validate(self) -> None:
        super().validate()
        if self.ratio is None and self.budget < self.sinks + self.window + 1:
            raise ParameterError(f"cache 'razor_attention' budget {self.budget} leaves no room for the "
                                 f"compensation token: it must be >= sinks + window + 1 "
                                 f"({self.sinks} + {self.window} + 1)")

    def build(self, model, forward=None) -> KVCache:
        if forward is None:
            raise ParameterError("cache 'razor_attention' finds its retrieval heads with a forward pass over a probe: "
                                 "build it with workbench.run.build_cache(model, policy) (what workbench.generate "
                                 "and Session do), or give the heads with policy.build_for(model, heads)")
        heads = find_retrieval_heads(model, forward, self.retrieval_fraction, self.probe_length, self.seed)
        return self.build_for(model, heads)

    def build_for(self, model, retrieval_heads: torch.Tensor) -> KVCache:
        """A cache for `model` with given retrieval heads: bool (layers, kv_heads)."""
        expected = (model.num_layers, model.num_kv_heads)
        if tuple(retrieval_heads.shape) != expected:
            raise ParameterError(f"retrieval heads must be a bool tensor of shape (layers, kv_heads) = {expected}; "
                                 f"got {tuple(retrieval_heads.shape)}")
        policy = dataclasses.replace(self)  # a copy for this run, bound to this model's heads
        policy.retrieval_heads = retrieval_heads.bool().cpu()
        return KVCache(model.config, policy, self.store)

    def layer_budgets(self, base: int, num_layers: int, prompt_length: int) -> list[list[int]]:
        base = max(base, self.sinks + self.window + 1)
        return [[FULL if full else base for full in layer.tolist()] for layer in self.retrieval_heads]

    def score(self, layer, call, result) -> torch.Tensor:
        stands_for = layer.extra("stands_for", 1.0)  # per entry: how many tokens it stands for
        return torch.where(stands_for > 1, torch.inf, layer.positions().float())  # recency; it always stays

    def merge(self, layer, gone, going, alive, call) -> torch.Tensor:
        """Fold every dropped entry into the head's compensation token: the oldest unprotected kept entry."""
        stands_for = layer.extra("stands_for", 1.0)
        positions = layer.positions()
        unprotected = alive & (positions >= self.sinks) & (positions <= layer.newest(call) - self.window)
        into = unprotected.int().argmax(-1, keepdim=True)  # the first such slot per head (slots in position order)
        weights = torch.where(going, stands_for.gather(1, gone), 0.0)
        layer.merge(into.expand_as(gone), gone, weights, stands_for)
        stands_for.scatter_add_(1, into, weights.sum(-1, keepdim=True))
        return torch.where(going, positions.gather(1, into).expand_as(gone), -1)


def induction_scores(probs: torch.Tensor, length: int, groups: int) -> torch.Tensor:
    """(kv_heads,) from one layer's attention rows (heads, 2 * length, 2 * length) over a probe read twice: per
    query head the mean attention of the second copy's queries to the token after their previous occurrence,
    then the best query head of each KV group."""
    queries = torch.arange(length, 2 * length, device=probs.device)
    copied = probs[:, queries, queries - length + 1].mean(-1)  # (heads,)
    return copied.view(-1, groups).amax(-1)


def retrieval_head_scores(model, forward, probe_length: int = 64, seed: int = 0) -> torch.Tensor:
    """(layers, kv_heads) induction scores of `model`, computed once per model and probe, then cached."""
    per_model = _HEAD_SCORES.setdefault(model.hf, {})
    if (probe_length, seed) not in per_model:
        vocab = min(model.text_config.vocab_size, len(model.tokenizer))
        special = set(model.tokenizer.all_special_ids)
        pool = [t for t in torch.randperm(vocab, generator=torch.Generator().manual_seed(seed)).tolist()
                if t not in special]
        if len(pool) < probe_length:
            raise ParameterError(f"probe_length {probe_length} exceeds the {len(pool)} distinct ordinary tokens "
                                 "of the vocabulary")
        ids = torch.tensor([pool[:probe_length] * 2], device=model.device)
        probe = _InductionProbe(probe_length, model.num_layers, model.num_kv_heads)
        forward(ids, probe, "eager")
        per_model[(probe_length, seed)] = probe.scores
    return per_model[(probe_length, seed)]


def find_retrieval_heads(model, forward, retrieval_fraction: float = 0.15, probe_length: int = 64,
                         seed: int = 0) -> torch.Tensor:
    """Bool (layers, kv_heads): the top `retrieval_fraction` of KV heads by induction score (at least one when
    the fraction is above zero). `forward(ids, observer, attention)` runs the probe (workbench.run.build_cache
    gives one that runs through a session)."""
    scores = retrieval_head_scores(model, forward, probe_length, seed)
    count = math.ceil(retrieval_fraction * scores.numel())
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    chosen[torch.topk(scores.flatten(), count).indices] = True
    return chosen.view_as(scores)


class _InductionProbe:
    """An attention observer that keeps each layer's induction scores, not its attention rows."""

    def __init__(self, length: int, num_layers: int, num_kv_heads: int):
        self.length = length
        self.scores = torch.zeros(num_layers, num_kv_heads)

    def wants(self, layer: int) -> frozenset[str]:
        return frozenset({"probs"})

    def observe(self, call, result) -> None:
        self.scores[call.layer] = induction_scores(result.probs[0], self.length, call.groups).float().cpu()
