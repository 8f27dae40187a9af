"""`mpcache`: evict once at the prefill, then let each decoding query attend only to the key clusters it selects.

MPCache combines a look-once static eviction with query-aware dynamic selection:

- static: at the prefill, SnapKV's rule (the prompt's last `window` queries vote, max-pooled over neighbours)
  keeps `budget` tokens per layer and KV head; the rest is freed (this is the memory saving). Nothing is evicted
  while decoding.
- hierarchical clusters: right after, each head's kept keys (sinks and the observation window excepted) are
  clustered by two-level k-means: `coarse` clusters, then `fine` clusters inside each coarse one.
- dynamic selection: at each decoding step, per KV head, the coarse centroids are scored by query . centroid,
  summed over the group's query heads (a centroid's score is the mean score of its keys); the `top_coarse` best are
  chosen, then the `top_fine` best fine clusters inside them. The query attends to the tokens of those fine
  clusters, the sinks, the observation window and every token generated since the prefill, through the cache's
  attention mask. Unselected tokens stay in memory: the selection saves compute, not bytes.

`cache.layers[i].state["selected_fraction"]` holds, after each decoding step, the fraction of the layer's held
tokens the latest queries could see (absent before the first decoding step).

Simplified against the paper: no MPC-friendly similarity approximation (exact dot products), no cross-layer index
sharing (every layer selects for itself), clusters are built once and never updated, tokens generated after the
prefill are always attended, and k-means starts from evenly spaced keys (deterministic) and runs a fixed number of
iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.snapkv import SnapKV
from workbench.errors import ParameterError
from workbench.registry import param

KMEANS_ITERATIONS = 10


@dataclass
class MPCache(SnapKV):
    name = "mpcache"
    summary = ("SnapKV eviction once at the prefill; while decoding, each query attends only to the hierarchical "
               "key clusters (coarse, then fine k-means) whose centroids it scores highest, plus sinks and recent.")
    paper = ("MPCache: MPC-Friendly KV Cache Eviction for Efficient Private Large Language Model Inference "
             "(Zeng et al., arXiv 2025)")

    sinks: int = param(4, "first tokens always kept and attended", min=0)
    compress: str = param("prefill", "when to evict: MPCache evicts once, at the prefill", choices=("prefill",))
    coarse: int = param(8, "coarse clusters of keys per layer and KV head", min=1)
    fine: int = param(4, "fine clusters inside each coarse cluster", min=1)
    top_coarse: int = param(4, "coarse clusters each decoding query selects", min=1)
    top_fine: int = param(8, "fine clusters selected among those of the chosen coarse clusters", min=1)

    def validate(self) -> None:
        super().validate()
        if self.top_coarse > self.coarse:
            raise ParameterError(f"cache '{self.name}' selects top_coarse={self.top_coarse} of only "
                                 f"coarse={self.coarse} clusters; use top_coarse <= coarse")
        if self.top_fine > self.top_coarse * self.fine:
            raise ParameterError(f"cache '{self.name}' selects top_fine={self.top_fine} fine clusters, but the "
                                 f"chosen coarse clusters hold at most top_coarse * fine = "
                                 f"{self.top_coarse * self.fine}; use top_fine <= {self.top_coarse * self.fine}")

    @property
    def acts_while_decoding(self) -> bool:
        return True  # every decoding query selects its own clusters

    def evict(self, layer, call, result) -> None:
        super().evict(layer, call, result)
        if call.phase == "prefill":  # cluster what was kept, once
            keys, positions, newest = layer.held_keys(), layer.positions(), layer.newest(call)
            selectable = (positions >= self.sinks) & (positions <= newest - self.window)  # not sinks, not window
            layer.state["clusters"] = [HeadClusters(keys[h, :n], selectable[h, :n], self.coarse, self.fine)
                                       for h, n in enumerate(layer.held)]

    def visible(self, layer, call) -> torch.Tensor | None:
        """Bool (kv_heads, q, slots): per decoding query, the slots of the fine clusters it selects, the sinks, the
        observation window and every token after the prefill. Sets layer.state["selected_fraction"] (a 0-d
        tensor: the share of held slots the queries see)."""
        clusters = layer.state.get("clusters")
        if clusters is None or not call.decoding:
            return None
        groups, q_len = call.groups, call.num_queries
        visible = torch.ones(len(clusters), q_len, layer.store.slots, dtype=torch.bool, device=call.query.device)
        for head, index in enumerate(clusters):
            n = index.labels.shape[0]
            for row in range(q_len):
                query = call.query[0, head * groups:(head + 1) * groups, row].float()
                visible[head, row, :n] = index.select(query, self.top_coarse, self.top_fine) | (index.labels < 0)
        held = layer.valid(call)[:, None, :]
        layer.state["selected_fraction"] = (visible & held).sum() / (held.sum() * q_len)
        return None if bool((visible | ~held).all()) else visible  # everything selected: plain attention


def kmeans(points: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids (k', d), label per point) of plain k-means from evenly spaced points; k' = min(k, points)."""
    k = min(k, points.shape[0])
    centroids = points[torch.linspace(0, points.shape[0] - 1, k).round().long()].clone()

    def nearest(centroids):  # argmin of squared distance; |p|^2 is the same for every centroid
        return (centroids.pow(2).sum(-1)[None, :] - 2 * points @ centroids.T).argmin(dim=1)

    for _ in range(KMEANS_ITERATIONS):
        labels = nearest(centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=k)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)  # empty clusters stay put
    return centroids, nearest(centroids)


class HeadClusters:
    """Two-level clusters of one head's keys: per slot its fine cluster (-1: always attended)."""

    def __init__(self, keys: torch.Tensor, selectable: torch.Tensor, coarse: int, fine: int):
        self.labels = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        slots = torch.nonzero(selectable).flatten()
        points = keys[slots].float()
        self.coarse_centroids, coarse_labels = kmeans(points, coarse) if len(slots) else (points, slots)
        fine_centroids, parents = [], []
        for c in range(self.coarse_centroids.shape[0]):
            members = torch.nonzero(coarse_labels == c).flatten()
            if not len(members):
                continue
            centroids, labels = kmeans(points[members], fine)
            self.labels[slots[members]] = labels + sum(len(f) for f in fine_centroids)
            fine_centroids.append(centroids)
            parents += [c] * centroids.shape[0]
        self.fine_centroids = torch.cat(fine_centroids) if fine_centroids else points
        self.parents = torch.tensor(parents, dtype=torch.long, device=keys.device)

    def select(self, query: torch.Tensor, top_coarse: int, top_fine: int) -> torch.Tensor:
        """Bool per clustered slot: in a fine cluster that `query` (group heads, d) selects."""
        if not len(self.parents):
            return self.labels >= 0
        coarse_scores = (query @ self.coarse_centroids.T).sum(0)
        chosen = torch.topk(coarse_scores, min(top_coarse, len(coarse_scores))).indices
        fine_scores = (query @ self.fine_centroids.T).sum(0)
        fine_scores = fine_scores.masked_fill(~torch.isin(self.parents, chosen), float("-inf"))
        best = torch.topk(fine_scores, min(top_fine, len(fine_scores)))
        picked = best.indices.masked_fill(best.values == float("-inf"), -1)  # fewer eligible: no pick
        return torch.isin(self.labels, picked)
