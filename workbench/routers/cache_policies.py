"""The replacement policies of the expert-cache simulator (workbench.routers.expert_cache), and Fate's allocation of
a budget across layers. A policy holds the cached keys of one cache and answers, on a miss, which unpinned key
to evict; `POLICIES` names them.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass
from typing import ClassVar, Hashable, Iterable, Sequence

from workbench.errors import ParameterError

__all__ = ["Policy", "LRU", "LFU", "ARC", "Belady", "ScoreAware", "FateAllocation", "POLICIES"]


# ---------------------------------------------------------------------------------------------------- policies
class Policy:
    """A replacement policy for one cache of `capacity` slots.

    `resident` is a container (dict or set) of the cached keys, kept current by the policy; the simulator tests
    `key in policy.resident` (a C-level lookup: the hot path). On a hit it calls `hit(key, time, score)`, on a miss
    `insert(key, time, score, pinned)`, which loads the key, first evicting one cached key that is not in `pinned`
    when the cache is full, and returns the evicted key (or None). `load(key, time, pinned)` is a prefetch: a load
    that is not a use (by default `insert` with score 0, so the policy's bookkeeping counts a prefetched expert
    that is later used as seen twice). Offline policies get the whole access sequence first through `prepare`.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str | None] = None
    departs: ClassVar[str] = ""
    offline: ClassVar[bool] = False

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.resident: dict | set = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self.resident

    def __len__(self) -> int:
        return len(self.resident)

    def hit(self, key: Hashable, time: float, score: float) -> None:
        raise NotImplementedError

    def insert(self, key: Hashable, time: float, score: float, pinned: Sequence) -> Hashable | None:
        raise NotImplementedError

    def load(self, key: Hashable, time: float, pinned: Sequence) -> Hashable | None:
        return self.insert(key, time, 0.0, pinned)

    def prepare(self, accesses: Iterable[tuple[float, Sequence]]) -> None:
        """Offline policies: the (time, keys) of every token-layer this cache will serve, in order."""

    @classmethod
    def describe(cls) -> str:
        text = (cls.__doc__ or "").strip().split("\n\n")[0]
        return " ".join(text.split()) + (f" Departs: {cls.departs}" if cls.departs else "")


class LRU(Policy):
    """Least recently used: evict the unpinned expert whose last use is oldest; the classic policy, and the one
    Mixtral-offloading (Eliseev & Mazur 2023) keeps per layer. A token-layer's experts become the most recent in
    their slot order, so LRU here is a stack algorithm and `hit_rates` computes all sizes in one pass."""

    name = "lru"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.resident: OrderedDict = OrderedDict()  # least recent first

    def hit(self, key, time, score):
        self.resident.move_to_end(key)

    def insert(self, key, time, score, pinned):
        order = self.resident
        victim = None
        if len(order) >= self.capacity:
            victim = next(iter(order))
            if victim in pinned:  # rare: an expert of this token-layer is the oldest
                victim = next(other for other in order if other not in pinned)
            del order[victim]
        order[key] = None
        return victim


