"""`lacache`: a ladder-shaped cache: each layer keeps a different, layer-shifted part of the older tokens, and
compaction repeats over the older part so generation never runs out of cache.

The ladder, as LaCache's code builds it from the number of layers L, the `span` S (how many layers keep each
older token) and the `overlap` O:
    a block of B = 1 + ceil((L - S) / (S - O)) consecutive held tokens becomes A = min(ceil(S / (S - O)), B)
    tokens in each layer: layer l keeps the block's tokens at offsets (l mod (R + 1)) .. (l mod (R + 1)) + A - 1,
    R = B - A being the tokens a block frees.
So in each block the lower layers keep the earlier tokens and the higher layers the later ones, the steps of a
ladder repeating every R + 1 layers. Everything is counted in each layer's held tokens (their order in its cache),
not in text positions, and depends on positions only: no attention is needed.

Iterative compaction: a layer holds its `sinks`, then the compacted ladder up to a cursor, then the tokens not
compacted yet. When it holds more than `budget`, blocks are compacted from the cursor on, as many as it takes
(ceil(excess / R)), never touching the newest `window` tokens, and the cursor moves on by A per block. When the
blocks needed no longer fit before the window, the cursor starts over right after the sinks and the ladder is
compacted again with the same pattern, so older tokens get sparser with every round and the cache never holds more
than the budget after a step. The prefill compacts the prompt this way (several rounds for a long prompt), and
each decoding step compacts again when the layer is over its budget.

Defaults from LaCache's code: span 16, overlap 0 and 4 start tokens (its perplexity setting) on the paper's 32-layer
models; span defaults here to half the layers (16 of 32) so that any depth works, and the window to L tokens (the
code keeps the ladder's cursor L tokens short of the cache size). Simplifications, stated in `departs`: keys keep
their original positions (LaCache's code, like StreamingLLM, re-positions them inside the cache); the cache is not
enlarged by LaCache's "compensation" of floor(R / 2) tokens; the start-over is computed step by step rather than by
the code's closed-form stride, so its exact token choice after a start-over differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.cache.eviction import EvictionPolicy
from workbench.cache.kvcache import KVCache
from workbench.cache.storage import DenseStore
from workbench.errors import ParameterError, WorkbenchError
from workbench.registry import param


@dataclass
class LaCache(EvictionPolicy):
    name = "lacache"
    summary = ("Ladder-shaped cache: each layer keeps a layer-shifted share of every block of older tokens (lower "
               "layers earlier, higher layers later), plus sinks and recent tokens; compaction repeats over the "
               "older cache so the budget is never exceeded.")
    paper = ("LaCache: Ladder-Shaped KV Caching for Efficient Long-Context Modeling of Large Language Models "
             "(Shi et al., ICML 2025)")
    departs = ("keys keep their original positions (LaCache's code re-positions them inside the cache); no "
               "'compensation' enlargement of the cache; the start-over of the compaction is done step by step, so "
               "which tokens survive after a start-over differs from the code's closed form")

    budget: int = param(256, "tokens kept per layer (LaCache's cache size)", min=1)
    sinks: int = param(4, "first tokens always kept (LaCache's start size)", min=0)
    window: int | None = param(None, "newest tokens never compacted; None: as many as the model has layers", min=0)
    span: int | None = param(None, "layers that keep each older token (LaCache's code: 16 of 32); None: half "
                                   "the layers", min=1)
    overlap: int = param(0, "overlap between the spans of neighbouring ladder steps", min=0)

    store = DenseStore  # every KV head of a layer keeps the same tokens

    def validate(self) -> None:
        super().validate()
        if self.span is not None and self.overlap >= self.span:
            raise ParameterError(f"cache 'lacache' overlap {self.overlap} must be smaller than span {self.span}")

    def recent(self, budget: int) -> int:
        return self.window or 0

    def ladder(self, num_layers: int) -> tuple[int, int, int, int]:
        """(B, A, R, window) for a model of `num_layers` layers: tokens per block, kept per block and layer, freed
        per block, and the newest tokens never compacted."""
        span = max(1, num_layers // 2) if self.span is None else self.span
        if self.overlap >= span:
            raise ParameterError(f"cache 'lacache' overlap {self.overlap} must be smaller than the span {span}")
        block = 1 + math.ceil((num_layers - span) / (span - self.overlap))
        kept = min(math.ceil(span / (span - self.overlap)), block)
        if block - kept < 1:
            raise ParameterError(f"cache 'lacache' span {span} with overlap {self.overlap} keeps every token in "
                                 f"every one of the {num_layers} layers: nothing can be compacted; use a span below "
                                 "the number of layers")
        return block, kept, block - kept, num_layers if self.window is None else self.window

    def build(self, model, forward=None) -> KVCache:
        cache = super().build(model, forward)
        block, kept, freed, window = self.ladder(cache.num_layers)
        if self.ratio is None and self.budget < self.sinks + window + block:
            raise ParameterError(f"cache 'lacache' budget {self.budget} leaves no room for the ladder on this "
                                 f"{cache.num_layers}-layer model: it must be >= sinks + window + one block of "
                                 f"{block} tokens ({self.sinks} + {window} + {block})")
        cache.state["ladder"] = (block, kept, freed, window)
        return cache

    def layer_budgets(self, base: int, num_layers: int, prompt_length: int) -> list[int]:
        block, _, _, window = self.ladder(num_layers)
        return [max(base, self.sinks + window + block)] * num_layers  # a ratio budget still fits one block

    def evict(self, layer, call, result) -> None:
        if not self.due(layer, call):
            return
        budget, held = self.budgets(layer)[0], layer.held_at(call)[0]
        if held <= budget:
            return
        block, kept, freed, window = layer.cache.state["ladder"]
        positions, valid = layer.positions()[0], layer.valid(call)[0]
        slots = torch.sort(positions.masked_fill(~valid, torch.iinfo(positions.dtype).max), stable=True).indices
        cursor = layer.state.get("ladder_cursor", self.sinks)
        survivors, cursor = compact(slots[:held], budget, cursor, self.sinks, window, block, kept, freed,
                                    layer.index % (freed + 1))
        layer.state["ladder_cursor"] = cursor
        alive = torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
        alive[survivors] = True
        layer.keep(alive.expand(layer.num_heads, -1), [survivors.numel()] * layer.num_heads, call)


def compact(held: torch.Tensor, budget: int, cursor: int, sinks: int, window: int, block: int, kept: int,
            freed: int, offset: int) -> tuple[torch.Tensor, int]:
    """LaCache's iterative compaction of one layer's held entries (in cache order) down to `budget`: blocks of
    `block` entries from `cursor` on (never the newest `window`) keep `kept` entries from `offset` each; when the
    blocks needed do not fit, the cursor starts over after the `sinks`. Returns (the surviving entries, the
    cursor)."""
    while held.numel() > budget:
        fit = (held.numel() - window - cursor) // block
        blocks = min(math.ceil((held.numel() - budget) / freed), fit)
        if blocks <= 0:
            if cursor <= sinks:
                raise WorkbenchError(f"lacache cannot compact {held.numel()} entries to {budget}: not one block of "
                                     f"{block} fits between {sinks} sinks and a window of {window}")
            cursor = sinks
            continue
        end = cursor + block * blocks
        ladder = held[cursor:end].view(blocks, block)[:, offset:offset + kept].reshape(-1)
        held = torch.cat([held[:cursor], ladder, held[end:]])
        cursor += kept * blocks
    return held, cursor
