"""What quantizing costs a store: the running squared error and squared norm, per KV head, of the keys and of the
values it quantized while measuring (`KVCache.measure_quant_error` turns it on; `KVCache.quant_error` reads it;
the trace's `kv_quant_error`).

Every store that quantizes keeps one `RunningError` per side (keys, values), or one pair per pool, and mixes in
`MeasuresQuantError`. The sums stay on the store's device: nothing waits for them until they are read.
"""

from __future__ import annotations

import torch


def error_terms(x: torch.Tensor, x_hat: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (kv_heads, 2): per KV head, ||x - x_hat||^2 and ||x||^2 of x, x_hat (kv_heads, n, D); `rows`
    (kv_heads, n) bool, when given, counts only the rows marked."""
    x, x_hat = x.float(), x_hat.float()
    error, norm = (x - x_hat).square().sum(-1), x.square().sum(-1)  # (kv_heads, n)
    if rows is not None:
        error, norm = error * rows, norm * rows
    return torch.stack([error.sum(1), norm.sum(1)], dim=1)


class RunningError:
    """The squared error and squared norm, per KV head, of everything one side quantized while `measure` was on
    (a crop does not take a token's share back)."""

    def __init__(self):
        self.measure = False
        self.sums: torch.Tensor | None = None  # float32 (kv_heads, 2) once anything was measured

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        terms = error_terms(x, x_hat, rows)
        self.sums = terms if self.sums is None else self.sums + terms


class MeasuresQuantError:
    """Mixin for a store that quantizes: `meters()` gives its (keys, values) RunningError pairs (one pair per side
    set: a plain store has one, a mixed-precision store one per pool)."""

    quantizes = True  # KVCache.quant_error reads it (a class flag: reading it moves nothing)

    def meters(self) -> list[tuple[RunningError, RunningError]]:
        raise NotImplementedError

    @property
    def measure_error(self) -> bool:
        """Whether the store measures what quantizing costs (a recorder asks for it: it costs a dequantization)."""
        return any(meter.measure for pair in self.meters() for meter in pair)

    @measure_error.setter
    def measure_error(self, on: bool) -> None:
        for pair in self.meters():
            for meter in pair:
                meter.measure = on

    def error_sums(self) -> list[torch.Tensor | None]:
        """Per side (keys, values): float32 (kv_heads, 2), the squared error and squared norm summed over every
        pair of meters; None for a side nothing was measured on yet."""
        out = []
        for side in zip(*self.meters()):
            sums = [meter.sums for meter in side if meter.sums is not None]
            out.append(sum(sums[1:], sums[0]) if sums else None)
        return out
