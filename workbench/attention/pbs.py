"""`pbs`: Permuted Block-Sparse attention. Attention does not change when keys and values are permuted
together, so keys can be reordered to put the important ones side by side; block top-k then covers the same
attention mass with fewer tiles.

The rule implemented here, per call:
1. Key importance: the attention the last `last_q` queries give each key, summed over them and over the query
   heads sharing the KV head (PBS's query-aware estimate; in decoding, the single query).
2. Permutation: keys are sorted by importance, most important first, within each segment of `segment` slots.
   Segments never mix, so a segment that lies entirely before a query stays entirely visible to it.
3. Selection, per query tile: the `top_k` permuted tiles with the highest pooled score (mean query . mean
   permuted key) among the tiles of the segments entirely before the tile's first query, plus the segments
   that are not (the diagonal ones), dense under causality in their original order.
The output is exact dense attention over the kept keys. The fused kernel gets the permuted keys followed by the
keys in slot order and loads only the chosen tiles of each (see workbench.attention.sparsity.Sparsity), so the
diagonal segments keep their causal tile structure while earlier segments are read in permuted tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.attention import reference
from workbench.attention.sparsity import (MaskedVariant, Sparsity, check_block_size, key_tiles, last_query_probs,
                                          pooled_tile_scores, tile_queries, top_tiles)
from workbench.errors import ParameterError
from workbench.registry import param


@dataclass
class PBS(MaskedVariant):
    name = "pbs"
    summary = "Permute keys within segments by estimated importance, then block top-k over the permuted tiles."
    paper = "Sparser Block-Sparse Attention via Token Permutation (PBS-Attn; Wang et al., 2025)"

    top_k: int = param(4, "key tiles per query tile from the earlier segments", min=1, max=4096)
    block_size: int = param(64, "tile edge (query rows and key slots)", min=16, max=1024)
    segment: int = param(256, "keys per permutation segment (a multiple of block_size)", min=16, max=65536)
    last_q: int = param(64, "queries at the end the key importance is estimated from", min=1, max=4096)

    def validate(self) -> None:
        check_block_size(self, self.block_size)
        if self.segment % self.block_size:
            raise ParameterError(f"attention '{self.name}': segment ({self.segment}) must be a multiple of "
                                 f"block_size ({self.block_size})")

    def permutation(self, call) -> torch.Tensor:
        """Long (batch, kv_heads, K): slots in the order the kernel sees them (sorted within segments)."""
        importance = reference.group_key_mass(last_query_probs(call, self.last_q), call.groups)  # (B, KVH, K)
        k_len = importance.shape[-1]
        pad = -k_len % self.segment  # padding sorts last (below any probability) and is cut off again
        padded = torch.nn.functional.pad(importance, (0, pad), value=-1.0).unflatten(-1, (-1, self.segment))
        order = padded.argsort(dim=-1, descending=True, stable=True)
        order = order + torch.arange(0, k_len + pad, self.segment, device=order.device)[:, None]
        return order.flatten(-2)[..., :k_len]

    def sparsity(self, call) -> Sparsity:
        bs = self.block_size
        order = self.permutation(call)
        index = order[..., None].expand(-1, -1, -1, call.key.shape[-1])
        scores = pooled_tile_scores(call, bs, key=call.key.gather(2, index))
        first, last = tile_queries(call, bs)
        tiles = key_tiles(call, bs)
        segment_start = tiles // self.segment * self.segment
        before = segment_start[None] + self.segment <= first[:, None]  # whole segment precedes the query tile
        diagonal = ~before & (tiles[None] <= last[:, None])  # the rest, causally, in slot order
        chosen = top_tiles(scores, before, self.top_k)
        return Sparsity(block_mask=torch.cat([chosen, diagonal.expand_as(chosen)], dim=-1), block_size=bs,
                        order=order)
