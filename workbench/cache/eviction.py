"""The shared base of eviction policies (in the manner of kvpress: one scoring base, one small class per method).

A policy scores the tokens every KV head of a layer holds, all heads at once (`score` -> (kv_heads, slots)); the
base keeps, per head, the protected tokens (the first `sinks` positions and the newest `window`) plus the
best-scored others up to the budget, and frees the rest. When it compresses follows the pass's phase:

    prefill          compress="prefill" or "both"
    decode, verify,  compress="decode" or "both", every `every` decoding steps (a verify or rollout row counts as a
    rollout          step; inside a provisional pass the eviction is tentative, see workbench.cache.kvcache)
    append           a later turn: policies that compress while decoding keep their budget; prefill-only policies
                     re-compress only with compress_turns=True

Budgets are fixed at the prefill (from the prompt length when `ratio` is given); the layers named in `full_layers`
are never compressed (KNorm's and D2O's reference code keep layers 0 and 1 whole). Ties between scores go to the
older token (a stable sort), so the same inputs keep the same tokens however the slots are laid out.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from workbench.cache.base import CachePolicy
from workbench.cache.storage import RaggedStore
from workbench.errors import ParameterError
from workbench.registry import param

PHASES = ("prefill", "decode", "both")
PROTECTED = 1e37  # ranks protected tokens above any score; newer protected tokens above older ones
WHOLE = sys.maxsize  # the budget of a layer that is never compressed


@dataclass
class EvictionPolicy(CachePolicy):
    """Base of policies that keep at most `budget` tokens per layer and KV head."""

    budget: int = param(128, "tokens kept per layer and KV head", min=1)
    ratio: float | None = param(None, "keep this fraction of the prompt instead of a fixed budget", min=0.0, max=1.0)
    sinks: int = param(4, "first tokens always kept (attention sinks)", min=0)
    window: int = param(16, "most recent tokens always kept", min=0)
    compress: str = param("both", "when to evict: at the prefill, during decoding, or both", choices=PHASES)
    every: int = param(1, "during decoding, evict every this many steps (the cache may exceed the budget between)",
                       min=1)
    compress_turns: bool = param(False, "prefill-only policies: also compress each later turn (an 'append' pass)")
    full_layers: str = param("", "layers never compressed, comma-separated (negative: from the last, '-1' the last)")

    store = RaggedStore

    def validate(self) -> None:
        if self.ratio is not None and self.ratio <= 0:
            raise ParameterError(f"cache '{self.name}' parameter 'ratio' must be > 0")
        if self.ratio is None and self.budget < self.sinks + self.recent(self.budget):
            raise ParameterError(f"cache '{self.name}' budget {self.budget} is smaller than sinks + window "
                                 f"({self.sinks} + {self.recent(self.budget)}); raise the budget or lower "
                                 "sinks/window")
        self.whole_layers(1)  # a malformed list fails here, not at the first run

    def recent(self, budget: int) -> int:
        """The newest tokens a head with this budget always keeps (H2O derives it from the budget)."""
        return self.window

    def whole_layers(self, num_layers: int) -> set[int]:
        """The layer indices of `full_layers` in a model of `num_layers` layers."""
        try:
            named = [int(part) for part in self.full_layers.replace(" ", "").split(",") if part]
        except ValueError:
            raise ParameterError(f"cache '{self.name}' parameter 'full_layers' is {self.full_layers!r}; expected "
                                 "comma-separated layer indices such as '0,1' or '0,1,-1'") from None
        return {i % num_layers for i in named if -num_layers <= i < num_layers}

    def set_budgets(self, cache, budgets: list[int | list[int]]) -> None:
        """Store per-layer, per-head budgets in the cache; `full_layers` keep everything."""
        whole = self.whole_layers(cache.num_layers)
        cache.state["budgets"] = [[WHOLE] * cache.num_kv_heads if i in whole else
                                  b if isinstance(b, list) else [b] * cache.num_kv_heads
                                  for i, b in enumerate(budgets)]

    @property
    def acts_while_decoding(self) -> bool:
        return bool(self.needs) or self.compress != "prefill"

    # -- what subclasses override ---------------------------------------------------------------------------
    def layer_budgets(self, base: int, num_layers: int, prompt_length: int) -> list[int | list[int]]:
        """Tokens each layer keeps per KV head, from the policy's budget: an int per layer, or a list with one int
        per KV head (PyramidKV-style policies vary it by layer, RazorAttention-style ones by head)."""
        return [base] * num_layers

    def score(self, layer, call, result) -> torch.Tensor:
        """Float (kv_heads, slots): how much each held token is worth keeping (padding slots are ignored)."""
        raise NotImplementedError

    merges: ClassVar[bool] = False  # folds what goes into kept entries (override `merge`)

    def merge(self, layer, gone: torch.Tensor, going: torch.Tensor, alive: torch.Tensor, call) -> torch.Tensor:
        """Merging policies fold the entries about to go into kept ones through `layer.merge`.

        gone  -- long (kv_heads, m): the slots that go (per head; `going` marks the real ones, the rest is padding)
        alive -- bool (kv_heads, slots): the slots that stay
        Returns long (kv_heads, m): the position each gone entry went into (-1: dropped)."""
        raise NotImplementedError

    # -- the base's work --------------------------------------------------------------------------------------
    def begin_pass(self, cache, forward) -> None:
        if forward.phase == "prefill":  # budgets may depend on the prompt's length
            self.set_budgets(cache, self.layer_budgets(self.base_budget(forward.count), cache.num_layers,
                                                       forward.count))

    def base_budget(self, prompt_length: int) -> int:
        """Tokens per layer and KV head before any per-layer allocation: `budget`, or `ratio` of the prompt."""
        return self.budget if self.ratio is None else max(1, math.ceil(self.ratio * prompt_length))

    def due(self, layer, call) -> bool:
        """Whether this pass (or provisional row) compresses."""
        if call.phase == "prefill":
            return self.compress != "decode"
        if call.phase == "append":
            return self.compress != "prefill" or self.compress_turns
        return self.compress != "prefill" and layer.state["decode_steps"] % self.every == 0

    def budgets(self, layer) -> list[int]:
        return layer.cache.state["budgets"][layer.index]

    def evict(self, layer, call, result) -> None:
        if not self.due(layer, call):
            return
        budgets, held = self.budgets(layer), layer.held_at(call)
        if all(n <= b for n, b in zip(held, budgets)):
            return
        self.evict_to(layer, call, result, budgets)

    def evict_to(self, layer, call, result, budgets: list[int]) -> None:
        """Keep, per head, its protected tokens and the best-scored others, `budgets[h]` in all."""
        held = layer.held_at(call)
        counts = [min(n, b) for n, b in zip(held, budgets)]
        valid = layer.valid(call)
        positions = layer.positions()
        newest = layer.newest(call)
        windows = [self.recent(b) for b in budgets]
        window = torch.tensor(windows, device=positions.device)[:, None]
        protected = (positions < self.sinks) | (positions > newest - window)
        if all(self.sinks + w <= c for w, c in zip(windows, counts)):  # every protected token fits
            ranked = self.score(layer, call, result).float().masked_fill(protected, float("inf"))
        else:  # only some do: the newest of them win
            ranked = torch.where(protected, PROTECTED * (1 + positions.float() / (newest + 1)),
                                 self.score(layer, call, result).float())
        ranked = ranked.masked_fill(~valid, float("-inf"))
        drops = [n - c for n, c in zip(held, counts)]
        if max(drops) == 1:  # the steady state of decoding: one token (on each head that is over) goes
            gone = worst_slot(ranked, valid, positions)
            merged = None
            if self.merges:
                going = torch.tensor(drops, device=gone.device)[:, None] == 1
                alive = valid.clone().scatter_(1, gone, ~going)
                merged = self.merge(layer, gone, going, alive, call)
            layer.drop(gone, call, drops, merged)
            return
        if not self.merges and len(set(counts)) == 1 and len(set(held)) == 1:  # every head alike: no mask to sort
            layer.keep_slots(best_slots(ranked, counts[0]), counts, call)
            return
        alive = keep_best(ranked, valid, counts)
        merged_into = None
        if self.merges:
            gone, going = dropped_slots(alive, valid, drops)
            into = self.merge(layer, gone, going, alive, call)
            merged_into = torch.full(alive.shape, -1, dtype=torch.long, device=alive.device).scatter_(
                1, gone, torch.where(going, into, -1))
        layer.keep(alive, counts, call, merged_into)


def dropped_slots(alive: torch.Tensor, valid: torch.Tensor, drops: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots each head lets go (valid and not alive), ascending, as (long (kv_heads, m), bool (kv_heads, m)):
    m = the most any head drops; `going` is False where a head drops fewer (padding)."""
    order = torch.sort((~(valid & ~alive)).to(torch.int8), dim=1, stable=True).indices  # the gone ones first
    width = max(drops)
    going = torch.arange(width, device=alive.device)[None] < torch.tensor(drops, device=alive.device)[:, None]
    return order[:, :width], going


def worst_slot(ranked: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Long (kv_heads, 1): each head's worst-ranked valid slot; of equal worst, the newest (as `best_slots` would
    decide: ties keep the older)."""
    ranked = ranked.masked_fill(~valid, float("inf"))
    worst = ranked.min(dim=1, keepdim=True).values
    return positions.masked_fill(ranked != worst, -1).argmax(dim=1, keepdim=True)


def best_slots(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """Long (kv_heads, k): the k best-ranked slots of each head, ascending; ties go to the older (lower) slot."""
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


def keep_best(ranked: torch.Tensor, valid: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Bool (kv_heads, slots): per head, its `counts[h]` best-ranked valid slots (ties to the older slot)."""
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order).contiguous())
    return (rank < torch.tensor(counts, device=rank.device)[:, None]) & valid
