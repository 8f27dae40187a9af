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
sharing (every layer selects for itself), clusters are built at the prefill and not updated while decoding (a
later turn that re-evicts, compress_turns=True, rebuilds them over the slots it leaves), tokens generated after the
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
    departs = ("exact dot products (no MPC-friendly approximation), no cross-layer index sharing, clusters built "
               "at the prefill (rebuilt by a re-evicting turn), not while decoding; tokens after the prefill always "
               "attended; deterministic k-means")

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
        if not call.decoding and self.due(layer, call):  # cluster what was kept (again after a re-evicting turn)
            keys, positions, newest = layer.held_keys(), layer.positions(), layer.newest(call)
            selectable = (positions >= self.sinks) & (positions <= newest - self.window)  # not sinks, not window
            clusters = [HeadClusters(keys[h, :n], selectable[h, :n], self.coarse, self.fine)
                        for h, n in enumerate(layer.held)]
            layer.state["clusters"] = clusters
            layer.state["index"] = ClusterIndex.of(clusters)

    def visible(self, layer, call) -> torch.Tensor | None:
        """Bool (kv_heads, q, slots): per decoding query, the slots of the fine clusters it selects, the sinks, the
        observation window and every token after the prefill. Sets layer.state["selected_fraction"] (a 0-d
        tensor: the share of held slots the queries see)."""
        index = layer.state.get("index")
        if index is None or not call.decoding:
            return None
        if self.top_coarse >= index.coarse.shape[1] and self.top_fine >= index.fine.shape[1]:
            return None  # every cluster is selected: plain attention
        heads, q_len, slots = index.labels.shape[0], call.num_queries, layer.store.slots
        visible = torch.ones(heads, q_len, slots, dtype=torch.bool, device=call.query.device)
        n = index.labels.shape[1]
        for row in range(q_len):
            query = call.query[0, :, row].float().view(heads, call.groups, -1)  # each KV head's group of queries
            visible[:, row, :n] = index.select(query, self.top_coarse, self.top_fine)
        held = layer.valid(call)[:, None, :]
        layer.state["selected_fraction"] = (visible & held).sum() / (held.sum() * q_len)
        return visible


class ClusterIndex:
    """Every KV head's clusters of one layer, padded to common sizes, so that all heads select at once."""

    def __init__(self, labels, parents, coarse, fine, coarse_valid, fine_valid):
        self.labels = labels  # (heads, n) long: fine cluster of each clustered slot (-1: always attended)
        self.parents = parents  # (heads, F) long: the coarse cluster of each fine one
        self.coarse, self.fine = coarse, fine  # (heads, C, d), (heads, F, d) centroids
        self.coarse_valid, self.fine_valid = coarse_valid, fine_valid  # (heads, C), (heads, F) bool

    @classmethod
    def of(cls, clusters: list[HeadClusters]) -> ClusterIndex:
        def pad(tensors, fill=0.0):
            width = max(t.shape[0] for t in tensors)
            out = tensors[0].new_full((len(tensors), width, *tensors[0].shape[1:]), fill)
            valid = torch.zeros(len(tensors), width, dtype=torch.bool, device=out.device)
            for h, t in enumerate(tensors):
                out[h, :t.shape[0]], valid[h, :t.shape[0]] = t, True
            return out, valid

        labels, _ = pad([c.labels for c in clusters], -1)
        parents, _ = pad([c.parents for c in clusters], 0)
        coarse, coarse_valid = pad([c.coarse_centroids for c in clusters])
        fine, fine_valid = pad([c.fine_centroids for c in clusters])
        return cls(labels, parents, coarse, fine, coarse_valid, fine_valid)

    def select(self, query: torch.Tensor, top_coarse: int, top_fine: int) -> torch.Tensor:
        """Bool (heads, n): per head, the clustered slots in a fine cluster its query group (heads, group, d) selects
        (the `top_coarse` coarse clusters by centroid score, then the `top_fine` best fine ones inside them), and
        the always-attended slots."""
        coarse = (query @ self.coarse.transpose(1, 2)).sum(1).masked_fill(~self.coarse_valid, float("-inf"))
        chosen = _top(coarse, top_coarse)
        fine = (query @ self.fine.transpose(1, 2)).sum(1)
        eligible = chosen.gather(1, self.parents) & self.fine_valid
        picked = _top(fine.masked_fill(~eligible, float("-inf")), top_fine)
        return picked.gather(1, self.labels.clamp_min(0)) | (self.labels < 0)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool like scores (heads, n): each row's k best finite entries (fewer when fewer are finite)."""
    best = scores.topk(min(k, scores.shape[1]), dim=1)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, best.indices, best.values > float("-inf"))


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
