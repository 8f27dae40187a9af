"""`OrderedStore`: the store interface (workbench.cache.storage) for stores that keep every token in order and
hold keys and values as two `sides` (the quantized stores: workbench.cache.quantized_store, kvquant_store).

Slot i holds position i on every head, so positions, masks and the policy's view are trivial; a side keeps its
oldest tokens in some compressed form and its newest ones (the provisional tail at least) in a full-precision
residual. A side offers:
    append(x)            new tokens (kv_heads, n, D) after the others, into the residual
    settle()             every token held is committed: compress what its rule says
    crop(tokens)         keep the first `tokens`
    keep_residual(index) keep these residual tokens (offsets into the residual, ascending), in order
    view()               every token (kv_heads, tokens, D) in the model's dtype
    quantized, tokens    tokens compressed, tokens held; device: where its tensors are (None before any)
    nbytes_by_component()
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError


class OrderedStore:
    """A layer's keys and values, every token kept in order (slot i holds position i), one side each."""

    ragged = False
    kind = "an ordered store"  # how errors name the store

    def __init__(self, keys, values):
        self.keys, self.values = keys, values
        self.lengths: list[int] = []  # per KV head, all equal
        self.identity = True  # slot i holds position i: always
        self.extras: dict[str, torch.Tensor] = {}  # no per-slot statistics: the policies keep every token

    @property
    def sides(self) -> tuple:
        return self.keys, self.values

    @property
    def initialized(self) -> bool:
        return bool(self.lengths)

    @property
    def num_heads(self) -> int:
        return len(self.lengths)

    @property
    def slots(self) -> int:
        return max(self.lengths, default=0)

    # -- writing ----------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """Add keys/values (kv_heads, n, head_dim) at positions start.. (the next ones: every token is kept)."""
        if start != self.slots:
            raise WorkbenchError(f"{self.kind} keeps every token in order: tokens at position {start} cannot "
                                 f"follow its {self.slots}")
        self.keys.append(keys)
        self.values.append(values)
        self.lengths = [self.keys.tokens] * keys.shape[0]

    def settle(self) -> None:
        """Every token held is committed: each side compresses what its rule says."""
        for side in self.sides:
            side.settle()

    def crop(self, position: int, lengths: list[int]) -> None:
        """Drop the tokens at positions >= `position` (a provisional tail lives in the residuals: exact)."""
        for side in self.sides:
            side.crop(position)
        self.lengths = list(lengths)

    def keep(self, alive: torch.Tensor, lengths: list[int]) -> None:
        """Keep the slots marked alive (kv_heads, slots): only tokens still in both residuals (a provisional tail,
        e.g. the accepted path of a tree verify pass) can go; compressed tokens stay."""
        alive = alive[:, :self.slots]
        if not (alive == alive[:1]).all():
            raise WorkbenchError(f"{self.kind} keeps the same tokens on every head")
        kept = alive[0].nonzero().squeeze(1)
        quantized = max(side.quantized for side in self.sides)
        if int(alive[0, :quantized].sum()) != quantized:
            raise WorkbenchError(f"{self.kind} cannot drop quantized tokens; only unquantized provisional ones")
        for side in self.sides:
            side.keep_residual(kept[kept >= side.quantized] - side.quantized)
        self.lengths = list(lengths)

    def keep_slots(self, index: torch.Tensor, lengths: list[int]) -> None:
        alive = torch.zeros((self.num_heads, self.slots), dtype=torch.bool, device=index.device)
        self.keep(alive.scatter_(1, index, True), lengths)

    def merge(self, *args) -> None:
        raise WorkbenchError(f"{self.kind} does not merge entries")

    def extra(self, name, fill=0.0, dtype=torch.float32, trailing=()):
        raise WorkbenchError(f"{self.kind} keeps no per-slot statistics ({name!r}): its policies keep every "
                             "token and do not act on attention")

    def snapshot_extras(self) -> dict:
        return {}

    def restore_extras(self, saved: dict) -> None:
        pass

    # -- reading ----------------------------------------------------------------------------------------------
    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (1, kv_heads, slots, head_dim) in the model's dtype (a fresh tensor)."""
        return self.keys.view()[None], self.values.view()[None]

    def slot_positions(self) -> None:
        return None  # slot i holds position i

    def all_positions(self) -> torch.Tensor:
        """Long (kv_heads, slots): the position in each slot (a fresh tensor)."""
        device = self.keys.device
        return torch.arange(self.slots, device=device).repeat(max(self.num_heads, 1), 1)

    def nbytes_by_component(self) -> dict[str, int]:
        """Bytes each part occupies, keys and values together (buffer capacity included)."""
        parts = [side.nbytes_by_component() for side in self.sides]
        return {name: sum(part.get(name, 0) for part in parts) for name in dict.fromkeys(n for p in parts for n in p)}

    def nbytes(self) -> int:
        """Bytes every part occupies (capacity included: what memory costs)."""
        return sum(self.nbytes_by_component().values())
