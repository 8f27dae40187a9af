"""`chelsea`: cut the sequence into chunks, cluster similar keys inside each chunk by soft matching, and merge each
cluster into one centroid entry.

Chelsea observes that keys are highly similar along the sequence, so neighbouring entries can be clustered and
replaced by their centroid instead of being dropped. Chunked Soft Matching, per layer and KV head, whenever the
head holds more than its budget:

1. the held tokens between the first `sinks` and the newest `window` (both always kept as they are), in position
   order, are cut into chunks of `chunk` tokens;
2. alternating partition inside each chunk: its 1st, 3rd, 5th, ... token is a source (set A), its 2nd, 4th, ... a
   destination (set B), so neighbours, whose keys are the most alike, fall in different sets;
3. each source is matched with the destination of its chunk whose key is the most similar (cosine);
4. the r sources with the most similar matches are merged, r = what the head holds over its budget (ToMe's
   bipartite soft matching, over all chunks at once); when r exceeds the sources, the matching runs again on the
   merged cache. A destination and the sources matched to it form a cluster, replaced by its centroid
       k_c = sum_i n_i k_i / sum_i n_i,   v_c likewise,   n_c = sum_i n_i
   where n_i counts the original tokens entry i already stands for (1 for a token never merged): a centroid is
   always the mean of the original tokens of its cluster. It keeps the destination's position.

Compression is online: at the prefill and, when decoding pushes a head over its budget, at every step (one source,
the most similar pair, merges).

Simplified against the paper (written from its method description; no reference code found): the choice of r over
all chunks at once, the repeated rounds past a halving, the uncompressed sinks and window and the default chunk of
32 are our reading. Centroids are attended like any key (the base has no per-slot bias for how many tokens an entry
stands for). Inside a verify or rollout pass this policy evicts once, at commit (merges cannot be tentative).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.cache.eviction import EvictionPolicy
from workbench.errors import ParameterError
from workbench.registry import param

MATCHING = "chelsea_matching"  # call.memo key: the soft matching of the round under way
KEEP = 2.0  # score of what is not a matched source (cosine similarities are in [-1, 1])


@dataclass
class Chelsea(EvictionPolicy):
    name = "chelsea"
    summary = ("Chunked soft matching: inside chunks of the sequence, alternate tokens are matched to their most "
               "similar neighbour's key and the most similar pairs merged into centroids, down to the budget.")
    paper = ("Efficient Long-Context LLM Inference via KV Cache Clustering (Chelsea; Hu, Wang, He, Gong, Yi, Zhang, "
             "Bai, Chen, Zhang, Li, Yuan, arXiv 2025)")
    departs = ("written from the paper's method description (no reference code): r over all chunks at once, repeated "
               "matching rounds past a halving, uncompressed sinks and window and chunk=32 are our reading; centroids "
               "are attended like any key; inside a verify or rollout pass it evicts once, at commit")

    chunk: int = param(32, "tokens per chunk: sources are matched to destinations of their own chunk only", min=2)

    tentative = False  # merges cannot be undone: inside a provisional pass it evicts at commit
    merges = True

    def validate(self) -> None:
        super().validate()
        if self.ratio is None and self.budget <= self.sinks + self.window:
            raise ParameterError(f"cache '{self.name}' budget {self.budget} leaves no room to merge into beyond "
                                 f"sinks + window ({self.sinks} + {self.window}); raise the budget or lower "
                                 "sinks/window")

    def evict_to(self, layer, call, result, budgets: list[int]) -> None:
        """Matching rounds until every head is within its budget (one round merges at most every source)."""
        while True:
            held = layer.held_at(call)
            if all(n <= b for n, b in zip(held, budgets)):
                return
            best, match = call.memo[MATCHING] = self.matching(layer, call)
            sources = (best > float("-inf")).sum(1).tolist()
            target = [max(b, n - s) if n > b else n for n, b, s in zip(held, budgets, sources)]
            try:
                if target == held:  # nothing left to merge (cannot happen with budget > sinks + window)
                    return
                super().evict_to(layer, call, result, target)
            finally:
                call.memo.pop(MATCHING, None)

    def matching(self, layer, call) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunked soft matching of what the layer holds: (best, match), both (kv_heads, slots): each source's
        cosine similarity to its most similar destination (-inf for every other slot) and that destination's slot
        (-1 elsewhere)."""
        keys, positions, valid = layer.held_keys().float(), layer.positions(), layer.valid(call)
        heads, slots = positions.shape
        region = valid & (positions >= self.sinks) & (positions <= layer.newest(call) - self.window)
        counts = region.sum(1)
        width = -(-int(counts.max()) // self.chunk) * self.chunk  # the longest head's region, in whole chunks
        if width == 0:
            return (torch.full((heads, slots), float("-inf"), device=keys.device),
                    torch.full((heads, slots), -1, dtype=torch.long, device=keys.device))
        order = torch.sort((~region).to(torch.int8), dim=1, stable=True).indices  # region slots first, in order
        order = torch.cat([order, order.new_zeros(heads, max(0, width - slots))], dim=1)[:, :width]
        present = torch.arange(width, device=keys.device)[None] < counts[:, None]
        unit = F.normalize(keys, dim=-1).gather(1, order[..., None].expand(-1, -1, keys.shape[-1]))
        unit = unit.view(heads, -1, self.chunk, keys.shape[-1])
        order, present = order.view(heads, -1, self.chunk), present.view(heads, -1, self.chunk)
        similarity = unit[:, :, 0::2] @ unit[:, :, 1::2].transpose(-1, -2)  # (heads, chunks, sources, dests)
        allowed = present[:, :, 0::2, None] & present[:, :, None, 1::2]
        best, nearest = similarity.masked_fill(~allowed, float("-inf")).max(dim=-1)
        matched = best > float("-inf")
        source_slots = torch.where(matched, order[:, :, 0::2], slots).flatten(1)  # slot `slots`: a spare column
        dest_slots = order[:, :, 1::2].gather(-1, nearest).flatten(1)
        out_best = torch.full((heads, slots + 1), float("-inf"), device=keys.device)
        out_match = torch.full((heads, slots + 1), -1, dtype=torch.long, device=keys.device)
        out_best.scatter_(1, source_slots, best.flatten(1))
        out_match.scatter_(1, source_slots, torch.where(matched.flatten(1), dest_slots, -1))
        return out_best[:, :slots], out_match[:, :slots]

    def score(self, layer, call, result) -> torch.Tensor:
        """Matched sources rank below everything else, the most similar lowest: they are the ones merged."""
        best, _ = call.memo.get(MATCHING) or self.matching(layer, call)
        return torch.where(best > float("-inf"), -best, KEEP)

    def merge(self, layer, gone, going, alive, call) -> torch.Tensor:
        _, match = call.memo.get(MATCHING) or self.matching(layer, call)
        into = match.gather(1, gone)
        merged = going & (into >= 0)
        into = into.clamp_min(0)
        size = layer.extra("size", 1.0)  # original tokens each entry stands for
        weights = torch.where(merged, size.gather(1, gone), 0.0)
        layer.merge(into, gone, weights, size.clone())
        size.scatter_add_(1, into, weights)
        return torch.where(merged, layer.positions().gather(1, into), -1)
