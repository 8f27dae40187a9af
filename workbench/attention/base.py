"""What an attention variant sees and returns.

transformers calls one attention function per layer with the query, the whole cached key/value and a mask.
workbench hands that call to the session's variant as an `AttentionCall`; the variant returns an
`AttentionResult`: the output, plus the statistics the recorder asked for (per-query entropy, attention rows).
The call says which phase of the run the forward pass belongs to (see PHASES) and the position of every query:
components read those, never guess them from the number of queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.registry import Component

# What a variant can be asked for besides its output:
#   entropy  -- (batch, heads, q_len): Shannon entropy of each attention row
#   probs    -- (batch, heads, q_len, k_len): the attention rows themselves
#   key_mass -- (batch, kv_heads, k_len): attention each key received, summed over the queries and over the query
#               heads of its KV group (the score H2O-style caches accumulate)
STATISTICS = ("entropy", "probs", "key_mass")

# The phases of a forward pass:
#   prefill  the prompt (the first pass of a run)
#   decode   tokens the run has chosen, one pass per step
#   verify   k + 1 draft positions checked at once (speculative decoding): provisional until committed
#   rollout  a look-ahead that will be discarded (or committed): provisional
#   append   a later chat turn, or a chunk of teacher-forced text, on top of what the cache holds
PHASES = ("prefill", "decode", "verify", "rollout", "append")
PROVISIONAL = frozenset({"verify", "rollout"})
DECODING = frozenset({"decode", "verify", "rollout"})  # passes of tokens the run itself chose (or might choose)


@dataclass
class AttentionCall:
    layer: int
    query: torch.Tensor  # (batch, heads, q_len, head_dim), RoPE applied
    key: torch.Tensor  # (batch, kv_heads, k_len, head_dim): everything the cache holds for this layer
    value: torch.Tensor  # (batch, kv_heads, k_len, head_dim)
    mask: torch.Tensor | None  # bool (batch, 1, q_len, k_len), True = may attend; None = plain causal
    scaling: float
    module: Any  # the transformers attention module (has layer_idx, num_key_value_groups, ...)
    kwargs: dict = field(default_factory=dict)  # the rest of what transformers passed (dropout, softcap, ...)
    # query heads whose attention rows ("probs") the observer keeps; None = all. A variant may compute rows for
    # these heads only (then `AttentionResult.probs` has len(probs_heads) heads), keeping memory linear elsewhere.
    probs_heads: tuple[int, ...] | None = None
    # (kv_heads, k_len) long: the token position in each key slot (-1: padding) when the cache evicted or
    # reordered tokens; None when slot i holds position i. Set by the bridge for observers of attention rows.
    slot_positions: torch.Tensor | None = None
    # what a variant worked out for this call and may need again within it (e.g. its sparsity pattern, which
    # both `attend` and the fidelity metric's `kept_mask` use)
    memo: dict = field(default_factory=dict)
    phase: str = "prefill"  # one of PHASES
    start: int = 0  # the position of the first query (query i is the token at position start + i)

    @property
    def groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.query.shape[1] // self.key.shape[1]

    @property
    def num_queries(self) -> int:
        return self.query.shape[2]

    @property
    def provisional(self) -> bool:
        return self.phase in PROVISIONAL

    @property
    def decoding(self) -> bool:
        """A pass of tokens the run chose (decode) or may choose (verify, rollout)."""
        return self.phase in DECODING

    def positions(self) -> torch.Tensor:
        """Long (q_len,): the position of each query."""
        return torch.arange(self.start, self.start + self.num_queries, device=self.query.device)

    def row(self, i: int) -> AttentionCall:
        """The same call for query row i alone (its mask row, its position); statistics memo not shared."""
        mask = None if self.mask is None else self.mask[:, :, i:i + 1]
        return AttentionCall(self.layer, self.query[:, :, i:i + 1], self.key, self.value, mask, self.scaling,
                             self.module, self.kwargs, self.probs_heads, self.slot_positions, {}, self.phase,
                             self.start + i)


@dataclass
class AttentionResult:
    output: torch.Tensor  # (batch, q_len, heads, head_dim): the layout transformers expects back
    entropy: torch.Tensor | None = None  # (batch, heads, q_len) float32, Shannon entropy (nats) of each row
    probs: torch.Tensor | None = None  # (batch, heads or len(call.probs_heads), q_len, k_len) float32 rows
    key_mass: torch.Tensor | None = None  # (batch, kv_heads, k_len) float32 attention received per key


class AttentionVariant(Component):
    """Base of attention variants: `attend` computes the layer's attention output and, when asked
    (`want` is a subset of STATISTICS), the statistics of the attention it actually used.

    any_mask -- True for dense variants that attend exactly where `call.mask` allows, whatever its shape (a tree
                verify pass's ancestor mask); sparse variants choose keys by position and leave it False."""

    any_mask = False
    reads_packed = False  # has `attend_packed`: decodes straight from a packed quantized cache's codes

    def attend(self, call: AttentionCall, want: frozenset[str]) -> AttentionResult:
        raise NotImplementedError

    def serves_packed(self, call: AttentionCall) -> bool:
        """Whether this layer's options (what transformers passed besides q, k, v) let `attend_packed` compute its
        attention; they do not change between passes, so False sends the layer to the dequantized view for good."""
        return False

    def attend_packed(self, call: AttentionCall, packed, want: frozenset[str]) -> AttentionResult:
        """Attention of a decoding call (plain causal, q_len * groups <= kernels.packed_decode.MAX_ROWS) over
        `packed` (workbench.cache.quantized_store.PackedLayer) instead of call.key / call.value, with the
        statistics in `want` ("entropy", "key_mass"). Only for variants with `reads_packed`."""
        raise NotImplementedError
