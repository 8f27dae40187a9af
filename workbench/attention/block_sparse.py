"""`block_sparse`: MInference's three dynamic sparse patterns, one chosen for every head.

    a_shape        -- the first `sinks` keys + the `window` most recent ones (a static "A" shape)
    vertical_slash -- from the last `last_q` queries' attention, `vertical` key columns and `slash` diagonals
                      (constant query-key distance); every query then sees those columns and those diagonals.
                      As in MInference, the first `sink_columns` (30) columns and the `local_diagonals` (100)
                      nearest diagonals are always among them; the rest are those that received the most mass.
    block_topk     -- per query tile, the `top_k` key tiles with the highest pooled score (mean query of the
                      tile . mean key of the tile), plus the diagonal tiles holding the queries' own keys

The pattern applies to prompt passes (prefill, append); passes of tokens the run chose (decode, verify, rollout)
run dense, as MInference runs decoding with dense attention (`sparse_decode=True` rebuilds the pattern from
their queries instead). `sink_columns=0, local_diagonals=1` keeps only each query's own diagonal forced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.attention.sparsity import (MaskedVariant, Sparsity, causal_tiles, check_block_size,
                                          diagonal_tiles, last_query_probs, pooled_tile_scores, query_slots,
                                          top_tiles)
from workbench.errors import ParameterError
from workbench.registry import param

PATTERNS = ("a_shape", "vertical_slash", "block_topk")


@dataclass
class BlockSparse(MaskedVariant):
    name = "block_sparse"
    summary = ("MInference dynamic sparse prefill: A-shape, vertical-slash or block top-k, indices built online; "
               "decoding dense.")
    paper = ("MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention "
             "(Jiang et al., NeurIPS 2024)")
    departs = ("one pattern and one budget for every head, chosen by parameter (MInference assigns each head its "
               "pattern and budgets by an offline search on the model, e.g. 1000 columns / 6096 diagonals at 128K "
               "tokens, which would leave workbench-length prompts dense); indices are built online for every call")

    pattern: str = param("vertical_slash", "which sparse pattern every head uses", choices=PATTERNS)
    sinks: int = param(16, "a_shape: initial keys every query sees", min=0, max=4096)
    window: int = param(128, "a_shape: recent keys each query sees, itself included", min=1, max=131072)
    vertical: int = param(64, "vertical_slash: key columns kept, the first `sink_columns` included (at least "
                          "those)", min=0, max=131072)
    slash: int = param(128, "vertical_slash: diagonals kept, the `local_diagonals` nearest included (at least "
                       "those)", min=1, max=131072)
    sink_columns: int = param(30, "vertical_slash: first key columns always kept (MInference: 30)", min=0, max=4096)
    local_diagonals: int = param(100, "vertical_slash: nearest diagonals always kept, the main one included "
                                 "(MInference: 100)", min=1, max=131072)
    last_q: int = param(64, "vertical_slash: queries at the end the pattern is estimated from", min=1, max=4096)
    top_k: int = param(4, "block_topk: key tiles per query tile besides the diagonal ones", min=1, max=4096)
    block_size: int = param(64, "block_topk: tile edge (query rows and key slots)", min=16, max=1024)
    sparse_decode: bool = param(False, "also sparsify decode/verify/rollout passes, the pattern rebuilt from their "
                                "queries (MInference runs them dense)")

    def validate(self) -> None:
        check_block_size(self, self.block_size)
        if self.sinks > self.window:
            raise ParameterError(f"attention '{self.name}': sinks ({self.sinks}) must be <= window ({self.window}) "
                                 "(a_shape keeps a few initial tokens beside the recent window)")

    def sparsity(self, call) -> Sparsity:
        if call.decoding and not self.sparse_decode:
            return Sparsity()  # dense: MInference accelerates the prefill
        return getattr(self, self.pattern)(call)

    def a_shape(self, call) -> Sparsity:
        return Sparsity(window=self.window, sinks=self.sinks)

    def vertical_slash(self, call) -> Sparsity:
        probs = last_query_probs(call, self.last_q)  # (batch, heads, L, K)
        k_len = probs.shape[-1]
        columns = probs.sum(2)
        # mass per diagonal: query at slot p reaching key j lies on diagonal p - j
        distance = query_slots(call)[:, None] - torch.arange(k_len, device=probs.device)[None]  # (Q, K)
        last = distance[-probs.shape[2]:].clamp_min(0)
        diagonals = torch.zeros_like(columns).scatter_add_(
            -1, last.flatten().expand(*columns.shape[:2], -1), probs.flatten(2))  # masked keys add 0
        columns[..., :self.sink_columns] = float("inf")  # always kept, within the budget (as MInference)
        diagonals[..., :self.local_diagonals] = float("inf")  # the nearest ones, each query's own key first
        keep_columns = top_tiles(columns, None, max(self.vertical, self.sink_columns))
        keep_diagonals = top_tiles(diagonals, None, max(self.slash, self.local_diagonals))
        on_diagonal = keep_diagonals[:, :, None, :].expand(-1, -1, distance.shape[0], -1).gather(
            -1, distance.clamp_min(0).expand(*keep_diagonals.shape[:2], -1, -1)) & (distance >= 0)
        return Sparsity(mask=keep_columns[:, :, None, :] | on_diagonal, block_size=self.block_size)

    def block_topk(self, call) -> Sparsity:
        bs = self.block_size
        diagonal = diagonal_tiles(call, bs)
        chosen = top_tiles(pooled_tile_scores(call, bs), causal_tiles(call, bs) & ~diagonal, self.top_k)
        return Sparsity(block_mask=chosen | diagonal, block_size=bs)
