"""`topk_retrieval`: each query attends only to the keys retrieved for it, plus attention sinks and a recent
window (RetrievalAttention / Quest).

    select="exact" -- the `top_k` keys with the highest score q.k (what an exact index would return;
                      RetrievalAttention approximates it with a vector index over the keys)
    select="pages" -- Quest: keys are grouped in pages of `page_size` slots with per-channel key minimum and
                      maximum; a page's score is the upper bound sum_d max(q_d * kmin_d, q_d * kmax_d) of any of
                      its keys' q.k, and the ceil(top_k / page_size) best pages are kept whole

Selection is per query head and per query, among the keys the query may see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.attention import reference
from workbench.attention.sparsity import MaskedVariant, Sparsity, recent_keys, top_tiles
from workbench.registry import param


@dataclass
class TopKRetrieval(MaskedVariant):
    name = "topk_retrieval"
    summary = "Each query sees its top-k keys (exactly, or through Quest page bounds) plus sinks and a window."
    paper = ("RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval (Liu et al., 2024); "
             "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (Tang et al., ICML 2024)")

    top_k: int = param(64, "keys retrieved per query (select=pages: rounded up to whole pages)", min=1, max=131072)
    select: str = param("exact", "how keys are retrieved: exact top-k scores, or Quest page bounds",
                        choices=("exact", "pages"))
    page_size: int = param(16, "select=pages: key slots per page", min=1, max=1024)
    sinks: int = param(4, "initial keys every query sees", min=0, max=1024)
    window: int = param(16, "recent keys every query sees, itself included (0 = none)", min=0, max=131072)

    def sparsity(self, call) -> Sparsity:
        seen = reference.allowed(call)
        retrieved = self.exact(call, seen) if self.select == "exact" else self.pages(call, seen)
        return Sparsity(mask=retrieved | recent_keys(call, self.window, self.sinks), block_size=64)

    def exact(self, call, seen: torch.Tensor) -> torch.Tensor:
        """Bool (batch, heads, Q, K): each row's top_k visible keys by q.k."""
        key = call.key.float().transpose(-1, -2)
        return torch.cat([top_tiles(reference.by_group(call.query[:, :, rows].float(), key),
                                    seen[:, :, rows], self.top_k)
                          for rows in reference.row_chunks(call.query.shape[2])], dim=2)

    def pages(self, call, seen: torch.Tensor) -> torch.Tensor:
        """Bool (batch, heads, Q, K): the keys of each row's best pages by Quest's upper bound."""
        size, k_len = self.page_size, call.key.shape[2]
        pad = -k_len % size
        key = call.key.float()
        kmin = torch.nn.functional.pad(key, (0, 0, 0, pad), value=float("inf")).unflatten(2, (-1, size)).amin(3)
        kmax = torch.nn.functional.pad(key, (0, 0, 0, pad), value=float("-inf")).unflatten(2, (-1, size)).amax(3)
        kmin, kmax = (x.repeat_interleave(call.groups, dim=1) for x in (kmin, kmax))  # (batch, heads, pages, dim)
        # max(q*kmin, q*kmax) = q+ * kmax + q- * kmin (kmax >= kmin): the bound is two matmuls
        query = call.query.float()
        bound = (torch.matmul(query.clamp_min(0), kmax.transpose(-1, -2))
                 + torch.matmul(query.clamp_max(0), kmin.transpose(-1, -2)))  # (batch, heads, Q, pages)
        any_seen = torch.nn.functional.pad(seen, (0, pad)).unflatten(-1, (-1, size)).any(-1)
        n_pages = min(math.ceil(self.top_k / size), bound.shape[-1])
        chosen = top_tiles(bound, any_seen, n_pages)
        return chosen.repeat_interleave(size, dim=-1)[..., :k_len] & seen
