"""`elastic`: Elastic Cache. The instruction (prompt) is compressed by importance-driven merging into anchors;
while generating, a fixed truncation point evicts one token per step.

Instruction encoding: each prompt token's importance is the attention it received from every prompt query
(summed over the queries and the query heads of its KV group: the "frequency" of the paper). The first `sinks`
tokens and the newest `window` are kept; of the others, the most important become anchors, as many as the budget
leaves, and every other token is merged into its nearest anchor instead of being dropped. Nearest is by position,
as in the reference code (`nearest="position"`, ties to the earlier anchor), or by key cosine similarity
(`nearest="key"`). An anchor a absorbing the set M_a becomes the plain mean of itself and what it absorbed,
    k_a <- (k_a + sum_{t in M_a} k_t) / (1 + |M_a|),   v_a likewise   (the reference's scatter_reduce "mean").

Output generation: the cache stays at its budget by evicting, at every step, the token at a fixed truncation point
of the held sequence, index budget + `distance` (a negative distance counts back from the end of the compressed
prompt, a positive one from the start): the tokens before the point (the initial ones and most of the compressed
prompt) and the newest after it are kept, and what crosses the point goes, oldest first; no merging.

Simplified against the paper's reference code: importance and anchors are per KV head (the reference averages
every head of a layer and keeps one token set per layer); the budget is fixed at the prefill (the reference keeps
a fraction of every token seen, so its cache grows by 1 - ratio per generated token and evicts about once in
1 / ratio steps); its selection compares argsort indices with the number to forget and offsets the merged indices
by the sinks, which we read as slips: here the top-scored tokens are the anchors and each thrown token is merged
at its own position. Later turns ("append" passes) are truncated like generation. Inside a verify or rollout pass
it evicts once, at commit (merges cannot be tentative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from workbench.cache.eviction import PHASES, EvictionPolicy
from workbench.registry import param

NEAREST = ("position", "key")


@dataclass
class ElasticCache(EvictionPolicy):
    name = "elastic"
    summary = ("The prompt is merged into anchors (its most attended tokens; every other token folds into its nearest "
               "anchor); while generating, the token at a fixed truncation point goes each step.")
    paper = ("Efficient Inference of Vision Instruction-Following Models with Elastic Cache "
             "(Liu, Liu, Wang, Dong, Chen, Rao, Krishna, Lu, ECCV 2024)")
    departs = ("importance and anchors per KV head (the reference averages a layer's heads); a fixed budget instead of "
               "a fraction of every token seen; the reference's index slips (argsort compared with a count, merged "
               "indices offset by the sinks) read as the stated rule; inside a verify or rollout pass it evicts once, "
               "at commit")

    sinks: int = param(1, "first tokens always kept (the reference's evaluation start_size)", min=0)
    window: int = param(1, "newest tokens always kept (the reference keeps the last prompt token)", min=0)
    distance: int = param(-25, "truncation point while generating, as a held index: budget + distance when <= 0, "
                               "else distance (the reference's default -25)")
    nearest: str = param("position", "how a thrown token finds its anchor: nearest position (the reference) or most "
                                     "similar key", choices=NEAREST)
    compress: str = param("both", "when to evict: merging at the prefill, truncation while generating",
                          choices=PHASES)

    needs: ClassVar[frozenset[str]] = frozenset({"key_mass"})
    tentative = False  # merges cannot be undone: inside a provisional pass it evicts at commit
    merges = True

    def wants(self, layer: int, phase: str) -> frozenset[str]:
        return self.needs if phase == "prefill" else frozenset()  # importance is the instruction's attention

    def observe(self, layer, call, result) -> None:
        if call.phase == "prefill" and result.key_mass is not None:
            received = layer.extra("attention")
            received += result.key_mass[0].float()

    def point(self, budget: int) -> int:
        """The held index (position order) at which generation truncates, inside the unprotected range."""
        index = budget + self.distance if self.distance <= 0 else self.distance
        return max(self.sinks, min(index, budget - self.recent(budget) - 1))

    def score(self, layer, call, result) -> torch.Tensor:
        if call.phase == "prefill":
            return layer.extra("attention")
        valid = layer.valid(call)
        index = valid.long().cumsum(1) - 1  # each held token's place in position order
        held, budgets = layer.held_at(call), self.budgets(layer)
        start = torch.tensor([self.point(b) for b in budgets], device=index.device)[:, None]
        drops = torch.tensor([max(0, n - b) for n, b in zip(held, budgets)], device=index.device)[:, None]
        crossing = valid & (index >= start) & (index < start + drops)  # what crosses the point, oldest first
        return torch.where(crossing, 0.0, 1.0)

    def merge(self, layer, gone, going, alive, call) -> torch.Tensor:
        positions = layer.positions()
        if call.phase != "prefill":
            return torch.full(gone.shape, -1, dtype=torch.long, device=gone.device)  # truncation drops
        newest = layer.newest(call)
        anchors = alive & (positions >= self.sinks) & (positions <= newest - self.window)
        if not bool(anchors.any()):
            return torch.full(gone.shape, -1, dtype=torch.long, device=gone.device)
        gone_positions = positions.gather(1, gone)
        if self.nearest == "position":  # distance, ties to the earlier anchor
            far = (positions[:, None, :] - gone_positions[..., None]).abs() * 2 + \
                (positions[:, None, :] > gone_positions[..., None])
            far = far.float().masked_fill(~anchors[:, None, :], float("inf"))
            into = far.argmin(dim=-1)
        else:  # most similar key, ties to the earlier anchor (max returns the first)
            unit = F.normalize(layer.held_keys().float(), dim=-1)
            similarity = unit.gather(1, gone[..., None].expand(-1, -1, unit.shape[-1])) @ unit.transpose(1, 2)
            into = similarity.masked_fill(~anchors[:, None, :], float("-inf")).argmax(dim=-1)
        merged = going & anchors.any(dim=1, keepdim=True)
        layer.merge(into, gone, merged.float(), torch.ones(positions.shape, device=positions.device))
        return torch.where(merged, positions.gather(1, into), -1)
