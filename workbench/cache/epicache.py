"""`epicache`: block-wise prefill (compress after every block, so the cache never holds more than budget + block
tokens), each block scored by its last queries; optional episodes with their own shares of the budget.

EpiCache bounds the peak memory of a long conversation's prefill: the context is processed in blocks of `block`
tokens and after each block the cache is compressed back to the budget. The tokens held after a block (what was
kept plus the block) are scored by a "patched prompt" read over them, KVzip-style: a token's score is the largest
attention weight any query row and any query head of its KV group pays it (softmax over exactly what the cache
holds then). Here the patched prompt is the block's last `window` queries (the reference's SnapKV scoring option;
its default prompt is the episode's medoid text, which a single cache cannot read without a forward pass of its
own), and those `window` tokens and the first `sinks` are kept. Per layer, `level="pair"` (the reference's default)
keeps the budget x kv_heads best (KV head, token) pairs of the layer, so heads hold different counts averaging the
budget; `level="uniform"` keeps the budget best of each head.

How the blocks reach the cache:
- passes of at most `block` tokens (a prefill of the first block and "append" passes of the next, which
  `prefill_blockwise(session, ids)` feeds, or the later turns of a conversation: compress_turns=True) are the
  paper's block prefill: each pass is compressed once its layer's attention ran, so at any moment one layer holds
  budget + block tokens and every other at most the budget (session.peak_bytes shows it);
- a longer pass (workbench.generate feeds the whole prompt as one prefill) is cut into blocks inside the pass: the
  selection replays the blocks in order, block b's last `window` queries scoring what was kept after block b - 1
  plus block b (causally), and what is kept after the last block stays. The pass's attention saw the whole prompt,
  so those queries are a full prefill's (not those of a prefill whose earlier blocks were already compressed), and
  the pass's transient peak is the whole prompt on one layer (run.peak_cache_bytes counts it): the memory bound
  needs the blocks fed as passes.

Episodes (episodes > 1): the prompt is cut into segments of `segment` tokens, each embedded as the normalised mean
of the model's input embeddings of its tokens (the reference's "llm" embedding option) and clustered by spherical
k-means (farthest-point start) into episodes. At each compression the free budget (beyond sinks and window) is
apportioned between the episodes by the D'Hondt rule over their sizes (tokens seen so far; later turns form one
more episode): the i-th best token of an episode of share s ranks at i / s, so every episode keeps tokens in
proportion to its size and, inside an episode, the best-scored ones.

Simplified against the paper: one cache per run, so episodes share its budget instead of each getting a cache of
its own (the paper builds one compressed cache per episode, scored by that episode's medoid, and routes each
question to the closest episode's cache); no sensitivity-aware layer budgets (the reference's DO_ALLOC=False
setting); sinks stand in for the reference's always-kept system prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.attention import reference
from workbench.cache.eviction import PHASES, EvictionPolicy, keep_best
from workbench.errors import WorkbenchError
from workbench.registry import param

LEVELS = ("pair", "uniform")


@dataclass
class EpiCache(EvictionPolicy):
    name = "epicache"
    summary = ("Block-wise prefill: after every `block` tokens the cache is compressed back to the budget, scored by "
               "the block's last queries (max attention, KVzip-style); optional per-episode shares of the budget.")
    paper = ("EpiCache: Episodic KV Cache Management for Long Conversational Question Answering "
             "(Kim, Kundu, Kim, Dixit, Cho, arXiv 2025)")
    departs = ("the patched prompt is the block's last `window` queries (the reference's SnapKV scoring option), "
               "not an episode medoid; one cache per run: episodes get shares of its budget (D'Hondt over their sizes) "
               "instead of a cache each with question routing; no sensitivity-aware layer budgets; a prompt fed as one "
               "pass is cut into blocks inside the pass (full-prefill queries, whole-prompt transient peak); the memory"
               " bound needs the blocks fed as passes (prefill_blockwise)")

    sinks: int = param(4, "first tokens always kept (the reference keeps its system prompt)", min=0)
    window: int = param(32, "each block's last queries: they score the tokens (the patched prompt) and are kept",
                        min=0)
    block: int = param(2048, "prefill block: tokens added before each compression (the reference's "
                             "prefill_chunk_size)", min=1)
    level: str = param("pair", "pair: the layer's best (KV head, token) pairs, head counts vary (reference default); "
                               "uniform: the best `budget` of each head", choices=LEVELS)
    compress: str = param("prefill", "when to evict (EpiCache compresses the context, not the answer)",
                          choices=PHASES)
    compress_turns: bool = param(True, "compress each later turn (an 'append' pass) too: more blocks of the "
                                       "conversation")
    episodes: int = param(1, "episodes the prompt is clustered into, each keeping its share of the budget (1: off)",
                          min=1)
    segment: int = param(32, "tokens per segment embedded and clustered into episodes", min=1)

    def build(self, model, forward=None):
        cache = super().build(model, forward)
        if self.episodes > 1:  # segments are embedded with the model's own input embeddings
            cache.state["token_embeddings"] = model.hf.get_input_embeddings().weight
        return cache

    def begin_pass(self, cache, forward) -> None:
        super().begin_pass(cache, forward)
        if forward.phase == "prefill" and self.episodes > 1:
            if forward.token_ids is None:
                raise WorkbenchError(f"cache '{self.name}' with episodes={self.episodes} clusters the prompt's "
                                     "tokens: the prefill pass must carry its token ids")
            with torch.inference_mode():
                cache.state["episode_labels"] = self.episode_labels(forward.token_ids,
                                                                    cache.state["token_embeddings"])

    # -- episodes ------------------------------------------------------------------------------------------------
    def episode_labels(self, token_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Long (prompt length,): the episode of each prompt position (that of its segment)."""
        vectors = embeddings[token_ids.to(embeddings.device)].float()
        segments = vectors.split(self.segment)
        points = F.normalize(torch.stack([s.mean(0) for s in segments]), dim=-1)
        labels = spherical_kmeans(points, self.episodes)
        return labels.repeat_interleave(torch.tensor([len(s) for s in segments], device=labels.device))

    def labels_at(self, cache, positions: torch.Tensor) -> torch.Tensor | None:
        """Long like `positions`: each slot's episode; tokens after the prompt form one more (the last)."""
        labels = cache.state.get("episode_labels")
        if labels is None:
            return None
        labels = labels.to(positions.device)
        inside = (positions >= 0) & (positions < len(labels))
        return torch.where(inside, labels[positions.clamp(0, len(labels) - 1)], self.episodes)

    def shares(self, cache, end: int) -> torch.Tensor:
        """Float (episodes + 1,): tokens of each episode among positions [0, end) (the last: after the prompt)."""
        labels = cache.state["episode_labels"]
        seen = torch.bincount(labels[:end], minlength=self.episodes + 1).float()
        seen[self.episodes] += max(0, end - len(labels))
        return seen

    # -- block-wise compression ----------------------------------------------------------------------------------
    def evict(self, layer, call, result) -> None:
        if not self.due(layer, call):
            return
        budgets, held = self.budgets(layer), layer.held_at(call)
        if self.fits(held, budgets):
            return
        alive = self.blockwise(layer, call, budgets)
        layer.keep(alive, alive.sum(1).tolist(), call)

    def score(self, layer, call, result) -> torch.Tensor:
        """The pass as one block: its last `window` queries' attention over everything held."""
        return self.block_scores(call, layer.valid(call), call.start, call.start + call.num_queries)

    def fits(self, held: list[int], budgets: list[int]) -> bool:
        if self.level == "pair":
            return sum(held) <= sum(budgets)
        return all(n <= b for n, b in zip(held, budgets))

    def blockwise(self, layer, call, budgets: list[int]) -> torch.Tensor:
        """Bool (kv_heads, slots): what is kept once the pass's tokens were added and compressed block by block."""
        positions, valid = layer.positions(), layer.valid(call)
        kept = valid & (positions < call.start)  # what the cache held before this pass
        end = call.start + call.num_queries
        for start in range(call.start, end, self.block):
            stop = min(start + self.block, end)
            candidates = kept | (valid & (positions >= start) & (positions < stop))
            if self.fits(candidates.sum(1).tolist(), budgets):
                kept = candidates
                continue
            kept = self.select(layer, self.block_scores(call, candidates, start, stop), candidates, positions,
                               stop - 1, budgets)
        return kept

    def block_scores(self, call, candidates: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Float (kv_heads, slots): the most attention any of the block's last `window` queries (and any query head
        of the KV group) pays each candidate, softmax over the candidates it may see."""
        rows = slice(max(start, stop - max(1, self.window)) - call.start, stop - call.start)
        logits = reference.scores(call, rows)[0]  # (heads, rows, slots), -inf where not visible
        logits = logits.masked_fill(~candidates.repeat_interleave(call.groups, dim=0)[:, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        kv_heads = candidates.shape[0]
        return probs.reshape(kv_heads, -1, probs.shape[-1]).amax(dim=1)

    def select(self, layer, score, candidates, positions, newest: int, budgets: list[int]) -> torch.Tensor:
        """Bool (kv_heads, slots): the protected candidates and the best-scored others, per head or per layer."""
        protected = candidates & ((positions < self.sinks) | (positions > newest - self.window))
        ranked = score.float().masked_fill(protected, float("inf")).masked_fill(~candidates, float("-inf"))
        labels = self.labels_at(layer.cache, positions)
        shares = None if labels is None else self.shares(layer.cache, newest + 1)
        if self.level == "pair":
            total = min(int(candidates.sum()), sum(budgets))
            flat = choose(ranked.reshape(1, -1), candidates.reshape(1, -1), [total],
                          None if labels is None else labels.reshape(1, -1), shares)
            return flat.view_as(candidates)
        counts = [min(c, b) for c, b in zip(candidates.sum(1).tolist(), budgets)]
        return choose(ranked, candidates, counts, labels, shares)


def choose(ranked: torch.Tensor, candidates: torch.Tensor, counts: list[int], labels: torch.Tensor | None,
           shares: torch.Tensor | None) -> torch.Tensor:
    """Bool (rows, slots): per row its `counts[r]` best candidates; with episode labels, the free places (beyond the
    protected, ranked inf) apportioned by D'Hondt: the i-th best of an episode of share s ranks at i / s."""
    if labels is None:
        return keep_best(ranked, candidates, counts)
    by_score = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    episode, score = labels.gather(1, by_score), ranked.gather(1, by_score)
    free = (score > float("-inf")) & (score < float("inf"))  # candidates that are not protected
    onehot = F.one_hot(episode.clamp(0, len(shares) - 1), len(shares)) * free[..., None]
    place = (onehot.cumsum(dim=1) * onehot).sum(-1).float()  # 1 for an episode's best, 2 for its second, ...
    priority = place / shares.to(place.device)[episode].clamp_min(1e-12)
    priority = priority.masked_fill(score == float("inf"), float("-inf")).masked_fill(score == float("-inf"),
                                                                                       float("inf"))
    order = by_score.gather(1, torch.sort(priority, dim=1, stable=True).indices)  # priority, then score
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order).contiguous())
    return (rank < torch.tensor(counts, device=rank.device)[:, None]) & candidates


