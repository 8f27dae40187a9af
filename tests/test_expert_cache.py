"""The expert-cache simulator against hand-worked traces and independent references written here."""

import numpy as np
import pytest
import torch

from workbench.errors import ParameterError, UnknownComponentError
from workbench.routers import expert_cache as ec
from workbench.routers.testing import synthetic_trace

A, B, C, D, E = 0, 1, 2, 3, 4


def single(sequence):
    """One layer, one expert per token: the textbook cache setting."""
    return np.array(sequence).reshape(-1, 1, 1)


random_trace = synthetic_trace


def groups_of(trace, layer):
    return [tuple(e for e in row if e >= 0) for row in trace[:, layer].tolist()]


def naive_lru_hits(groups, capacity):
    """LRU with a token-layer's experts pinned, on a plain list (least recent first)."""
    cache, hits = [], 0
    for keys in groups:
        for key in keys:
            if key in cache:
                hits += 1
                cache.remove(key)
            elif len(cache) >= capacity:
                cache.remove(next(c for c in cache if c not in keys))
            cache.append(key)
    return hits


def naive_belady_hits(groups, capacity):
    """Belady by brute force: on a miss in a full cache, scan ahead for each unpinned expert's next use."""
    cache, hits = set(), 0
    for i, keys in enumerate(groups):
        for key in keys:
            if key in cache:
                hits += 1
                continue
            if len(cache) >= capacity:
                def next_use(c):
                    return next((j for j in range(i + 1, len(groups)) if c in groups[j]), len(groups) + 1)
                cache.remove(max((c for c in cache if c not in keys), key=next_use))
            cache.add(key)
    return hits


# ------------------------------------------------------------------------------------------- hand-worked traces
def test_lru_by_hand():
    # C=2: A miss, B miss, A hit, C miss (evicts B), B miss (evicts A), A miss (evicts C): 1 hit
    result = ec.simulate(single([A, B, A, C, B, A]), "lru", 2)
    assert (result.hits, result.misses) == (1, 5)


def test_pinning_keeps_a_token_layers_experts():
    # C=2, k=2: token 0 loads A, B (A the older); token 1 needs C and A: C's miss must not evict A (pinned, though
    # oldest), so it evicts B and A hits. Without pinning A would be evicted and missed: 0 hits.
    trace = np.array([[[A, B]], [[C, A]]])
    for policy in ec.POLICIES:
        assert ec.simulate(trace, policy, 2).hits == 1, policy


def test_lfu_by_hand_ties_broken_by_recency():
    # C=2: A, B, C miss; at C both A and B were used once: the least recent (A) goes; B then hits: 1 hit.
    # (Breaking ties the other way would evict B and score 0.)
    assert ec.simulate(single([A, B, C, B]), "lfu", 2).hits == 1
    # A miss, A hit (count 2), B miss, C miss evicts B (count 1 < 2), B miss evicts C: 1 hit
    assert ec.simulate(single([A, A, B, C, B]), "lfu", 2).hits == 1


def test_belady_by_hand():
    # C=2: A, B miss; C misses and evicts B (next use at 4, A's at 3); A hits; B misses: 1 hit (LRU: 0)
    assert ec.simulate(single([A, B, C, A, B]), "belady", 2).hits == 1
    assert ec.simulate(single([A, B, C, A, B]), "lru", 2).hits == 0
    # the LRU-killer loop A B C D A B C D with C=3: LRU hits nothing; Belady evicts C at D (farthest), hits A, B,
    # evicts A or B at C (neither is used again) and hits D: 3 hits
    assert ec.simulate(single([A, B, C, D] * 2), "lru", 3).hits == 0
    assert ec.simulate(single([A, B, C, D] * 2), "belady", 3).hits == 3


