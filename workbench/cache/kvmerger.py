"""`kvmerger`: evict by accumulated attention, then merge each evicted token into a similar kept neighbour.

KVMerger observes that consecutive keys of a sequence are often nearly identical, so evicted tokens can be folded
into a kept neighbour instead of being lost. At every eviction, per layer and KV head:

1. what goes is chosen as in H2O: the tokens with the least attention received (summed over all steps so far),
   sinks and a recent window always kept;
2. the head's tokens, in position order, are cut into merging sets: maximal runs of consecutive tokens whose
   adjacent keys have cosine similarity >= `threshold`;
3. an evicted token whose set holds kept tokens is merged into the one with the most similar key (its pivot);
   evicted tokens of a set with nothing kept are dropped;
4. a pivot p absorbs its merged tokens M with Gaussian-kernel weights around its own key,
       w_i ∝ exp(-||k_i - k_p||² / (2 sigma² ||k_p||²))   for i in {p} ∪ M, normalised to sum 1,
       k_p <- Σ w_i k_i,   v_p <- Σ w_i v_i            (the pivot keeps its position).

Simplified against the paper: KVMerger identifies merging sets of consecutive similar keys and merges each whole
set into its highest-attention pivot, the set being the unit of compression; here H2O's score decides what is
kept and the sets only decide where evicted tokens go (a set may hold several pivots; each evicted token picks the
most similar). The kernel width is relative to the pivot's norm so one `sigma` suits any key scale. Merged tokens
carry no count of what they absorbed (no attention re-weighting) and keep their own accumulated score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.cache.h2o import H2O
from workbench.errors import ParameterError
from workbench.registry import param


@dataclass
class KVMerger(H2O):
    name = "kvmerger"
    summary = ("H2O eviction, but each evicted token is merged (Gaussian-kernel weights) into the most similar kept "
               "token of its run of similar consecutive keys instead of being dropped.")
    paper = ("Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context Tasks "
             "(Wang, Jin, Yu, Zhang, arXiv 2024)")

    threshold: float = param(0.8, "consecutive tokens whose keys have at least this cosine similarity form a "
                                  "merging set", min=-1.0, max=1.0)
    sigma: float = param(0.5, "width of the Gaussian merging kernel, relative to the pivot key's norm; > 0", min=0.0)

    def validate(self) -> None:
        super().validate()
        if self.sigma <= 0:
            raise ParameterError(f"cache '{self.name}' parameter 'sigma' must be > 0 (the kernel width), got 0")

    tentative = False  # merges cannot be undone: inside a provisional pass it evicts at commit

    def merge(self, layer, alive, valid, call) -> torch.Tensor:
        dropped = valid & ~alive
        keys = layer.held_keys().float()
        unit = F.normalize(keys, dim=-1)
        adjacent = (unit[:, 1:] * unit[:, :-1]).sum(-1)  # slots are in position order
        breaks = (adjacent < self.threshold) | ~valid[:, 1:] | ~valid[:, :-1]
        merging_set = torch.cat([adjacent.new_zeros(adjacent.shape[0], 1), breaks.float().cumsum(-1)], dim=-1)
        similarity = unit @ unit.transpose(1, 2)  # (heads, slots, slots)
        allowed = dropped[:, :, None] & alive[:, None, :] & (merging_set[:, :, None] == merging_set[:, None, :])
        best, pivot = similarity.masked_fill(~allowed, float("-inf")).max(dim=-1)  # pivot: the kept slot
        merged = dropped & (best > float("-inf"))
        pivot_keys = keys.gather(1, pivot[..., None].expand_as(keys))
        spread = 2 * self.sigma ** 2 * pivot_keys.pow(2).sum(-1).clamp_min(1e-12)
        weights = torch.where(merged, torch.exp(-(keys - pivot_keys).pow(2).sum(-1) / spread), 0.0)
        slots = torch.arange(keys.shape[1], device=keys.device).expand_as(pivot)
        layer.merge(pivot, slots, weights, torch.ones_like(weights))  # the pivot's own weight is exp(0) = 1
        return torch.where(merged, layer.positions().gather(1, pivot), -1)
