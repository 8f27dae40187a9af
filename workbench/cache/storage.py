"""Where a cache layer's keys and values live: storage classes, kept apart from the policies that decide what stays.

A store holds, for one layer, the keys and values of every KV head in preallocated buffers with a capacity, and
the position of the token in each slot. Heads may hold different tokens and different numbers of them (`lengths`,
known on the host, so nothing has to ask the device how much is held). What a store offers:

    append(keys, values, start)   new tokens at positions start, start + 1, ... on every head
    view()                        keys and values (1, kv_heads, slots, head_dim) for attention (a view, no copy)
    slot_positions()              the position each slot holds (-1: padding), None while slot i is position i
    keep(alive, lengths)          keep the slots marked alive (per head, order preserved), free the rest
    crop(position)                drop every slot holding a position >= position (rolling back a tail)
    settle()                      every token held is committed (a compressing store may compress it now)
    merge(...)                    fold dropped entries into kept ones (merging policies)
    extras                        per-slot statistics of a policy (e.g. accumulated attention), kept aligned with
                                  the slots through keep, crop and growth
    nbytes()                      the bytes the key/value buffers occupy (what the memory really costs)

`DenseStore` keeps every head in lockstep (one length; a full cache, or a policy that keeps the same tokens on
every head); `RaggedStore` lets each head keep its own count (per-head eviction). A buffer grows to what it must
hold plus some slack (`slack`: a sixteenth, at least 8 slots) when full, and shrinks when a policy frees more than
twice that, so appending costs no copy most steps and a cache that evicts really holds fewer bytes.
"""

from __future__ import annotations

import torch


