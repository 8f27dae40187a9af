"""`topk_retrieval`: each decoding query attends only to the keys retrieved for it, plus attention sinks and a
recent window (RetrievalAttention / Quest).

    select="exact" -- the `top_k` keys with the highest score q.k (what an exact index would return;
                      RetrievalAttention approximates it with a vector index over the keys)
    select="pages" -- Quest: keys are grouped in pages of `page_size` slots with per-channel key minimum and
                      maximum; a page's score is the upper bound sum_d max(q_d * kmin_d, q_d * kmax_d) of any of
                      its keys' q.k, and the max(min_pages, top_k // page_size) best pages are kept whole
                      (Quest's page count for a token budget top_k: max(3, budget // 16))

Selection is per query head and per query, among the keys the query may see. Both papers retrieve while
decoding: prompt passes (prefill, append) run dense (`dense_prefill`). Quest also runs its first two layers dense.
Parameters left at None take the chosen method's value (PAPER_DEFAULTS): with select="pages" no sinks, no window
and layers 0-1 dense, as in Quest; with select="exact" 4 sinks and a 16-key window, every layer retrieving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.attention import reference
from workbench.attention.sparsity import MaskedVariant, Sparsity, recent_keys, top_tiles
from workbench.registry import param

# what a None parameter means under each select
PAPER_DEFAULTS = {"pages": {"sinks": 0, "window": 0, "dense_layers": 2},
                  "exact": {"sinks": 4, "window": 16, "dense_layers": 0}}


@dataclass
class TopKRetrieval(MaskedVariant):
    name = "topk_retrieval"
    summary = ("Each decoding query sees its top-k keys (exactly, or through Quest page bounds) plus sinks and a "
               "window; prompt passes dense.")
    paper = ("RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval (Liu et al., 2024); "
             "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (Tang et al., ICML 2024)")
    departs = ("select=exact retrieves exactly (no approximate vector index) and its default static keys (4 sinks, "
               "a 16-key window) are sized for workbench-length prompts, not RetrievalAttention's long contexts")

    top_k: int = param(64, "token budget per query: exact keeps this many keys; pages keeps max(min_pages, "
                       "top_k // page_size) pages", min=1, max=131072)
    select: str = param("exact", "how keys are retrieved: exact top-k scores, or Quest page bounds",
                        choices=("exact", "pages"))
    page_size: int = param(16, "select=pages: key slots per page (Quest: 16)", min=1, max=1024)
    min_pages: int = param(3, "select=pages: fewest pages kept (Quest: 3)", min=1, max=4096)
    sinks: int | None = param(None, "initial keys every query sees (None: 0 for pages, 4 for exact)", min=0, max=1024)
    window: int | None = param(None, "recent keys every query sees, itself included (None: 0 for pages, 16 for "
                               "exact)", min=0, max=131072)
    dense_layers: int | None = param(None, "the first layers run dense (None: 2 for pages - Quest; 0 for exact)",
                                     min=0, max=1024)
    dense_prefill: bool = param(True, "prompt passes (prefill, append) run dense; retrieval applies to decoding "
                                "passes (both papers)")

    def setting(self, name: str) -> int:
        """The parameter's value, or the chosen method's default where it is None."""
        value = getattr(self, name)
        return PAPER_DEFAULTS[self.select][name] if value is None else value

    def sparsity(self, call) -> Sparsity:
        if (self.dense_prefill and not call.decoding) or call.layer < self.setting("dense_layers"):
            return Sparsity()
        seen = reference.allowed(call)
        retrieved = self.exact(call, seen) if self.select == "exact" else self.pages(call, seen)
        static = recent_keys(call, self.setting("window"), self.setting("sinks"))
        return Sparsity(mask=retrieved | static, block_size=64)

    def exact(self, call, seen: torch.Tensor) -> torch.Tensor:
        """Bool (batch, heads, Q, K): each row's top_k visible keys by q.k."""
        key = call.key.float().transpose(-1, -2)
        return torch.cat([top_tiles(reference.by_group(call.query[:, :, rows].float(), key),
                                    seen[:, :, rows], self.top_k)
                          for rows in reference.row_chunks(call.query.shape[2])], dim=2)

    def page_count(self, k_len: int) -> int:
        """Pages kept for K keys: Quest's max(3, min(budget, K) // page size), at most the pages there are."""
        n_pages = -(-k_len // self.page_size)
        return min(max(self.min_pages, min(self.top_k, k_len) // self.page_size), n_pages)

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
        chosen = top_tiles(bound, any_seen, self.page_count(k_len))
        return chosen.repeat_interleave(size, dim=-1)[..., :k_len] & seen