def spherical_kmeans(points: torch.Tensor, k: int, iterations: int = 50) -> torch.Tensor:
    """Long (n,): cluster labels of unit vectors (n, d) by k-means on cosine similarity, started from farthest
    points (the first point, then repeatedly the point least similar to every chosen one): deterministic."""
    k = min(k, points.shape[0])
    chosen, closest = [0], points @ points[0]
    for _ in range(1, k):
        i = int(closest.argmin())
        chosen.append(i)
        closest = torch.maximum(closest, points @ points[i])
    centroids, labels = points[chosen], None
    for _ in range(iterations):
        new = (points @ centroids.T).argmax(dim=1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        filled = torch.bincount(labels, minlength=k) > 0
        centroids = torch.where(filled[:, None], F.normalize(sums, dim=-1), centroids)
    return labels


def prefill_blockwise(session, ids, block: int | None = None) -> torch.Tensor:
    """Feed a prompt the way EpiCache prefills: its first `block` tokens as the prefill, every next block as an
    'append' pass, so the cache (compressing after each pass) never holds more than budget + block tokens on a layer.
    `block`: the policy's own by default. Returns the last token's logits (float32 (1, vocab))."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    block = block or getattr(session.policy, "block", None) or len(ids)
    logits = None
    for start in range(0, len(ids), block):
        logits = session.feed(ids[start:start + block], "prefill" if start == 0 else "append")
    return logits
