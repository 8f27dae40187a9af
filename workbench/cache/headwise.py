"""Per-KV-head cache storage: each KV head of each layer keeps its own tokens, so heads can hold different
tokens and different numbers of them, and the bytes held are really only what is kept.

`HeadwiseLayer` is a transformers cache layer. On `update` it appends the new keys/values to every head and
returns them stacked as (1, kv_heads, n, head_dim); when heads hold different counts the stack is padded and
`attention_mask` says which slots are real. The padded stack is transient: only the per-head tensors stay.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from workbench.errors import WorkbenchError


class HeadwiseLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self):
        super().__init__()
        self.head_keys: list[torch.Tensor] = []  # per KV head: (n_h, head_dim)
        self.head_values: list[torch.Tensor] = []
        self.head_positions: list[torch.Tensor] = []  # per KV head: (n_h,) absolute positions, ascending
        self.seen = 0  # tokens this layer has been given so far (the next token's position)
        self.last_query_positions: torch.Tensor | None = None  # positions of the tokens of the latest update
        self.events: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (head, positions, merged_into)

    # -- transformers' cache layer interface ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[0] != 1:
            raise WorkbenchError(f"compressing caches hold one sequence; got a batch of {key_states.shape[0]}")
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states.new_zeros((0, key_states.shape[-1]))
        heads = key_states.shape[1]
        self.head_keys = [empty] * heads
        self.head_values = [value_states.new_zeros((0, value_states.shape[-1]))] * heads
        self.head_positions = [torch.zeros(0, dtype=torch.long, device=key_states.device)] * heads
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        positions = torch.arange(self.seen, self.seen + new, device=key_states.device)
        for h in range(len(self.head_keys)):
            self.head_keys[h] = torch.cat([self.head_keys[h], key_states[0, h]])
            self.head_values[h] = torch.cat([self.head_values[h], value_states[0, h]])
            self.head_positions[h] = torch.cat([self.head_positions[h], positions])
        self.seen += new
        self.last_query_positions = positions
        return self.stacked()

    def get_seq_length(self) -> int:
        return self.seen  # transformers derives the next position from this

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.held_max() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__()

    # -- what workbench adds ----------------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return len(self.head_keys)

    def held(self) -> list[int]:
        return [k.shape[0] for k in self.head_keys]

    def held_max(self) -> int:
        return max(self.held(), default=0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.head_keys, *self.head_values))

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as (1, kv_heads, n_max, head_dim); shorter heads are zero-padded at the end."""
        return _pad_stack(self.head_keys)[None], _pad_stack(self.head_values)[None]

    def slot_positions(self) -> torch.Tensor:
        """Long (kv_heads, n_max): the position each slot of `stacked()` holds, -1 for padding."""
        return _pad_stack([p[:, None] for p in self.head_positions], fill=-1)[..., 0]

    def attention_mask(self) -> torch.Tensor | None:
        """Bool (1, kv_heads, q_len, n_max) for the latest update's queries: a slot is visible when it holds a
        token and that token's position is not after the query's. None when plain attention is already right
        (every head holds the same count and the queries are a single token or the whole cache)."""
        held = self.held()
        queries = self.last_query_positions
        n_max = max(held)
        if len(set(held)) == 1 and (len(queries) == 1 or len(queries) == n_max):
            return None
        positions = self.slot_positions()
        visible = (positions[:, None, :] >= 0) & (positions[:, None, :] <= queries[None, :, None])
        return visible[None]

    def keep(self, head: int, indices: torch.Tensor, merged_into: torch.Tensor | None = None) -> None:
        """Keep only the entries at `indices` (into the head's current storage) of one head and log the rest.

        merged_into -- for merging policies: per dropped entry (in storage order), the position of the kept
                       entry it was merged into, or -1 (the policy has already updated that entry's key/value)."""
        indices = indices.sort().values
        dropped = torch.ones(self.head_keys[head].shape[0], dtype=torch.bool, device=indices.device)
        dropped[indices] = False
        if dropped.any():
            self.events.append((head, self.head_positions[head][dropped], merged_into))
        self.head_keys[head] = self.head_keys[head][indices].contiguous()
        self.head_values[head] = self.head_values[head][indices].contiguous()
        self.head_positions[head] = self.head_positions[head][indices]

    def drain_events(self) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        events, self.events = self.events, []
        return events


def _pad_stack(tensors: list[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
    lengths = {t.shape[0] for t in tensors}
    if len(lengths) == 1:
        return torch.stack(tensors)
    n_max = max(lengths)
    out = tensors[0].new_full((len(tensors), n_max, *tensors[0].shape[1:]), fill)
    for h, t in enumerate(tensors):
        out[h, :t.shape[0]] = t
    return out
