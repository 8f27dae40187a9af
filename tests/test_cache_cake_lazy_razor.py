"""CAKE, LazyEviction and RazorAttention: each keeps what its paper's rule says on hand-built inputs, reproduces
the full cache when the budget covers everything, really holds fewer tokens under budget, and rejects bad
parameters clearly."""

import math

import pytest
import torch

import workbench as wb
from workbench.attention.base import AttentionResult
from workbench.cache import cake, razor_attention
from workbench.cache.testing import assert_bytes_are_real, attend, fill

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 byte tokens on the tiny models


# -- CAKE --------------------------------------------------------------------------------------------------------

def steady_and_spiky(n=12, dim=64):
    """Keys and queries where, among the window's queries (positions 8..11), those at 8, 9, 10 attend steadily
    to token 2 (about 0.72, 0.69, 0.67) and the one at 11 almost only to token 5 (0.9995; token 5 gets ~0.035
    from the others). Over the window token 2 has mean 0.52, variance 0.12; token 5 mean 0.28, variance 0.23."""
    keys = torch.zeros(2, n, dim)
    keys[:, 2, 2] = keys[:, 5, 5] = 1.0
    query = torch.zeros(4, n, dim)
    query[:, 8:11, 2] = 24.0  # score 24 / sqrt(64) = 3
    query[:, 11, 5] = 80.0  # score 10
    return keys, query


@pytest.mark.parametrize("gamma, chosen", [(0.0, 2), (1.0, 2), (200.0, 5)])
def test_cake_indicator_is_mean_plus_gamma_variance_over_the_window(tiny_llama, gamma, chosen):
    # both layers alike: equal preferences, so each layer gets one slot of the pool (budget - window) x 2 = 2.
    # mean + gamma * var: token 2 scores 0.52, 0.64, 24.5; token 5 scores 0.28, 0.51, 46.9
    keys, query = steady_and_spiky()
    cache = wb.cache.get("cake", budget=5, window=4, kernel=1, gamma=gamma).build(tiny_llama)
    for layer in (0, 1):
        fill(cache, layer, keys)
    assert attend(cache, 0, query) == [[2, 5, 8, 9, 10, 11]] * 2  # cascade: layer 0 alone has the whole pool
    assert attend(cache, 1, query) == [[chosen, 8, 9, 10, 11]] * 2
    assert [p.tolist() for p in cache.positions(0)] == [[chosen, 8, 9, 10, 11]] * 2  # layer 0 shrank to its share
    preferences = cache.state["preferences"]
    assert preferences[0] == pytest.approx(preferences[1])


def test_cake_layer_preference_by_hand():
    # window rows over the two tokens before the window: [0.5, 0.5] and [1, 0]
    probs = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])
    entropy = math.log(2)  # 2 x 0.5 ln 2 in the first row, 0 in the second
    variance = 0.125 + 0.125  # unbiased variance of [0.5, 1] and of [0.5, 0]
    assert cake.layer_preference(probs, window=2, tau1=1.0, tau2=1.0) == pytest.approx(entropy * variance)
    assert cake.layer_preference(probs, window=2, tau1=0.5, tau2=2.0) == pytest.approx(entropy ** 2 * variance ** 0.5)
    uniform = torch.full((1, 2, 4), 0.25)
    assert cake.layer_preference(uniform, window=2, tau1=1.0, tau2=1.0) == 0.0  # no shift over time: no preference


def test_cake_allocation_is_proportional_capped_and_exact():
    assert cake.allocate(10, [1, 2, 7], [100, 100, 100]) == [1, 2, 7]
    assert cake.allocate(10, [1, 1, 8], [100, 100, 4]) == [3, 3, 4]  # what the cap cuts off goes to the others
    assert sorted(cake.allocate(10, [1, 1, 1], [100] * 3)) == [3, 3, 4]  # rounding loses no slot
    assert cake.allocate(10, [0, 0], [3, 100]) == [3, 7]  # no preference at all: equal shares, then caps


def preference(queries, keys, window):
    """CAKE's layer preference H * V (tau1 = tau2 = 1) from the window's softmax attention to the tokens before it:
    entropy and variance over the window's queries, summed over heads and tokens."""
    n = keys.shape[1]
    scores = torch.einsum("hqd,hkd->hqk", queries[:, -window:], keys.repeat_interleave(2, 0)) / 8.0
    seen = torch.arange(n)[None] <= torch.arange(n - window, n)[:, None]
    before = torch.softmax(scores.masked_fill(~seen, float("-inf")), -1)[..., :n - window]
    return float(torch.special.entr(before).sum()) * float(before.var(dim=1).sum())


