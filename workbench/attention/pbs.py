"""`pbs`: Permuted Block-Sparse attention. Attention does not change when keys and values are permuted
together, so keys can be reordered to put the important ones side by side; block selection then covers the same
attention mass with fewer tiles.

The rule of the paper's reference code (pbs-attn), per prompt pass:
1. Key importance: the attention the last `last_q` queries (default: the last query tile) give each key, per
   query head.
2. Permutation: keys are sorted by importance, most important first, within each segment of `segment` slots.
   Segments never mix, so a segment that lies entirely before a query stays entirely visible to it.
3. Selection, per query tile, among the permuted tiles of the segments entirely before it: the softmax of the
   pooled scores (mean query . mean permuted key, scaled) over those tiles, and the fewest best tiles whose share
   reaches `threshold` (0.9); the permuted tile holding the first key is always kept. The query tile's own
   segment is kept whole (dense under causality, in slot order).
4. Passes of tokens the run chose (decode, verify, rollout) run dense: PBS sparsifies the prefill only.
The output is exact dense attention over the kept keys. The fused kernel gets the permuted keys followed by the
keys in slot order and loads only the chosen tiles of each (see workbench.attention.sparsity.Sparsity), so the
diagonal segments keep their causal tile structure while earlier segments are read in permuted tiles.

Options beyond the paper: `top_k` (a fixed number of tiles instead of the threshold), `permute="kv_head"` (one
order per KV head, shared by its query heads: the kernel then holds one permuted copy of the keys per KV head,
not one per query head), `sparse_decode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.attention import reference
from workbench.attention.sparsity import (MaskedVariant, Sparsity, by_query_head, check_block_size, key_tiles,
                                          last_query_probs, mass_tiles, pooled_tile_scores, tile_queries, top_tiles)
from workbench.errors import ParameterError
from workbench.registry import param


@dataclass
class PBS(MaskedVariant):
    name = "pbs"
    summary = ("Permute keys within segments by estimated importance, then keep the permuted tiles holding "
               "`threshold` of the pooled block attention (prefill only).")
    paper = "Sparser Block-Sparse Attention via Token Permutation (PBS-Attn; Wang et al., 2025)"
    departs = "a last, partial query tile's pooled mean counts its real queries (PBS's pads with zero queries)"

    threshold: float = param(0.9, "share of the pooled block attention the kept earlier-segment tiles reach "
                             "(PBS: 0.9)", min=0.0, max=1.0)
    top_k: int = param(0, "> 0: keep this many earlier-segment tiles per query tile instead (not in the paper)",
                       min=0, max=4096)
    block_size: int = param(128, "tile edge (query rows and key slots); PBS: 128", min=16, max=1024)
    segment: int = param(256, "keys per permutation segment (a multiple of block_size); PBS: 256", min=16, max=65536)
    last_q: int = param(0, "queries at the end the key importance is estimated from (0 = block_size: PBS's last "
                        "query tile)", min=0, max=4096)
    permute: str = param("query_head", "one key order per query head (PBS) or per KV head (shared by its group)",
                         choices=("query_head", "kv_head"))
    keep_first: bool = param(True, "always keep the permuted tile holding the first key (PBS)")
    sparse_decode: bool = param(False, "also sparsify decode/verify/rollout passes, estimated from their queries "
                                "(PBS runs them dense)")

    def validate(self) -> None:
        check_block_size(self, self.block_size)
        if self.segment % self.block_size:
            raise ParameterError(f"attention '{self.name}': segment ({self.segment}) must be a multiple of "
                                 f"block_size ({self.block_size})")

    def permutation(self, call) -> torch.Tensor:
        """Long (batch, heads or kv_heads, K): slots in the order the kernel sees them (sorted within segments)."""
        probs = last_query_probs(call, self.last_q or self.block_size)  # (B, H, L, K)
        importance = probs.sum(2) if self.permute == "query_head" else reference.group_key_mass(probs, call.groups)
        k_len = importance.shape[-1]
        pad = -k_len % self.segment  # padding sorts last (below any probability) and is cut off again
        padded = torch.nn.functional.pad(importance, (0, pad), value=-1.0).unflatten(-1, (-1, self.segment))
        order = padded.argsort(dim=-1, descending=True, stable=True)
        order = order + torch.arange(0, k_len + pad, self.segment, device=order.device)[:, None]
        return order.flatten(-2)[..., :k_len]

    def sparsity(self, call) -> Sparsity:
        if call.decoding and not self.sparse_decode:
            return Sparsity()  # dense: PBS accelerates the prefill
        bs = self.block_size
        order = self.permutation(call)
        key = call.key if order.shape[1] == call.key.shape[1] else call.key.repeat_interleave(call.groups, dim=1)
        scores = pooled_tile_scores(call, bs, key=key.gather(2, order[..., None].expand(-1, -1, -1, key.shape[-1])))
        first, last = tile_queries(call, bs)
        tiles = key_tiles(call, bs)
        segment_start = tiles // self.segment * self.segment
        before = segment_start[None] + self.segment <= first[:, None]  # whole segment precedes the query tile
        diagonal = ~before & (tiles[None] <= last[:, None])  # the rest, causally, in slot order
        if self.top_k:
            chosen = top_tiles(scores, before, self.top_k)
        else:
            chosen = mass_tiles(scores, before, self.threshold)
        if self.keep_first:  # the first key's permuted tile, where its segment is an earlier one
            first_tile = first_key_tile(by_query_head(order, call.query.shape[1]), bs, tiles.shape[0])
            chosen = chosen | (first_tile[:, :, None, :] & before)
        return Sparsity(block_mask=torch.cat([chosen, diagonal.expand_as(chosen)], dim=-1), block_size=bs,
                        order=order)


def first_key_tile(order: torch.Tensor, block_size: int, n_tiles: int) -> torch.Tensor:
    """Bool (batch, heads, K tiles): the permuted tile that holds key slot 0."""
    tile = (order == 0).int().argmax(-1) // block_size  # where slot 0 went
    return torch.arange(n_tiles, device=order.device) == tile[..., None]
