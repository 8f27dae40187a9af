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

Inside a verify or rollout pass (see workbench.cache.kvcache) this policy evicts once, at commit: its merges change
kept keys and values and cannot be tentative, so the pass's rows see the cache as it was before the pass's own
evictions, and commit observes the accepted rows and evicts once. tests/test_transactions.py measures the KL this
costs against feeding the same tokens one by one.
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
    departs = ("merging sets only decide where evicted tokens go (H2O's score decides what is kept); inside a "
               "verify or rollout pass it evicts once, at commit (merges cannot be tentative), so the verify rows see "
               "the cache before that pass's evictions")

    threshold: float = param(0.8, "consecutive tokens whose keys have at least this cosine similarity form a "
                                  "merging set", min=-1.0, max=1.0)
    sigma: float = param(0.5, "width of the Gaussian merging kernel, relative to the pivot key's norm; > 0", min=0.0)

    def validate(self) -> None:
        super().validate()
        if self.sigma <= 0:
            raise ParameterError(f"cache '{self.name}' parameter 'sigma' must be > 0 (the kernel width), got 0")

    tentative = False  # merges cannot be undone: inside a provisional pass it evicts at commit
    merges = True

    def merge(self, layer, gone, going, alive, call) -> torch.Tensor:
        keys, valid, positions = layer.held_keys().float(), layer.valid(call), layer.positions()
        unit = F.normalize(keys, dim=-1)
        # merging sets: runs of consecutive held tokens (slots are in position order; holes are skipped) whose
        # adjacent keys have cosine similarity >= threshold
        slots = torch.arange(keys.shape[1], device=keys.device).expand_as(positions)
        before = torch.where(valid, slots, -1).cummax(dim=1).values  # the last held slot at or before each slot
        previous = torch.cat([before.new_full((before.shape[0], 1), -1), before[:, :-1]], dim=1)
        adjacent = (unit * _rows(unit, previous.clamp_min(0))).sum(-1)
        starts = valid & ((previous < 0) | (adjacent < self.threshold))
        merging_set = starts.cumsum(dim=1)
        similarity = _rows(unit, gone) @ unit.transpose(1, 2)  # (heads, gone, slots)
        allowed = alive[:, None, :] & (merging_set[:, None, :] == merging_set.gather(1, gone)[:, :, None])
        best, pivot = similarity.masked_fill(~(allowed & going[..., None]), float("-inf")).max(dim=-1)
        merged = going & (best > float("-inf"))
        pivot_keys = _rows(keys, pivot)
        spread = 2 * self.sigma ** 2 * pivot_keys.pow(2).sum(-1).clamp_min(1e-12)
        weights = torch.where(merged, torch.exp(-(_rows(keys, gone) - pivot_keys).pow(2).sum(-1) / spread), 0.0)
        layer.merge(pivot, gone, weights, torch.ones(positions.shape, device=keys.device))  # the pivot: exp(0)
        return torch.where(merged, positions.gather(1, pivot), -1)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (heads, slots, d) at index (heads, m) -> (heads, m, d)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