def test_arc_by_hand_state_after_each_step():
    arc = ec.ARC(2)

    def use(key):
        if key in arc:
            arc.hit(key, 0.0, 1.0)
            return True
        arc.insert(key, 0.0, 1.0, (key,))
        return False

    def state():
        return list(arc.t1), list(arc.t2), list(arc.b1), list(arc.b2), arc.p

    assert not use(A) and state() == ([A], [], [], [], 0)
    assert not use(B) and state() == ([A, B], [], [], [], 0)
    assert use(A) and state() == ([B], [A], [], [], 0)  # case I: to T2
    # case IV, |T1|+|B1| = 1 < c, total = 2 >= c: REPLACE moves T1's LRU (B) to B1 since |T1| = 1 > p = 0
    assert not use(C) and state() == ([C], [A], [B], [], 0)
    # case II (B in B1): p += max(|B2|/|B1|, 1) = 1; REPLACE: |T1| = 1 is not > p, so T2's LRU (A) goes to B2
    assert not use(B) and state() == ([C], [B], [], [A], 1)
    # case III (A in B2): p -= max(|B1|/|B2|, 1) -> 0; REPLACE: |T1| = 1 > 0, so C goes to B1
    assert not use(A) and state() == ([], [B, A], [C], [], 0)
    # case IV, total = 3 >= c: REPLACE with T1 empty takes T2's LRU (B) to B2
    assert not use(D) and state() == ([D], [A], [C], [B], 0)
    assert use(A) and state() == ([D], [A], [C], [B], 0)
    # case IV-A: |T1|+|B1| = c and |T1| < c: drop B1's LRU (C), REPLACE moves D to B1
    assert not use(E) and state() == ([E], [A], [D], [B], 0)
    assert use(A)
    assert ec.simulate(single([A, B, A, C, B, A, D, A, E, A]), "arc", 2).hits == 3


def test_arc_resists_a_scan_where_lru_does_not():
    # C=2: A twice (A to T2), then the one-off scan B C D runs through T1 only; A survives and hits: 2 hits.
    # LRU evicts A at D: 1 hit.
    assert ec.simulate(single([A, A, B, C, D, A]), "arc", 2).hits == 2
    assert ec.simulate(single([A, A, B, C, D, A]), "lru", 2).hits == 1


def test_score_aware_by_hand():
    # decay 0.5, C=2. Scores after t=1: A 0.9*0.5 = 0.45, B 0.1; at t=2 (C misses) A 0.225, B 0.05: B goes; A hits
    trace, scores = single([A, B, C, A]), np.array([0.9, 0.1, 0.5, 0.5]).reshape(-1, 1, 1)
    assert ec.simulate(trace, "score", 2, scores=scores).hits == 1
    # decay 0.01: at t=2 A has 0.9e-4 < B's 1e-3, so A goes and then misses; LRU evicts A as well
    assert ec.simulate(trace, "score", 2, scores=scores, decay=0.01).hits == 0
    assert ec.simulate(trace, "lru", 2).hits == 0
    with pytest.raises(ParameterError, match="decay"):
        ec.simulate(trace, "score", 2, decay=0.0)


