"""`kvcrush`: a base policy keeps the most important tokens; representatives of the tokens it drops, grouped by
how the heads treat them, fill the rest of the budget.

At the prefill, per layer (as in the KVCrush authors' per-token code):
  * base selection (SnapKV-style): the last `window` queries' attention, summed over those queries and the query
    heads of each KV group, ranks the tokens between the `sinks` and the window;
  * head-behaviour signature: per query head, a token's bit is 1 when it is in the top half (of the tokens between
    the sinks and the window) of that head's window attention; a token is the binary vector of its bits over the
    layer's query heads;
  * budget split: of the `budget - sinks - window` selectable slots of a KV head, int(`crush` x that) go to
    KVCrush's representatives and the rest to the base selection's best tokens;
  * grouping: the tokens the base selection drops are sorted by the Hamming distance of their signature to an
    anchor vector (alternating 0, 1, ... by default; ties to the older token) and the representatives are taken
    evenly spaced along that order, the first and the last included (index i * (m - 1) // (k - 1) of m for the
    k representatives): one per group of similar head behaviour.
The sinks and the window are always kept. Compression is at the prefill only.

Simplifications, stated in `departs`: the authors' code keeps 32 start and 128 recent tokens besides a 16-query
observation window, builds the bits from the KV heads' group-averaged scores and picks one set of representatives
for all KV heads (excluding what KV head 0's selection keeps); here the sinks and the window are the base's (the
observation window is the kept window, as SnapKV), the bits are per query head, and each KV head draws its
representatives from the tokens its own selection drops, so every head keeps exactly its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.attention import reference
from workbench.cache.eviction import EvictionPolicy
from workbench.cache.scoring import window_rows
from workbench.errors import ParameterError
from workbench.registry import param

ANCHORS = ("alternate", "random", "zeros", "ones")


@dataclass
class KVCrush(EvictionPolicy):
    name = "kvcrush"
    summary = ("Compress the prompt once: SnapKV's best tokens plus, for the tokens it drops, one representative "
               "per group of similar head behaviour (binary per-head signatures, Hamming distance to an anchor).")
    paper = ("KVCrush: Key value cache size-reduction using similarity in head-behaviour "
             "(Jha, Gobriel, Talamanova and Jain, ACML 2025)")
    departs = ("signature bits per query head (the authors' code: per KV head); each KV head picks representatives "
               "among the tokens its own base selection drops (the authors' code: one set for all heads); the "
               "observation window is the kept recent window, with the base's sinks (authors: 32 start, 128 "
               "recent tokens and a separate 16-query window)")

    window: int = param(16, "observation window: the last prompt tokens, which vote and are always kept", min=1)
    crush: float = param(0.25, "fraction of the selectable budget (budget - sinks - window) kept as KVCrush's "
                               "representatives; the rest is the base selection's", min=0.0, max=1.0)
    anchor: str = param("alternate", "the anchor signature distances are measured from", choices=ANCHORS)
    seed: int = param(0, "seed of the random anchor (drawn per layer from seed + layer index)", min=0)
    compress: str = param("prefill", "KVCrush compresses the prompt once", choices=("prefill",))

    def validate(self) -> None:
        super().validate()
        if self.compress_turns:
            raise ParameterError("cache 'kvcrush' groups the tokens of one prefill (every head then holds the same "
                                 "positions); compress_turns=True is not supported")

    def score(self, layer, call, result) -> torch.Tensor:
        probs = window_rows(call, self.window)
        per_head = probs.sum(1)  # (heads, slots): each query head's window attention per token
        votes = reference.group_key_mass(probs[None], call.groups)[0]  # (kv_heads, slots), summed over the group
        positions = layer.positions()
        valid = layer.valid(call)
        protected = (positions < self.sinks) | (positions > layer.newest(call) - self.window)
        selectable = valid & ~protected  # at the prefill every KV head holds the same positions
        bits = signatures(per_head, selectable[0])
        anchor = anchor_bits(self.anchor, bits.shape[0], self.seed + layer.index).to(bits.device)
        distance = (bits != anchor[:, None]).sum(0)  # (slots,): Hamming distance of each token's signature
        ranked = torch.zeros(votes.shape, device=votes.device)
        for head, budget in enumerate(self.budgets(layer)):
            pool = max(0, budget - int((valid[head] & protected[head]).sum()))
            kept, representatives = select(votes[head], distance, selectable[head], pool, self.crush)
            ranked[head, kept] = 2.0
            ranked[head, representatives] = 1.0
        return ranked


def signatures(per_head: torch.Tensor, selectable: torch.Tensor) -> torch.Tensor:
    """Bool (heads, slots): per query head, the top half (floor) of the selectable slots by its attention (ties to
    the older slot); False elsewhere."""
    among = selectable.nonzero().flatten()
    order = torch.sort(per_head[:, among], dim=1, descending=True, stable=True).indices[:, :among.numel() // 2]
    bits = torch.zeros(per_head.shape, dtype=torch.bool, device=per_head.device)
    bits[:, among] = torch.zeros(order.shape[0], among.numel(), dtype=torch.bool, device=per_head.device).scatter_(
        1, order, True)
    return bits


def anchor_bits(mode: str, heads: int, seed: int) -> torch.Tensor:
    """Bool (heads,): the anchor signature: 0, 1, 0, 1, ...; all 0; all 1; or random bits drawn from `seed`."""
    if mode == "alternate":
        return torch.arange(heads) % 2 == 1
    if mode == "random":
        return torch.randint(0, 2, (heads,), generator=torch.Generator().manual_seed(seed)) == 1
    return torch.full((heads,), mode == "ones")


def select(votes: torch.Tensor, distance: torch.Tensor, selectable: torch.Tensor, pool: int,
           crush: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One KV head's choice among its selectable slots, `pool` in all: the pool - int(crush x pool) best-voted
    (long slots), and int(crush x pool) representatives of the rest, evenly spaced along their order by
    (Hamming distance, slot)."""
    among = selectable.nonzero().flatten()
    representatives = int(crush * pool)
    best = min(pool - representatives, among.numel())
    order = torch.sort(votes[among], descending=True, stable=True).indices
    kept, rest = among[order[:best]], among[order[best:]].sort().values
    rest = rest[torch.sort(distance[rest], stable=True).indices]  # by distance, then older first
    count = min(representatives, rest.numel())
    if count == 0:
        return kept, rest[:0]
    if count == 1:
        return kept, rest[:1]
    spaced = torch.arange(count, device=rest.device) * (rest.numel() - 1) // (count - 1)
    return kept, rest[spaced]