def test_cake_cascade_reslices_the_pool_and_never_grows_a_layer(tiny_llama):
    torch.manual_seed(0)
    cache = wb.cache.get("cake", budget=10, window=4, kernel=1).build(tiny_llama)
    keys = [torch.randn(2, 40, 64), torch.randn(2, 40, 64)]
    queries = [torch.randn(4, 40, 64), 3 * torch.randn(4, 40, 64)]  # layer 1 attends more sharply
    for layer in (0, 1):
        fill(cache, layer, keys[layer])
    pool = (10 - 4) * 2
    attend(cache, 0, queries[0])
    assert cache.tokens_held()[0].tolist() == [4 + pool] * 2  # the first layer may use the whole pool
    attend(cache, 1, queries[1])
    preferences = [preference(q, k, window=4) for q, k in zip(queries, keys)]  # from CAKE's equation, here
    share0, share1 = (pool * p / sum(preferences) for p in preferences)
    assert preferences[0] != pytest.approx(preferences[1])
    held = cache.tokens_held()
    assert abs(held[0, 0] - 4 - share0) < 1 and abs(held[1, 0] - 4 - share1) < 1
    assert held[0, 0] + held[1, 0] == 2 * 4 + pool
    assert held.sum(0).tolist() == [2 * 10] * 2  # the whole cache is exactly budget x layers


# -- LazyEviction -----------------------------------------------------------------------------------------------

def test_lazy_eviction_tracks_recurrences_and_evicts_by_maximum_recurrence_interval(tiny_llama):
    cache = wb.cache.get("lazy_eviction", budget=4, sinks=0, window=1, every=4).build(tiny_llama)
    fill(cache, 0, torch.randn(2, 6, 64))  # prompt positions 0..5: all first seen at time 5
    attend(cache, 0, torch.randn(4, 6, 64))
    # decoding: the query at position t (time t) attends significantly to these tokens (itself included)
    recurring = {6: [0, 1, 6], 7: [1, 7], 8: [2, 8], 9: [1, 9]}
    for t, tokens in recurring.items():
        fill(cache, 0, torch.randn(2, 1, 64))
        mass = torch.zeros(1, 2, t + 1)
        mass[0, :, tokens] = 1.0
        kept = attend(cache, 0, torch.randn(4, 1, 64), AttentionResult(torch.zeros(1), key_mass=mass))
        if t < 9:
            assert kept == [list(range(t + 1))] * 2  # lazy: nothing goes before the observation window ends
    # at time 9 (last recurrence, MRI): 0 (6, 1) idle 3 overdue by 2; 1 (9, 2) due in 2; 2 (8, 3) due in 2;
    # 3, 4, 5 (5, 0) overdue by 4; 6 (6, 0) by 3; 7 (7, 0) by 2; 8 (8, 0) by 1; 9 is the protected window.
    # Not overdue come first (1 and 2), then the least overdue (8): 3..7 and 0 go.
    assert kept == [[1, 2, 8, 9]] * 2
    layer = cache.layers[0]
    history = torch.stack([layer.extra("last_recurrence", -1, torch.long)[0],
                           layer.extra("max_interval", 0, torch.long)[0]], -1)
    assert history.tolist() == [[9, 2], [8, 3], [8, 0], [9, 0]]


@pytest.mark.parametrize("budget, kept", [(3, [0, 1, 10]), (2, [0, 10])])
def test_lazy_eviction_overdue_first_then_the_furthest_predicted_recurrence(tiny_llama, budget, kept):
    cache = wb.cache.get("lazy_eviction", budget=budget, sinks=0, window=1, every=1).build(tiny_llama)
    fill(cache, 0, torch.randn(2, 10, 64))
    attend(cache, 0, torch.randn(4, 10, 64))  # positions 0..9, all first seen at time 9
    layer = cache.layers[0]  # a history set by hand: (last recurrence, MRI)
    layer.extra("last_recurrence", -1, torch.long)[:, :3] = torch.tensor([8, 8, 8])
    layer.extra("max_interval", 0, torch.long)[:, :3] = torch.tensor([2, 6, 1])
    fill(cache, 0, torch.randn(2, 1, 64))
    mass = torch.zeros(1, 2, 11)
    mass[0, :, 10] = 1.0
    # at time 10: token 0 is due now (8 + 2), token 1 at 14; token 2 is overdue (quiet for 2 > its MRI 1) and so
    # are 3..9 (never recurred): overdue ones go first, then the furthest predicted recurrence (token 1)
    assert attend(cache, 0, torch.randn(4, 1, 64), AttentionResult(torch.zeros(1), key_mass=mass)) == [kept] * 2


