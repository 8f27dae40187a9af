"""SRP and SCH (Liang et al. 2025) against hand-worked segments and an LRU identity."""

import numpy as np
import pytest

from workbench.errors import ParameterError
from workbench.routers import expert_cache as ec
from workbench.routers.consistency import PAPER_LENGTHS, sch, segment_cache_hit_rate, segment_routing_performance, srp
from workbench.routers.testing import synthetic_trace


def single(sequence, k=1):
    return np.array(sequence).reshape(-1, 1, k)


def random_trace(seed, tokens, layers, k, experts, locality=0.6):
    return synthetic_trace(seed, tokens, layers, k, experts, locality=locality)


def test_srp_by_hand():
    # experts 0 0 1 1, m=2, every start: windows [0 0], [0 1], [1 1]. (segment, expert) counts f:
    # f=0 twice, f=1 twice, f=2 twice; actual uses = 6.
    # alpha=0: TP 6, predicted 2*6 = 12 -> F1 = 12/18; alpha=1: TP 6, predicted 8 -> 12/14; alpha=2: TP 4,
    # predicted 4 -> 8/10. Best: 6/7.
    assert srp(single([0, 0, 1, 1]), 2)[0] == pytest.approx(6 / 7)
    # disjoint segments [0 0], [1 1]: each is one fixed expert: F1 = 1
    assert srp(single([0, 0, 1, 1]), 2, stride=2)[0] == pytest.approx(1.0)
    # k=2, tokens (0,1) (0,2) (0,1) (0,2), disjoint m=2: per segment f(0)=2, f(1)=1, f(2)=1; actual 8.
    # alpha<=1: TP 8, predicted 2*6 = 12 -> 16/20; alpha=2: TP 4, predicted 4 -> 8/12. Best 0.8.
    trace = np.array([[0, 1], [0, 2], [0, 1], [0, 2]]).reshape(4, 1, 2)
    assert srp(trace, 2, stride=2)[0] == pytest.approx(0.8)


def test_srp_is_one_when_segments_repeat_one_choice():
    steady = np.tile(np.array([[3, 5], [1, 2]]), (64, 1, 1))  # (64 tokens, 2 layers, k=2), the same every token
    for length in PAPER_LENGTHS[:3]:
        np.testing.assert_allclose(srp(steady, length), [1.0, 1.0])
    # constant within disjoint blocks of 4: SRP 1 with stride 4, below 1 over every start
    blocks = single(np.repeat([0, 1, 2, 3], 4))
    assert srp(blocks, 4, stride=4)[0] == pytest.approx(1.0)
    assert srp(blocks, 4)[0] < 1.0


def test_srp_per_layer_and_dense_layers():
    trace = random_trace(0, 100, 3, 2, 8)
    trace[:, 1] = -1  # a dense layer
    values = segment_routing_performance(trace, 16)
    assert values.shape == (3,) and np.isnan(values[1]) and np.all((values[[0, 2]] > 0) & (values[[0, 2]] <= 1))
    # a layer's SRP depends only on that layer
    assert values[0] == pytest.approx(srp(trace[:, :1], 16, num_experts=8)[0])


def test_sch_by_hand():
    # experts 0 1 2 0 1 2, cache of 2. m=1 (only the current token ahead): LRU. 0 and 1 go into free slots (hits,
    # preloaded); 2 evicts 0, 0 evicts 1, 1 evicts 2, 2 evicts 0: 2 hits of 6.
    assert sch(single([0, 1, 2, 0, 1, 2]), 1, 2)[0] == pytest.approx(2 / 6)
    # m=4: at t=2 the next 4 tokens use 0 and 1 once each: tie, the least recent (0) goes; at t=3, 1 and 2 are used
    # once ahead: 1 (older) goes; at t=4 tokens 4..5 use 2 once, 0 never: 0 goes; t=5: 2 hits. 3 of 6.
    assert sch(single([0, 1, 2, 0, 1, 2]), 4, 2)[0] == pytest.approx(3 / 6)


def test_sch_pinning_and_the_reference_order():
    # k=2, cache 2, m=2: tokens (0,1) (2,0) (1,3).
    # pin=True: t0 preloads 0, 1 (2 hits). t1: 2 misses and may evict only 1 (0 is pinned); 0 hits. t2: 1 misses,
    # evicts 2 (0 and 2 both unused ahead, 2 older); 3 misses and evicts 0. 3 hits of 6.
    # pin=False (the reference code): t1: loading 2 evicts 0 (tie on uses ahead, 0 older) though the token needs
    # it: 0 still counts as a hit (judged on arrival) and reloads, evicting 2 (no uses ahead); t2: 1 hits, 3
    # evicts 0. 4 hits of 6.
    trace = np.array([[0, 1], [2, 0], [1, 3]]).reshape(3, 1, 2)
    assert segment_cache_hit_rate(trace, 2, 2)[0] == pytest.approx(3 / 6)
    assert segment_cache_hit_rate(trace, 2, 2, pin=False)[0] == pytest.approx(4 / 6)


@pytest.mark.parametrize("seed,k,experts", [(1, 1, 6), (2, 2, 8), (3, 3, 9)])
def test_sch_with_length_one_is_lru_plus_preloads(seed, k, experts):
    # with only the current token ahead SCH evicts the least recent: it is the simulator's LRU, except that the
    # first min(C, distinct) uses land in free slots and count as hits
    trace = random_trace(seed, 150, 2, k, experts)
    for capacity in range(k, experts + 1):
        lru = ec.simulate(trace, "lru", capacity)
        uses = (trace >= 0).sum(axis=(0, 2))
        distinct = np.array([len(set(trace[:, layer].ravel())) for layer in range(2)])
        expected = (lru.layer_hits + np.minimum(capacity, distinct)) / uses
        np.testing.assert_allclose(sch(trace, 1, capacity), expected)


def test_sch_grows_with_cache_and_reaches_one():
    trace = random_trace(4, 200, 2, 2, 8)
    rates = [sch(trace, 16, c)[0] for c in range(2, 9)]
    assert all(a <= b + 1e-12 for a, b in zip(rates, rates[1:])) and rates[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(sch(trace, 16, capacity_in_active=2.0), sch(trace, 16, 4))


def test_bad_input():
    trace = random_trace(5, 10, 1, 2, 4)
    with pytest.raises(ParameterError, match="exceeds the trace's 10 tokens"):
        srp(trace, 16)
    with pytest.raises(ParameterError, match="allowed: capacity >= 2"):
        sch(trace, 4, 1)
    with pytest.raises(ParameterError, match="segment length"):
        sch(trace, 0, 2)
    with pytest.raises(ParameterError, match="stride"):
        srp(trace, 2, stride=0)