def slack(n: int) -> int:
    """Spare slots per head a buffer holding n tokens is given when it grows or shrinks."""
    return max(8, n // 16)


def holes_allowed(n: int) -> int:
    """Holes (slots freed one at a time) a head holding n tokens may have before they are compacted: at most an
    eighth of n (at least 4), and fewer than the slack, so that holes plus the next token never grow the buffer."""
    return min(max(4, n // 8), slack(n) - 1)


class DenseStore:
    """Keys and values of one layer, every KV head holding the same number of slots."""

    ragged = False

    def __init__(self):
        self.keys: torch.Tensor | None = None  # (kv_heads, capacity, head_dim)
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # (kv_heads, capacity) long; -1 beyond each head's length
        self.lengths: list[int] = []  # per KV head, on the host
        self.identity = True  # slot i holds position i on every head (nothing dropped or reordered)
        self.extras: dict[str, torch.Tensor] = {}  # name -> (kv_heads, capacity, ...) aligned with the slots
        self._fills: dict[str, float] = {}
        self._offsets, self._offsets_for = None, None  # cached (kv_heads, 1) row offsets for one capacity

    # -- shape ------------------------------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return self.keys is not None

    @property
    def num_heads(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1]

    @property
    def slots(self) -> int:
        """Slots a view spans: the longest head."""
        return max(self.lengths, default=0)

    def _allocate(self, like_keys: torch.Tensor, like_values: torch.Tensor, capacity: int, copy: bool = True) -> None:
        """New buffers of `capacity` slots per head; `copy`: with the slots held so far copied over."""
        heads = like_keys.shape[0]
        old = (self.keys, self.values, self.positions, dict(self.extras))
        self.keys = like_keys.new_zeros((heads, capacity, like_keys.shape[-1]))
        self.values = like_values.new_zeros((heads, capacity, like_values.shape[-1]))
        self.positions = torch.full((heads, capacity), -1, dtype=torch.long, device=like_keys.device)
        for name, tensor in old[3].items():
            self.extras[name] = tensor.new_full((heads, capacity, *tensor.shape[2:]), self._fills[name])
        if copy and old[0] is not None:
            n = min(self.slots, capacity)
            self.keys[:, :n], self.values[:, :n], self.positions[:, :n] = old[0][:, :n], old[1][:, :n], old[2][:, :n]
            for name, tensor in old[3].items():
                self.extras[name][:, :n] = tensor[:, :n]

    # -- writing ----------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """Add `keys`/`values` (kv_heads, n, head_dim) at positions start..start+n-1 after each head's slots."""
        heads, n = keys.shape[0], keys.shape[1]
        if not self.lengths:
            self.lengths = [0] * heads
        needed = max(self.lengths) + n
        if needed > self.capacity:  # the first pass (a prompt) gets exactly its size
            self._allocate(keys, values, needed if self.keys is None else needed + slack(needed))
        positions = torch.arange(start, start + n, device=keys.device)
        if self.identity and start != self.lengths[0]:
            self.identity = False
        if not self.ragged or len(set(self.lengths)) == 1:
            at = self.lengths[0]
            self.keys[:, at:at + n] = keys
            self.values[:, at:at + n] = values
            self.positions[:, at:at + n] = positions
            for name, tensor in self.extras.items():
                tensor[:, at:at + n] = self._fills[name]
        else:  # heads end at different slots: scatter each head's new rows after its own end
            slot = torch.tensor(self.lengths, device=keys.device)[:, None] + torch.arange(n, device=keys.device)
            head = torch.arange(heads, device=keys.device)[:, None].expand(-1, n)
            self.keys[head, slot] = keys
            self.values[head, slot] = values
            self.positions[head, slot] = positions.expand(heads, n)
            for name, tensor in self.extras.items():
                tensor[head, slot] = self._fills[name]
        self.lengths = [length + n for length in self.lengths]

    def settle(self) -> None:
        """Every token held is final (committed): a store that compresses (workbench.cache.quantized_store) may
        compress them now. A dense store has nothing to do."""

    def keep(self, alive: torch.Tensor, lengths: list[int]) -> None:
        """Keep, per head, the slots where `alive` (kv_heads, slots) is True, in their order; `lengths` is how many
        that is per head (the caller knows it on the host, so nothing waits for the device)."""
        order = torch.sort((~alive[:, :self.slots]).to(torch.int8), dim=1, stable=True).indices  # kept first
        self.keep_slots(order[:, :max(lengths, default=0)], lengths)

    def keep_slots(self, index: torch.Tensor, lengths: list[int]) -> None:
        """Keep, per head h, the slots index[h, :lengths[h]] (ascending), in that order, and free the rest."""
        if not self.ragged and len(set(lengths)) > 1:
            raise ValueError("a DenseStore keeps the same number of tokens on every head; use a RaggedStore")
        heads, width = index.shape
        flat = (index + self._head_offsets()).reshape(-1)  # rows of the (heads * capacity) flattened buffers
        taken = [_take(buffer, flat, heads, width) for buffer in (self.keys, self.values, self.positions)]
        extras = {name: _take(t, flat, heads, width) for name, t in self.extras.items()}
        span = self.slots
        if self.capacity > width + 2 * slack(width):  # much of the buffer was freed: really give the memory back
            self._allocate(taken[0], taken[1], width + slack(width), copy=False)
        self.keys[:, :width], self.values[:, :width], self.positions[:, :width] = taken
        for name, tensor in extras.items():
            self.extras[name][:, :width] = tensor
        if len(set(lengths)) > 1:  # slots past a head's new length are padding
            pad = torch.arange(width, device=index.device)[None] >= torch.tensor(lengths, device=index.device)[:, None]
            self.positions[:, :width].masked_fill_(pad, -1)
        if span > width:
            self.positions[:, width:span] = -1
        self.identity = self.identity and all(n == span for n in lengths)
        self.lengths = list(lengths)

    def _head_offsets(self) -> torch.Tensor:
        """(kv_heads, 1): where each head's rows start in the flattened buffers."""
        if self._offsets_for != (self.capacity, self.keys.device):
            self._offsets = torch.arange(self.num_heads, device=self.keys.device)[:, None] * self.capacity
            self._offsets_for = (self.capacity, self.keys.device)
        return self._offsets

    def crop(self, position: int, lengths: list[int]) -> None:
        """Drop every slot holding a position >= `position`. They are the last slots of each head (a tail of
        tokens appended after every kept one), `lengths` per head after the crop."""
        tail = self.positions[:, min(lengths, default=0):self.slots]
        tail.masked_fill_(tail >= position, -1)
        self.lengths = list(lengths)

    def merge(self, into: torch.Tensor, sources: torch.Tensor, weights: torch.Tensor,
              self_weights: torch.Tensor) -> None:
        """Fold entries into kept ones, per head: slot s becomes the weighted mean of itself (weight
        self_weights[h, s]) and every source slot j with into[h, j] == s (weight weights[h, j]).

        into, sources, weights -- (kv_heads, m): target slot, source slot and weight of each merge (weight 0: none)
        self_weights           -- (kv_heads, slots) the weight of each slot's own entry"""
        span = self.slots
        for buffer in (self.keys, self.values):
            rows = buffer[:, :span]
            if into.shape[1] == 1:  # one merge per head (decoding at a budget): only the target rows change
                target = _pick(rows, into).float()
                weight = weights[..., None]
                own = self_weights.gather(1, into)[..., None]
                merged = (own * target + weight * _pick(rows, sources).float()) / (own + weight)
                rows.scatter_(1, into[..., None].expand_as(target), torch.where(weight > 0, merged, target)
                              .to(buffer.dtype))
                continue
            rows = rows.float()
            picked = _pick(rows, sources)
            numerator = (rows * self_weights[..., None]).scatter_add(
                1, into[..., None].expand(-1, -1, rows.shape[-1]), picked * weights[..., None])
            denominator = self_weights.scatter_add(1, into, weights)
            changed = denominator != self_weights
            merged = numerator / denominator.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
            buffer[:, :span] = torch.where(changed[..., None], merged.to(buffer.dtype), buffer[:, :span])

    # -- policy statistics ------------------------------------------------------------------------------------
    def extra(self, name: str, fill: float = 0.0, dtype: torch.dtype = torch.float32,
              trailing: tuple[int, ...] = ()) -> torch.Tensor:
        """The (kv_heads, slots, *trailing) statistic `name`, created filled with `fill` on first use; new slots
        start at `fill` too. A view: write into it to update the statistic."""
        if name not in self.extras:
            self._fills[name] = fill
            device = self.keys.device
            self.extras[name] = torch.full((self.num_heads, self.capacity, *trailing), fill, dtype=dtype,
                                           device=device)
        return self.extras[name][:, :self.slots]

    # -- reading ----------------------------------------------------------------------------------------------
    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.slots
        return self.keys[None, :, :span], self.values[None, :, :span]

    def slot_positions(self) -> torch.Tensor | None:
        """Long (kv_heads, slots): the position each slot holds, -1 for padding; None while slot i is position i."""
        return None if self.identity else self.positions[:, :self.slots]

    def all_positions(self) -> torch.Tensor:
        """Long (kv_heads, slots) like `slot_positions`, also while slot i is position i."""
        return self.positions[:, :self.slots]

    def nbytes(self) -> int:
        """Bytes the key and value buffers occupy (capacity included: what the memory really costs)."""
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def snapshot_extras(self) -> dict[str, torch.Tensor]:
        return {name: tensor[:, :self.slots].clone() for name, tensor in self.extras.items()}

    def restore_extras(self, saved: dict[str, torch.Tensor]) -> None:
        for name, tensor in saved.items():
            self.extras[name][:, :tensor.shape[1]] = tensor
        for name in self.extras.keys() - saved.keys():  # created after the snapshot: back to its fill
            self.extras[name].fill_(self._fills[name])


def _pick(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows (heads, slots, d) at index (heads, m) -> (heads, m, d)."""
    return rows.gather(1, index[..., None].expand(-1, -1, rows.shape[-1]))


def _take(buffer: torch.Tensor, flat: torch.Tensor, heads: int, width: int) -> torch.Tensor:
    """Rows `flat` of a (heads, capacity, ...) buffer seen as (heads * capacity, ...), as (heads, width, ...):
    one index_select (a copy of whole rows), much cheaper than a gather over every element."""
    rows = buffer.reshape(buffer.shape[0] * buffer.shape[1], *buffer.shape[2:]).index_select(0, flat)
    return rows.view(heads, width, *buffer.shape[2:])


class RaggedStore(DenseStore):
    """A store whose KV heads each keep their own number of tokens (per-head eviction); the view is padded to the
    longest head and `slot_positions` marks the padding with -1."""

    ragged = True