# -- RazorAttention ---------------------------------------------------------------------------------------------

def test_razor_non_retrieval_heads_fold_what_they_drop_into_one_compensation_token(tiny_llama):
    policy = wb.cache.get("razor_attention", budget=6, sinks=2, window=3)
    cache = policy.build_for(tiny_llama, torch.tensor([[True, False], [False, False]]))
    keys, values = torch.randn(2, 12, 64), torch.randn(2, 12, 64)
    fill(cache, 0, keys, values)
    kept = attend(cache, 0, torch.randn(4, 12, 64))
    assert kept == [list(range(12)), [0, 1, 8, 9, 10, 11]]  # retrieval head whole; sinks, compensation, window
    layer = cache.layers[0]
    torch.testing.assert_close(layer.held_keys()[1, 2], keys[1, 2:9].mean(0))  # 2..7 dropped, merged into 8
    torch.testing.assert_close(layer.held_values()[1, 2], values[1, 2:9].mean(0))
    torch.testing.assert_close(layer.held_keys()[0], keys[0])
    [(index, head, evicted, merged_into)] = cache.drain_events()
    assert (index, head) == (0, 1) and evicted.tolist() == [2, 3, 4, 5, 6, 7] and merged_into.tolist() == [8] * 6
    # a decoding step: token 9 leaves the window and joins the compensation token's running mean
    new_k, new_v = torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    fill(cache, 0, new_k, new_v)
    assert attend(cache, 0, torch.randn(4, 1, 64)) == [list(range(13)), [0, 1, 8, 10, 11, 12]]
    torch.testing.assert_close(layer.held_keys()[1, 2], keys[1, 2:10].mean(0))
    torch.testing.assert_close(layer.held_values()[1, 2], values[1, 2:10].mean(0))
    stands_for = layer.extra("stands_for", 1.0)[1, :layer.held[1]]
    assert stands_for.tolist() == [1, 1, 8, 1, 1, 1]  # tokens each entry stands for


def test_razor_induction_score_by_hand():
    length = 4  # 8 positions: the probe read twice; query 4 + j should attend to j + 1
    copying = torch.zeros(8, 8)
    for j in range(length):
        copying[length + j, j + 1] = 0.8
    uniform = torch.tril(torch.ones(8, 8)) / torch.arange(1, 9)[:, None]
    probs = torch.stack([copying, uniform, uniform, uniform])  # 4 query heads, 2 per KV head
    expected_uniform = sum(1 / (length + j + 1) for j in range(length)) / length
    scores = razor_attention.induction_scores(probs, length, groups=2)
    torch.testing.assert_close(scores, torch.tensor([0.8, expected_uniform]))  # a KV head: its best query head


def test_razor_head_scores_are_computed_once_per_model(tiny_llama):
    probe = wb.run.probe(tiny_llama)
    first = razor_attention.retrieval_head_scores(tiny_llama, probe)
    assert razor_attention.retrieval_head_scores(tiny_llama, probe) is first
    assert first.shape == (2, 2) and (first > 0).all()
    heads = razor_attention.find_retrieval_heads(tiny_llama, probe, retrieval_fraction=0.15)
    assert heads.sum() == 1 and heads.flatten()[first.flatten().argmax()]  # ceil(0.15 x 4) = 1, the best
    assert razor_attention.find_retrieval_heads(tiny_llama, probe, retrieval_fraction=0.0).sum() == 0


# -- end to end on the tiny GQA model ---------------------------------------------------------------------------

def real_bytes(model, run):
    assert_bytes_are_real(model, run.steps)
    return run.steps["cache_tokens"].values  # (step, layer, kv_head)


def test_cake_under_budget_slices_the_cache_over_layers(tiny_llama):
    run = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get("cake", budget=48, window=8), max_new_tokens=6,
                      ignore_eos=True, record=["cache"])
    held = real_bytes(tiny_llama, run)
    assert (held[0].sum(0) == 48 * 2).all()  # per KV head, the layers share budget x layers
    assert held[0, 0, 0] != held[0, 1, 0]  # ... unevenly, by preference
    assert (held[-1] == held[0] + 5).all()  # compressed at the prefill only, then it grows
    assert run.held_cache_bytes < len(run.prompt_ids) * 2 * 2 * 2 * 64 * 4 / 2