def test_score_aware_survives_long_traces():
    # decay 0.5 over 5000 tokens would overflow without rebasing; the expert used every other token stays
    trace = single([A if t % 2 else [B, C][t // 2 % 2] for t in range(5000)])
    result = ec.simulate(trace, "score", 2)
    assert result.hits >= 2499 and np.isfinite(result.hit_rate)


def test_shared_cache_by_hand():
    # one cache of 2 slots keyed (layer, expert): token 0 loads (0,A), (1,A); token 1: (0,B) misses and evicts
    # the oldest, (0,A); (1,A) hits
    trace = np.array([[[A], [A]], [[B], [A]]])
    result = ec.simulate(trace, "lru", 2, shared=True)
    assert result.hits == 1 and list(result.layer_hits) == [0, 1]


# ------------------------------------------------------------------------------------------- against references
@pytest.mark.parametrize("seed,tokens,layers,k,experts", [(0, 120, 2, 2, 6), (1, 200, 1, 1, 8), (2, 150, 2, 3, 9)])
def test_lru_and_belady_match_naive_references(seed, tokens, layers, k, experts):
    trace = random_trace(seed, tokens, layers, k, experts, holes=0.1)
    for capacity in range(k, experts + 1):
        lru = ec.simulate(trace, "lru", capacity)
        belady = ec.simulate(trace, "belady", capacity)
        for layer in range(layers):
            groups = groups_of(trace, layer)
            assert lru.layer_hits[layer] == naive_lru_hits(groups, capacity)
            assert belady.layer_hits[layer] == naive_belady_hits(groups, capacity)


def test_arc_matches_the_paper_pseudocode():
    """An independent transcription of Megiddo & Modha's Fig. 4 on plain lists (k = 1: no pinning)."""

    def arc_hits(sequence, c):
        t1, t2, b1, b2, p, hits = [], [], [], [], 0.0, 0

        def replace(x):
            if t1 and ((x in b2 and len(t1) == p) or len(t1) > p):
                b1.append(t1.pop(0))
            else:
                b2.append(t2.pop(0))

        for x in sequence:
            if x in t1 or x in t2:
                (t1 if x in t1 else t2).remove(x)
                t2.append(x)
                hits += 1
            elif x in b1:
                p = min(c, p + max(len(b2) / len(b1), 1))
                replace(x)
                b1.remove(x)
                t2.append(x)
            elif x in b2:
                p = max(0, p - max(len(b1) / len(b2), 1))
                replace(x)
                b2.remove(x)
                t2.append(x)
            else:
                if len(t1) + len(b1) == c:
                    if len(t1) < c:
                        b1.pop(0)
                        replace(x)
                    else:
                        t1.pop(0)
                elif len(t1) + len(b1) < c and len(t1) + len(t2) + len(b1) + len(b2) >= c:
                    if len(t1) + len(t2) + len(b1) + len(b2) == 2 * c:
                        b2.pop(0)
                    replace(x)
                t1.append(x)
        return hits

    rng = np.random.default_rng(3)
    for _ in range(6):
        # a hot set mixed with scans, so both lists and both ghosts get exercised
        sequence = [int(rng.integers(0, 4)) if rng.random() < 0.6 else int(rng.integers(4, 16)) for _ in range(300)]
        for c in (1, 2, 3, 5, 8):
            assert ec.simulate(single(sequence), "arc", c).hits == arc_hits(sequence, c)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("seed,tokens,layers,k,experts", [(4, 150, 2, 2, 8), (5, 120, 3, 1, 6), (6, 100, 2, 3, 10)])
def test_belady_is_never_beaten(seed, tokens, layers, k, experts, shared):
    trace = random_trace(seed, tokens, layers, k, experts, holes=0.05)
    scores = np.where(trace >= 0, np.random.default_rng(seed).random(trace.shape), 0.0)
    sizes = range(k, experts + 1) if not shared else range(k, layers * experts + 1, 3)
    for capacity in sizes:
        best = ec.simulate(trace, "belady", capacity, shared=shared).hits
        for policy in ("lru", "lfu", "arc", "score"):
            assert ec.simulate(trace, policy, capacity, shared=shared, scores=scores).hits <= best, (policy, capacity)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("seed,tokens,layers,k,experts", [(7, 300, 3, 2, 8), (8, 200, 2, 1, 5), (9, 250, 2, 4, 12)])
def test_mattson_one_pass_equals_simulation(seed, tokens, layers, k, experts, shared):
    trace = random_trace(seed, tokens, layers, k, experts, holes=0.1)
    sizes = list(range(k, (layers if shared else 1) * experts + 2))
    curve = ec.hit_rates(trace, sizes, shared=shared)
    for column, size in enumerate(sizes):
        result = ec.simulate(trace, "lru", size, shared=shared)
        assert curve.hit_rate[column] == pytest.approx(result.hit_rate, abs=1e-12)
        np.testing.assert_allclose(curve.layer_hit_rate[:, column], result.layer_hit_rate)


def test_hit_rates_other_policies_loop_over_sizes_and_units_of_k():
    trace = random_trace(10, 150, 2, 2, 8)
    curve = ec.hit_rates(trace, capacity_in_active=[1.0, 1.5, 2.0, 4.0], policy="belady")
    assert list(curve.capacities) == [2, 3, 4, 8] and list(curve.in_active) == [1.0, 1.5, 2.0, 4.0]
    for column, size in enumerate([2, 3, 4, 8]):
        assert curve.hit_rate[column] == ec.simulate(trace, "belady", size).hit_rate
    shared = ec.hit_rates(trace, capacity_in_active=[2.0], shared=True)
    assert list(shared.capacities) == [8]  # 2 x k x 2 MoE layers


# ------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("policy", list(ec.POLICIES))
def test_a_cache_of_all_experts_misses_only_first_uses(policy):
    trace = random_trace(11, 200, 3, 2, 7, holes=0.1)
    distinct = [len({e for e in trace[:, layer].ravel() if e >= 0}) for layer in range(3)]
    result = ec.simulate(trace, policy, 7)
    assert list(result.layer_misses) == distinct
    shared = ec.simulate(trace, policy, 21, shared=True)
    assert shared.misses == sum(distinct)


def test_missing_entries_are_not_accesses():
    trace = random_trace(12, 100, 2, 2, 6)
    # pad every token-layer with a -1 slot and insert a dense layer (all -1) in the middle
    padded = np.concatenate([trace, np.full((100, 2, 1), -1)], axis=2)
    padded = np.stack([padded[:, 0], np.full((100, 3), -1), padded[:, 1]], axis=1)
    for policy in ec.POLICIES:
        plain = ec.simulate(trace, policy, 3)
        holes = ec.simulate(padded, policy, 3)
        assert (holes.hits, holes.misses) == (plain.hits, plain.misses)
        assert np.isnan(holes.layer_hit_rate[1]) and list(holes.layer_hits[[0, 2]]) == list(plain.layer_hits)
    shared = ec.simulate(padded, "lru", 6, shared=True)
    assert shared.hits + shared.misses == int((trace >= 0).sum())


def test_torch_input_and_capacity_in_active():
    trace = random_trace(13, 80, 2, 2, 6)
    by_slots = ec.simulate(trace, "arc", 3)
    by_k = ec.simulate(torch.from_numpy(trace), "arc", capacity_in_active=1.5)  # floor(1.5 * 2) = 3
    assert by_k.capacity == (3, 3) and (by_k.hits, by_k.misses) == (by_slots.hits, by_slots.misses)


# ------------------------------------------------------------------------------------------- prefetch and cost
def test_prefetch_by_hand():
    # C=2, predictions always right: A and B are loaded by prefetch (2 transfers), every use then hits
    trace = single([A, B, A, B])
    result = ec.simulate(trace, "lru", 2, prefetch=trace)
    assert (result.hits, result.misses, result.prefetch_loads, result.prefetch_hits) == (4, 0, 2, 2)
    assert result.transfers == 2
    # C=1: a wrong prediction (C before A) costs a load and still misses: C loaded, A misses (evicts C),
    # then B predicted and used: a prefetch hit
    result = ec.simulate(single([A, B]), "lru", 1, prefetch=single([C, B]))
    assert (result.hits, result.misses, result.prefetch_loads, result.prefetch_hits, result.transfers) == (
        1, 1, 2, 1, 3)


def test_cost_model_by_hand():
    # C=1: A miss, A hit, B miss. Transfer 100 B / 1000 B/s = 0.1 s; compute 0.01 s per expert:
    # 3 x 0.01 + 2 x 0.1 = 0.23 s, 200 bytes
    cost = ec.CostModel(expert_bytes=100, bandwidth_bytes_per_s=1000, expert_compute_s=0.01)
    result = ec.simulate(single([A, A, B]), "lru", 1, cost=cost)
    assert result.seconds == pytest.approx(0.23) and result.bytes_moved == 200
    # B prefetched at token 2 instead: serial 0.23 s still; with overlap its load hides under token 1's compute:
    # demand 0.1 + max(0.01, 0) + max(0.01, 0.1) + max(0.01, 0) = 0.22 s
    overlap = ec.CostModel(100, 1000, 0.01, overlap=True)
    result = ec.simulate(single([A, A, B]), "lru", 1, cost=overlap, prefetch=single([-1, -1, B]))
    assert result.seconds == pytest.approx(0.22) and result.prefetch_hits == 1
    gpu, laptop = ec.CostModel.pcie4_gpu(1e9), ec.CostModel.cpu_laptop(1e9)
    assert gpu.bandwidth_bytes_per_s == 25e9 and laptop.bandwidth_bytes_per_s == 3e9
    assert ec.swiglu_expert_bytes(4096, 14336) == 3 * 4096 * 14336 * 2


def test_fate_allocation_by_hand():
    # 8 layers of 8 experts, k=2: each layer first gets 2 slots, then Fate's rule splits the rest
    # total 40: 4 shallow layers whole (8), deep (40 - 32) // 4 = 2 each, as Fate's memory_cost gives
    assert ec.FateAllocation(40).split(8, 8, 2) == [8, 8, 8, 8, 2, 2, 2, 2]
    assert ec.FateAllocation(61).split(8, 8, 2) == [8] * 4 + [7] * 4  # (61 - 32) // 4 = 7, one slot unused
    assert ec.FateAllocation(100).split(8, 8, 2) == [8] * 8  # capped at all experts
    # too small for 4 whole layers: fill from the shallowest (Fate would give [8, 8, 8, 6, 0, 0, 0, 0])
    assert ec.FateAllocation(30).split(8, 8, 2) == [8, 8, 4, 2, 2, 2, 2, 2]
    with pytest.raises(ParameterError, match="total >= 16"):
        ec.FateAllocation(15).split(8, 8, 2)
    # in a trace: a dense first layer gets no slots, the MoE layers share the budget
    trace = random_trace(14, 60, 6, 2, 8)
    trace[:, 0] = -1
    result = ec.simulate(trace, "arc", ec.FateAllocation(30))
    assert result.capacity == (0, 8, 8, 8, 4, 2)  # 5 MoE layers: 10 reserved, 20 extra = 6 + 6 + 6 + 2


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_a_parameter_error():
    trace = random_trace(15, 20, 2, 2, 5)
    with pytest.raises(ParameterError, match=r"allowed: capacity >= 2 per layer"):
        ec.simulate(trace, "lru", 1)
    with pytest.raises(ParameterError, match=r"allowed: capacity >= 2"):
        ec.simulate(trace, "lru", 1, shared=True)
    with pytest.raises(ParameterError, match="allowed: capacity >= 2"):
        ec.hit_rates(trace, [1, 2])
    with pytest.raises(ParameterError, match="exactly one"):
        ec.simulate(trace, "lru", 2, capacity_in_active=1.0)
    with pytest.raises(ParameterError, match="exactly one"):
        ec.simulate(trace, "lru")
    with pytest.raises(ParameterError, match="lists 3 layers"):
        ec.simulate(trace, "lru", [2, 2, 2])
    with pytest.raises(ParameterError, match="repeats an expert"):
        ec.simulate(np.array([[[1, 1]]]), "lru", 2)
    with pytest.raises(ParameterError, match=r"shape \(tokens, layers, k\)"):
        ec.simulate(trace[:, 0], "lru", 2)
    with pytest.raises(ParameterError, match="integer"):
        ec.simulate(trace.astype(float), "lru", 2)
    with pytest.raises(ParameterError, match="at most 2"):
        ec.simulate(trace, "lru", 2, prefetch=np.zeros((20, 2, 3), np.int64) + [0, 1, 2])
    with pytest.raises(ParameterError, match="scores has shape"):
        ec.simulate(trace, "score", 2, scores=np.ones((20, 2, 1)))
    with pytest.raises(UnknownComponentError, match="available: lru, lfu, arc, belady, score"):
        ec.simulate(trace, "fifo", 2)
    with pytest.raises(ParameterError, match="bad options"):
        ec.simulate(trace, "lru", 2, decay=0.5)


def test_policies_describe_their_paper():
    for cls in ec.POLICIES.values():
        assert cls.__doc__ and cls.describe()
    assert "Megiddo" in ec.ARC.__doc__ and "HybriMoE" in ec.ScoreAware.__doc__ and "Fate" in ec.FateAllocation.__doc__