class _Ranked(Policy):
    """Evict the cached, unpinned key of lowest rank; ties go to the least recently touched. A lazy heap holds
    (rank, clock, key) entries; an entry is live while it is the one `_entry` holds for its key."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._entry: dict = {}
        self.resident = self._entry  # the cached keys are the keys with a live entry
        self._heap: list = []
        self._clock = 0

    def _set(self, key, rank) -> None:
        self._clock += 1
        entry = (rank, self._clock, key)
        self._entry[key] = entry
        heapq.heappush(self._heap, entry)

    def insert(self, key, time, score, pinned):
        victim = self._evict(pinned) if len(self._entry) >= self.capacity else None
        self.hit(key, time, score)
        return victim

    def _evict(self, pinned):
        held = []
        while True:
            entry = heapq.heappop(self._heap)
            key = entry[2]
            if self._entry.get(key) is not entry:
                continue  # stale: the key was touched again or evicted since
            if key in pinned:
                held.append(entry)
                continue
            break
        for entry in held:
            heapq.heappush(self._heap, entry)
        del self._entry[key]
        self._evicted(key)
        return key

    def _evicted(self, key) -> None:
        pass


class LFU(_Ranked):
    """Least frequently used: evict the unpinned expert used the fewest times; ties are broken by recency (the
    least recently used of the least used goes). By default counts are in-cache (an evicted expert starts again
    at zero when it returns), the textbook LFU; `remember=True` keeps every expert's count for the whole trace
    ("perfect" LFU, the activation-frequency counts MoE offloading papers often use)."""

    name = "lfu"

    def __init__(self, capacity: int, remember: bool = False):
        super().__init__(capacity)
        self.remember = remember
        self._count: dict = {}

    def hit(self, key, time, score):
        count = self._count.get(key, 0) + 1
        self._count[key] = count
        self._set(key, count)

    def _evicted(self, key):
        if not self.remember:
            del self._count[key]


class ARC(Policy):
    """Adaptive Replacement Cache (Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache", FAST
    2003), the standard algorithm: T1 (seen once recently) and T2 (seen at least twice) hold the cache, ghost lists
    B1/B2 remember what each evicted, and the target size p of T1 grows on a B1 ghost hit by max(|B2|/|B1|, 1) and
    shrinks on a B2 ghost hit by max(|B1|/|B2|, 1). Fate (Fang et al. 2025) manages each layer's expert cache
    with ARC.

    Departs: REPLACE skips pinned experts (taking the other list's LRU if all of its list are pinned). Fate's
    reference ARC (expert_ARC_cache.py) moves p by min(|T1|, c) and min(|T2|, c) instead and starts with experts
    0..c-1 loaded; this one follows the paper and starts empty."""

    name = "arc"
    paper = "ARC: A Self-Tuning, Low Overhead Replacement Cache (Megiddo & Modha, FAST 2003)"
    departs = "REPLACE skips pinned experts; p moves as in the paper, not as in Fate's code; starts empty."

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.p = 0.0
        self.t1: OrderedDict = OrderedDict()  # each list least recent first
        self.t2: OrderedDict = OrderedDict()
        self.b1: OrderedDict = OrderedDict()
        self.b2: OrderedDict = OrderedDict()
        self.resident: set = set()  # T1 and T2

    def hit(self, key, time, score):  # case I: to the MRU end of T2
        if key in self.t1:
            del self.t1[key]
            self.t2[key] = None
        else:
            self.t2.move_to_end(key)

    def insert(self, key, time, score, pinned):
        c = self.capacity
        victim = None
        if key in self.b1:  # case II: recency would have helped
            self.p = min(c, self.p + max(len(self.b2) / len(self.b1), 1.0))
            victim = self._replace(key, pinned)
            del self.b1[key]
            self.t2[key] = None
        elif key in self.b2:  # case III: frequency would have helped
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1.0))
            victim = self._replace(key, pinned)
            del self.b2[key]
            self.t2[key] = None
        else:  # case IV: a new key
            if len(self.t1) + len(self.b1) == c:
                if len(self.t1) < c:
                    self.b1.popitem(last=False)
                    victim = self._replace(key, pinned)
                else:  # T1 fills the cache: drop its LRU entirely (no ghost)
                    victim = self._pop_unpinned(self.t1, pinned)
            elif len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) >= c:
                if len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) == 2 * c:
                    self.b2.popitem(last=False)
                victim = self._replace(key, pinned)
            self.t1[key] = None
        self.resident.add(key)
        if victim is not None:
            self.resident.discard(victim)
        return victim

    def _replace(self, key, pinned):
        if len(self) < self.capacity:
            return None
        from_t1 = len(self.t1) >= 1 and ((key in self.b2 and len(self.t1) == self.p) or len(self.t1) > self.p)
        order = [(self.t1, self.b1), (self.t2, self.b2)]
        for source, ghost in order if from_t1 else order[::-1]:
            victim = self._pop_unpinned(source, pinned)
            if victim is not None:
                ghost[victim] = None
                return victim
        return None

    @staticmethod
    def _pop_unpinned(source: OrderedDict, pinned):
        for victim in source:
            if victim not in pinned:
                del source[victim]
                return victim
        return None


class Belady(_Ranked):
    """Belady's optimal offline replacement (Belady, "A study of replacement algorithms for a virtual-storage
    computer", IBM Systems Journal 1966, MIN/OPT): evict the expert whose next use is farthest in the future
    (never again counts as infinitely far). It needs the whole trace (`prepare`). With pinning it is the optimum
    among demand-loading policies that keep a token-layer's experts resident together; with prefetch it is only a
    heuristic (a prefetched expert's next use counts from the prefetch)."""

    name = "belady"
    paper = "A study of replacement algorithms for a virtual-storage computer (Belady, IBM Systems Journal 1966)"
    departs = "a token-layer's experts are pinned: the optimum is over caches that hold them together"
    offline = True

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._uses: dict | None = None

    def prepare(self, accesses):
        self._uses = defaultdict(deque)
        for time, keys in accesses:
            for key in keys:
                self._uses[key].append(time)

    def _next_use(self, key, time, including_now: bool) -> float:
        uses = self._uses[key]
        while uses and (uses[0] < time if including_now else uses[0] <= time):
            uses.popleft()
        return uses[0] if uses else math.inf

    def hit(self, key, time, score):
        self._set(key, -self._next_use(key, time, including_now=False))

    def load(self, key, time, pinned):
        victim = self._evict(pinned) if len(self._entry) >= self.capacity else None
        self._set(key, -self._next_use(key, time, including_now=True))
        return victim


class ScoreAware(_Ranked):
    """HybriMoE's score-aware caching, "Minus Recent Score" (Zhong et al., "HybriMoE: Hybrid CPU-GPU Scheduling and
    Cache Management for Efficient MoE Inference", DAC 2025): every expert holds a decayed routing score; at each
    token every score of the layer decays, s <- decay * s, and an expert the token uses adds its routing score,
    s <- decay * s + score; the cached, unpinned expert of lowest score is evicted (ties: least recent). Scores
    are kept for every expert seen, cached or not, as HybriMoE's `KScoreAwareCache` does.

    decay = 0.5 by default: HybriMoE's code updates S = alpha * TopP(s) + (1 - alpha) * S with alpha = 0.5
    (`KScoreAwareCache(..., 0.5, 2 * top_k)` in ktransformers/models/modeling_deepseek.py), which ranks experts
    exactly as decay = 1 - alpha does (the factor alpha on every score does not change the order)."""

    name = "score"
    paper = ("HybriMoE: Hybrid CPU-GPU Scheduling and Cache Management for Efficient MoE Inference "
             "(Zhong et al., DAC 2025)")
    departs = ("HybriMoE adds the router scores of the top p = 2k experts of each token; a trace holds only the k "
               "routed experts, so only their scores are added. Without `scores` every use adds 1 (a decayed "
               "frequency). HybriMoE's caches are per layer; in a shared cache all layers decay continuously, one "
               "decay per token.")

    def __init__(self, capacity: int, decay: float = 0.5):
        if not 0.0 < decay <= 1.0:
            raise ParameterError(f"ScoreAware decay must be in (0, 1], got {decay!r}")
        super().__init__(capacity)
        self.decay = decay
        self._fall = -math.log(decay)  # score decays as exp(-fall * elapsed time)
        self._origin = 0.0  # stored values v mean s = v * decay ** (time - origin): decaying them all is free
        self._value: dict = {}

    def hit(self, key, time, score):
        if (time - self._origin) * self._fall > 500.0:
            self._rebase(time)
        value = self._value.get(key, 0.0) + score * math.exp((time - self._origin) * self._fall)
        self._value[key] = value
        self._set(key, value)

    def _rebase(self, time) -> None:
        """Move the origin to `time` before the stored values overflow; every rank scales alike."""
        factor = math.exp(-(time - self._origin) * self._fall)
        self._value = {key: value * factor for key, value in self._value.items()}
        self._origin = time
        self._entry.update({key: (self._value[key], clock, key) for key, (_, clock, _) in self._entry.items()})
        self._heap = list(self._entry.values())
        heapq.heapify(self._heap)


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (LRU, LFU, ARC, Belady, ScoreAware)}


# --------------------------------------------------------------------------------------------- allocation
@dataclass(frozen=True)
class FateAllocation:
    """Fate's shallow-favouring split of a total expert budget across layers (Fang et al., "Fate: Fast Edge
    Inference of Mixture-of-Experts Models via Cross-Layer Gate", arXiv 2502.12224). Not a replacement policy: pass
    it as `capacity` (per-layer mode); Fate itself runs ARC inside each layer.

    As in Fate's reference code (mindspore-lab/models, research/SYSU/Fate/utils.py, `memory_cost_qwen`): the first
    `shallow` = 4 MoE layers are cached entirely (all their experts); the rest of the budget is split evenly over
    the deeper layers, rounding down (left-over slots stay unused); if the budget cannot hold the shallow layers
    whole, it fills layers from the shallowest, one after another, and deeper layers get nothing.

    Departs: in Fate an offloaded layer with no cache slots still runs its experts from a staging buffer outside the
    budget; here every expert in use needs a slot, so each layer first gets `k` slots from the total and Fate's rule
    splits what is left (each layer capped at all its experts). Where Fate's split gives every layer at least `k`
    (the usual case) the result is the same as Fate's.
    """

    total: int
    shallow: int = 4

    def split(self, layers: int, num_experts: int, k: int) -> list[int]:
        """Slots per MoE layer, shallowest first, summing to at most `total`."""
        if self.total < k * layers:
            raise ParameterError(f"FateAllocation total={self.total} is below k x MoE layers = {k} x {layers} = "
                                 f"{k * layers}; allowed: total >= {k * layers}")
        room = max(num_experts - k, 0)  # slots a layer can take beyond its k
        extra = self.total - k * layers
        if room == 0:
            return [k] * layers
        shallow = min(self.shallow, layers)
        whole = extra // room
        if whole < shallow:  # not even the shallow layers fit whole: fill from the shallowest
            grant = [room] * whole + [extra - room * whole] + [0] * layers
        else:
            deep = (extra - shallow * room) // (layers - shallow) if layers > shallow else 0
            grant = [room] * shallow + [min(deep, room)] * (layers - shallow)
        return [k + g for g in grant[:layers]]
