"""`compresskv`: a layer's semantic retrieval heads choose the tokens it keeps; layer budgets follow each layer's
eviction error.

At the prefill, layer by layer:
  * semantic retrieval heads. CompressKV finds them offline: in needle-in-a-haystack runs, whenever the model
    emits a token of the needle, each query head scores the attention it pays to the whole needle span (the copied
    token and its semantic context, not only the exact token as plain retrieval heads are scored); a layer's
    `heads` best query heads are its retrieval heads. Here they are found online, from the prompt itself: among
    the last `probe` prompt queries, a query at position i *copies* when its bigram and the next token repeat an
    earlier pair (ids[j-1], ids[j]) == (ids[i], ids[i+1]) with j <= i; each query head scores the attention those
    queries pay to the spans around the copied tokens j (the token and `kernel` // 2 neighbours on either side).
    The layer's `heads` best-scoring query heads are its retrieval heads; with no copy in the probe, all heads
    are.
  * token selection, as SnapKV but voted by the retrieval heads only: each one's attention from the last `window`
    queries, summed over those queries, over the tokens before the window, average-pooled over `kernel`
    neighbours (zero padding, as F.avg_pool1d), averaged over the retrieval heads. One token set for the whole
    layer, as CompressKV's code (every KV head keeps the same positions, whichever groups the heads are in): the
    best-voted tokens plus the window.
  * layer budgets. A layer's eviction error is the relative Frobenius error ||O_c - O|| / ||O|| of its window
    queries' attention output (all query heads) when it keeps the uniform `budget` by that selection. The whole
    cache, budget x layers, is split as in CompressKV's code: every layer gets `min_budget`, the rest in
    proportion to its share of the errors (rounded), each layer between `min_budget` and `max_scale` x budget,
    and the rounding difference added to the most (taken from the least) erring layers one token at a time.

Simplifications, stated in `departs`: CompressKV scores the heads and the layers' errors offline (the errors while
decoding LongBench with a uniform budget, after o_proj); here both come from the prompt at the prefill (copies
within the prompt, the window queries' output before o_proj), so the split happens in a cascade: after each layer
the errors measured so far re-split the whole cache over the layers seen so far, and layers already compressed
only shrink to their new share (as CAKE does), so the compressed layers never hold more than the whole budget.
A layer is also capped at the prompt's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.attention import reference
from workbench.cache.eviction import EvictionPolicy, keep_best
from workbench.cache.scoring import pooled, window_rows
from workbench.cache.storage import DenseStore
from workbench.errors import ParameterError
from workbench.registry import param


@dataclass
class CompressKV(EvictionPolicy):
    name = "compresskv"
    summary = ("Compress the prompt once: each layer's semantic retrieval heads vote (SnapKV-style) for the tokens "
               "the whole layer keeps; layers get budgets by how much compressing them changes their attention "
               "output.")
    paper = ("CompressKV: Semantic Retrieval Heads Know What Tokens are Not Important Before Generation "
             "(Lin et al., arXiv 2508.02401, 2025)")
    departs = ("retrieval heads found online from copies within the prompt, not offline from needle-in-a-haystack "
               "runs; layer errors measured at the prefill on the window queries' output (before o_proj), not "
               "offline while decoding, so the budget split is a cascade (compressed layers only shrink); layer "
               "budgets capped at the prompt length")

    budget: int = param(128, "average tokens kept per layer (the whole cache is budget x layers)", min=1)
    sinks: int = param(0, "first tokens always kept (CompressKV keeps none)", min=0)
    window: int = param(8, "observation window: the last prompt tokens, which vote and are always kept", min=1)
    kernel: int = param(5, "average-pooling width of the votes, and of the context span around a copied token "
                           "(odd)", min=1)
    heads: int = param(4, "semantic retrieval heads (query heads) per layer that vote", min=1)
    probe: int = param(256, "the last prompt queries whose copies identify the retrieval heads", min=2)
    min_budget: int = param(32, "fewest tokens a layer keeps (CompressKV's floor; at most the budget)", min=1)
    max_scale: float = param(3.0, "most tokens a layer keeps, as a multiple of the budget", min=1.0)
    compress: str = param("prefill", "CompressKV compresses the prompt only", choices=("prefill",))

    store = DenseStore  # one token set per layer: every KV head keeps the same positions

    def validate(self) -> None:
        super().validate()
        if self.kernel % 2 == 0:
            raise ParameterError(f"cache 'compresskv' parameter 'kernel' is {self.kernel}; it must be odd")
        if self.min_budget < self.sinks + self.window:
            raise ParameterError(f"cache 'compresskv' min_budget {self.min_budget} is smaller than sinks + window "
                                 f"({self.sinks} + {self.window}): every layer keeps at least those")
        if self.compress_turns:
            raise ParameterError("cache 'compresskv' compresses the prompt once (its budgets come from the "
                                 "prefill); compress_turns=True is not supported")

    def layer_budgets(self, base: int, num_layers: int, prompt_length: int) -> list[int]:
        return [prompt_length] * num_layers  # every layer holds its prompt until the cascade slices the budget

    def begin_pass(self, cache, forward) -> None:
        super().begin_pass(cache, forward)
        if forward.phase == "prefill":
            cache.state["prompt_ids"] = forward.token_ids
            cache.state["errors"] = {}

    def score(self, layer, call, result) -> torch.Tensor:
        return layer.extra("votes")  # the retrieval heads' pooled votes, set at the layer's prefill

    def evict(self, layer, call, result) -> None:
        cache = layer.cache
        whole = self.whole_layers(cache.num_layers)
        if call.phase != "prefill" or layer.index in whole:
            return
        n = call.num_queries
        base = self.base_budget(n)
        chosen = retrieval_heads(call, cache.state.get("prompt_ids"), self.heads, self.probe, self.kernel)
        window_probs = window_rows(call, self.window)
        positions = layer.positions()
        in_window = positions > layer.newest(call) - self.window
        votes = head_votes(window_probs[chosen], in_window[0], self.kernel)  # (slots,)
        layer.extra("votes")[:] = votes
        protected = (positions < self.sinks) | in_window
        ranked = votes.expand_as(positions).masked_fill(protected, float("inf"))
        kept = keep_best(ranked, layer.valid(call), [min(n, base)] * layer.num_heads)
        errors = {**cache.state["errors"], layer.index: eviction_error(window_probs, call.value[0], kept[0])}
        cache.state["errors"] = errors
        seen = sorted(errors)
        compressed = cache.num_layers - len(whole)
        cap = min(math.ceil(self.max_scale * base), n)
        shares = allocate([errors[i] for i in seen], base * compressed, min(self.min_budget, base, cap), cap)
        budgets = cache.state["budgets"]
        for index, share in zip(seen, shares):  # the cascade: earlier layers shrink to their new share
            budget = min(budgets[index][0], share)
            budgets[index] = [budget] * cache.num_kv_heads
            earlier = cache.layers[index]
            if max(earlier.held) > budget:
                self.evict_to(earlier, call, result, budgets[index])


def copy_spans(ids: torch.Tensor, rows: torch.Tensor, radius: int) -> torch.Tensor:
    """Bool (len(rows), n): for the query at each position i in `rows`, the spans (radius tokens on either side,
    no later than i) around every earlier token j it copies: (ids[j-1], ids[j]) == (ids[i], ids[i+1]), 1 <= j <= i."""
    n = ids.shape[0]
    j = torch.arange(n, device=ids.device)[None]
    i = rows[:, None]
    following = ids[(rows + 1).clamp(max=n - 1)][:, None]
    before = ids[(j - 1).clamp(min=0)]
    copies = (ids[None] == following) & (before == ids[rows][:, None]) & (j >= 1) & (j <= i) & (i + 1 < n)
    if radius:
        copies = F.max_pool1d(copies.float()[:, None], 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0
    return copies & (j <= i)


def retrieval_heads(call, ids: torch.Tensor | None, count: int, probe: int, kernel: int) -> torch.Tensor:
    """Long (k,): the layer's semantic retrieval heads, the `count` query heads paying the most attention, from the
    last `probe` queries, to the context of the tokens they copy (all heads when nothing is copied)."""
    n, heads = call.num_queries, call.query.shape[1]
    every = torch.arange(heads, device=call.query.device)
    if ids is None or ids.shape[0] != n or count >= heads:
        return every
    ids = ids.to(call.query.device)
    scores = torch.zeros(heads, device=call.query.device)
    for rows in reference.row_chunks(min(probe, n)):
        rows = slice(n - min(probe, n) + rows.start, n - min(probe, n) + rows.stop)
        spans = copy_spans(ids, torch.arange(rows.start, rows.stop, device=ids.device), kernel // 2)
        if spans.any():
            probs = torch.softmax(reference.scores(call, rows), dim=-1)[0]  # (heads, rows, n)
            scores += (probs * spans[None]).sum((1, 2))
    if not (scores > 0).any():
        return every
    return torch.sort(scores, descending=True, stable=True).indices[:count]


def head_votes(probs: torch.Tensor, in_window: torch.Tensor, kernel: int) -> torch.Tensor:
    """(keys,): the window queries' attention (heads, rows, keys) summed over the rows, the window's own columns
    zeroed, average-pooled over `kernel` neighbours, averaged over the heads."""
    votes = probs.sum(1).masked_fill(in_window, 0.0)
    return pooled(votes, kernel, "avg").mean(0)


def eviction_error(probs: torch.Tensor, value: torch.Tensor, kept: torch.Tensor) -> float:
    """||O_c - O||_F / ||O||_F of the attention output of the rows `probs` (heads, rows, keys) over `value`
    (kv_heads, keys, dim) when only the keys marked in `kept` (keys,) remain (the softmax renormalised over them)."""
    value = value.float()[None]
    full = reference.by_group(probs[None], value)
    kept_probs = probs * kept
    compressed = reference.by_group((kept_probs / kept_probs.sum(-1, keepdim=True).clamp_min(1e-30))[None], value)
    return float(torch.linalg.vector_norm(compressed - full) / (torch.linalg.vector_norm(full) + 1e-5))


def allocate(errors: list[float], total: int, floor: int, cap: int) -> list[int]:
    """CompressKV's error-aware split of `total` tokens: each layer `floor` plus the rest in proportion to its share
    of the errors (rounded half to even, as numpy), clipped to [floor, cap]; then one token at a time to the
    layers with the largest errors (from the smallest) until the total is met or no layer can move."""
    count = len(errors)
    mass = sum(errors)
    importance = [e / mass if mass > 0 else 1 / count for e in errors]
    budgets = [min(max(floor + round(w * (total - floor * count)), floor), cap) for w in importance]
    diff = total - sum(budgets)
    while diff:
        step = 1 if diff > 0 else -1
        movable = [i for i in range(count) if (budgets[i] < cap if step > 0 else budgets[i] > floor)]
        if not movable:
            break
        for i in sorted(movable, key=lambda i: -step * importance[i]):
            budgets[i] += step
            diff -= step
            if not diff:
                break
    return budgets