def test_lazy_eviction_under_budget_evicts_every_few_steps(tiny_llama):
    run = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get("lazy_eviction", budget=48, every=4),
                      max_new_tokens=8, ignore_eos=True, record=["cache"])
    held = real_bytes(tiny_llama, run)[:, 0, 0]
    n = len(run.prompt_ids)
    assert held.tolist() == [n, n + 1, n + 2, n + 3, 48, 49, 50, 51]  # evicts at decoding steps 4, 8, ...


def test_razor_under_budget_retrieval_heads_keep_everything(tiny_llama):
    policy = wb.cache.get("razor_attention", budget=4 + 16 + 1)
    retrieval = razor_attention.find_retrieval_heads(tiny_llama, wb.run.probe(tiny_llama), policy.retrieval_fraction)
    run = wb.generate(tiny_llama, PROMPT, cache=policy, max_new_tokens=6, ignore_eos=True, record=["cache"])
    held = real_bytes(tiny_llama, run)
    n = len(run.prompt_ids)
    for step in range(6):
        assert (held[step][retrieval.numpy()] == n + step).all()
        assert (held[step][~retrieval.numpy()] == 4 + 16 + 1).all()  # sinks + window + compensation token
    merged = run.steps["cache_merged_into"].values
    evicted = run.steps["cache_evicted_at"].values >= 0
    assert evicted.any() and not evicted[retrieval.numpy()].any()
    assert (merged[evicted] >= 4).all()  # every dropped token went into a compensation token


def test_bad_parameters_fail_clearly(tiny_llama):
    with pytest.raises(wb.ParameterError, match="'kernel' is 4; it must be odd"):
        wb.cache.get("cake", kernel=4)
    with pytest.raises(wb.ParameterError, match="'window' is 1; it must be >= 2"):
        wb.cache.get("cake", window=1)
    with pytest.raises(wb.ParameterError, match="'compress' is 'decode'; allowed: 'prefill', 'both'"):
        wb.cache.get("cake", compress="decode")
    with pytest.raises(wb.ParameterError, match="'tau1' is 0.0; it must be >= 0.001"):
        wb.cache.get("cake", tau1=0)
    with pytest.raises(wb.ParameterError, match="'compress' is 'prefill'; allowed: 'decode'"):
        wb.cache.get("lazy_eviction", compress="prefill")
    with pytest.raises(wb.ParameterError, match="'threshold' is -1.0; it must be >= 0.0"):
        wb.cache.get("lazy_eviction", threshold=-1)
    with pytest.raises(wb.ParameterError, match=r"budget 20 leaves no room for the compensation token: it must "
                                                r"be >= sinks \+ window \+ 1 \(4 \+ 16 \+ 1\)"):
        wb.cache.get("razor_attention", budget=20)
    with pytest.raises(wb.ParameterError, match="'retrieval_fraction' is 1.5; it must be <= 1.0"):
        wb.cache.get("razor_attention", retrieval_fraction=1.5)
    with pytest.raises(wb.ParameterError, match=r"shape \(layers, kv_heads\) = \(2, 2\); got \(2, 3\)"):
        wb.cache.get("razor_attention").build_for(tiny_llama, torch.zeros(2, 3, dtype=torch.bool))


@pytest.mark.embedded
def test_embedded_model_new_policies(embedded):
    """CAKE gives layers different budgets; RazorAttention's probe finds real induction heads and keeps the
    passkey; LazyEviction shrinks the cache once it has observed (big budgets are checked on the tiny models)."""
    prompt = [{"role": "user", "content": "Remember the number 4721. " + "The grass is green. " * 40 +
               "What number did I ask you to remember?"}]
    full = wb.generate(embedded, prompt, max_new_tokens=8, record=["cache"])
    scores = razor_attention.retrieval_head_scores(embedded, wb.run.probe(embedded))
    assert scores.max() > 0.5 > 0.05 > scores.median()  # a few heads copy, most do not
    for name, params in [("cake", {"window": 16}), ("lazy_eviction", {"every": 4}), ("razor_attention", {})]:
        small = wb.generate(embedded, prompt, cache=wb.cache.get(name, budget=64, **params), max_new_tokens=8,
                            record=["cache"])
        held = small.steps["cache_tokens"].values
        assert small.steps["cache_bytes"].values[-1] < full.steps["cache_bytes"].values[-1] / 2, name
        if name == "cake":
            assert held[0].mean() == pytest.approx(64) and held[0, :, 0].std() > 10  # uneven over layers
        if name == "razor_attention":
            retrieval = razor_attention.find_retrieval_heads(embedded, wb.run.probe(embedded)).numpy()  # 14 of 90
            assert retrieval.sum() == 14 and (held[-1][retrieval] == held[-1].max()).all()
            assert (held[-1][~retrieval] == 64).all() and "4721" in small.text
