"""Scorers from the papers' equations: on fixed random queries and keys, each policy keeps exactly the tokens its
paper's rule, written out here independently (softmax, sums, pooling, top-k), says it keeps."""

import math

import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench.cache.testing import attend, fill

N, DIM, HEADS, KV_HEADS = 48, 64, 4, 2
GROUPS = HEADS // KV_HEADS


@pytest.fixture(scope="module")
def qk():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(KV_HEADS, N, DIM, generator=generator)
    queries = 3 * torch.randn(HEADS, N, DIM, generator=generator)  # peaked attention, so rankings are clear
    return queries, keys


def kept_by(model, name, qk, **params):
    queries, keys = qk
    cache = wb.cache.get(name, **params).build(model)
    fill(cache, 0, keys)
    return attend(cache, 0, queries)


def attention(queries, keys, rows):
    """Softmax attention (heads, len(rows), N) of the prompt's query rows, causal, each query head over its KV
    head's keys, scaled by 1/sqrt(d)."""
    scores = torch.einsum("hqd,hkd->hqk", queries[:, rows], keys.repeat_interleave(GROUPS, 0)) / math.sqrt(DIM)
    seen = torch.arange(N)[None] <= torch.arange(N)[rows][:, None]
    return torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)


def per_kv_head(per_query_head):
    """(heads, N) -> (kv_heads, N): summed over each KV group's query heads."""
    return per_query_head.view(KV_HEADS, GROUPS, -1).sum(1)


def top(scores, k, among=None):
    """Per row, the k best of the positions `among` (default all), ascending; of equal scores the older wins (max
    pooling makes plateaus; the papers' code leaves such ties to topk's order)."""
    among = torch.arange(scores.shape[-1]) if among is None else among
    return [sorted(among[torch.sort(row.index_select(0, among), descending=True, stable=True).indices[:k]].tolist())
            for row in scores]


@pytest.mark.parametrize("pooling,kernel", [("max", 7), ("avg", 5)])
def test_snapkv_keeps_the_pooled_votes_of_the_window_over_the_prefix(one_layer, qk, pooling, kernel):
    budget, window = 20, 8
    votes = per_kv_head(attention(*qk, slice(N - window, N)).sum(1))[:, :N - window]  # window columns removed
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(votes[:, None], kernel_size=kernel, stride=1, padding=kernel // 2)[:, 0]
    expected = [h + list(range(N - window, N)) for h in top(pooled, budget - window)]
    assert kept_by(one_layer, "snapkv", qk, budget=budget, window=window, pooling=pooling, kernel=kernel) == expected


def test_h2o_keeps_half_recent_and_half_heavy_hitters(one_layer, qk):
    budget = 20
    received = per_kv_head(attention(*qk, slice(None)).sum(1))  # column sums of the prompt's attention matrix
    recent = list(range(N - budget // 2, N))
    heavy = top(received, budget - budget // 2, torch.arange(N - budget // 2))
    assert kept_by(one_layer, "h2o", qk, budget=budget) == [h + recent for h in heavy]


def test_tova_keeps_what_the_last_query_attends_to_on_average_over_heads(one_layer, qk):
    budget = 20
    mean = attention(*qk, slice(N - 1, N))[:, 0].mean(0)  # the last query, averaged over all heads
    expected = top(mean[None], budget)[0]
    assert kept_by(one_layer, "tova", qk, budget=budget) == [expected] * KV_HEADS


def test_knorm_keeps_the_lowest_key_norms(one_layer, qk):
    budget = 20
    norms = qk[1].norm(dim=-1)
    expected = top(-norms, budget)
    assert kept_by(one_layer, "knorm", qk, budget=budget, full_layers="") == expected


def pyramid_reference(capacity, window, beta, layers, prompt):
    """PyramidKV's allocation (its code's integer arithmetic): prefix tokens per layer, plus the window."""
    if prompt < 2 * (capacity - window):
        return [capacity] * layers
    low = (capacity - window) // beta
    high = (capacity - window) * 2 - low
    if high >= prompt - window:
        high = prompt - window
        low = (capacity - window) * 2 - high
    steps = (high - low) // (layers - 1)
    return [window + high - layer * steps for layer in range(layers)]


@pytest.mark.parametrize("budget,window,prompt", [(128, 8, 2000), (128, 32, 2000), (256, 32, 300), (64, 8, 100)])
def test_pyramidkv_budgets_follow_the_papers_allocation(budget, window, prompt):
    policy = wb.cache.get("pyramidkv", budget=budget, window=window)
    assert policy.layer_budgets(budget, 30, prompt) == pyramid_reference(budget, window, 20, 30, prompt)


def test_pyramidkv_layers_keep_snapkv_votes_at_their_budgets(qk):
    model = wb.tiny("llama", num_hidden_layers=2)
    budget, window = 14, 4  # a pool of 10: layer 0 keeps 4 + 20, layer 1 4 + 0
    budgets = pyramid_reference(budget, window, 20, 2, N)
    cache = wb.cache.get("pyramidkv", budget=budget, window=window, kernel=1).build(model)
    for layer in range(2):
        fill(cache, layer, qk[1])
    for layer in range(2):
        kept = attend(cache, layer, qk[0])
        votes = per_kv_head(attention(*qk, slice(N - window, N)).sum(1))[:, :N - window]
        expected = [h + list(range(N - window, N)) for h in top(votes, budgets[layer] - window)]
        assert kept == expected, layer
    assert budgets[0] > budgets[1]


def test_cake_keeps_tokens_by_mean_plus_gamma_variance_of_the_window(one_layer, qk):
    """CAKE (Qin et al., Eq. 7-8): indicator = mean + gamma * var of each token's attention over the window's
    queries, averaged over `kernel` neighbours; one layer gets the whole pool."""
    budget, window, gamma, kernel = 20, 8, 200.0, 5
    probs = attention(*qk, slice(N - window, N))  # (heads, window, N)
    indicator = probs.mean(1) + gamma * probs.var(1)  # per query head; var is the unbiased sample variance
    smoothed = F.avg_pool1d(indicator[:, None], kernel, stride=1, padding=kernel // 2, count_include_pad=False)[:, 0]
    per_kv = smoothed.view(KV_HEADS, GROUPS, N).mean(1)
    expected = [h + list(range(N - window, N)) for h in top(per_kv, budget - window, torch.arange(N - window))]
    assert kept_by(one_layer, "cake", qk, budget=budget, window=window, gamma=gamma, kernel=kernel) == expected


def test_cake_layer_preference_is_entropy_times_variance_of_the_window_over_the_prefix(qk):
    from workbench.cache.cake import layer_preference

    window = 8
    probs = attention(*qk, slice(N - window, N))
    before = probs[..., :N - window]
    entropy = float(-(before * before.clamp_min(1e-30).log()).sum())  # summed over heads, rows and tokens
    variance = float(((before - before.mean(1, keepdim=True)) ** 2).sum(1).div(window - 1).sum())
    assert layer_preference(probs, window, 1.0, 1.0) == pytest.approx(entropy * variance, rel=1e-4)
    assert layer_preference(probs, window, 2.0, 0.5) == pytest.approx(entropy ** 0.5 * variance ** 2, rel=1e-4)
