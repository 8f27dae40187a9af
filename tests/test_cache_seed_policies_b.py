"""epicache (block-wise prefill, episodes), chelsea (chunked soft matching into centroids) and elastic (merging into
anchors, a fixed truncation point): hand-built inputs give the kept and merged sets and the merged keys/values the
papers' rules say (written out here); budgets covering everything reproduce the full cache; under budget the cache
really holds less; epicache's block-wise passes bound the peak memory; bad parameters fail clearly."""

import math

import pytest
import torch

import workbench as wb
from workbench.attention.base import AttentionResult
from workbench.cache import testing
from workbench.cache.epicache import prefill_blockwise
from workbench.cache.storage import slack
from workbench.cache.testing import assert_bytes_are_real, fill, masked_dense_logits

NAMES = ["epicache", "chelsea", "elastic"]
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 byte tokens on the tiny models


def held_positions(cache, layer=0):
    return [p.tolist() for p in cache.positions(layer)]


def merged_into(cache):
    return [(head, p.tolist(), None if m is None else m.tolist()) for _, head, p, m in cache.drain_events()]


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


# -- all three, end to end ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [{"name": "epicache", "level": "uniform", "block": 32}, {"name": "epicache"},
                                    {"name": "chelsea"}, {"name": "elastic"}])
def test_under_budget_the_cache_really_holds_less(tiny_llama, params):
    params = dict(params)
    name = params.pop("name")
    budget, steps = 48, 6
    run = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get(name, budget=budget, window=8, **params),
                      max_new_tokens=steps, ignore_eos=True, record=["cache"])
    trace, text = run.steps, tiny_llama.text_config
    held = trace["cache_tokens"].values  # (step, layer, kv_head)
    assert_bytes_are_real(tiny_llama, trace)
    if name == "epicache":  # compresses the prompt, then grows by the answer
        grown = held - torch.arange(steps).numpy()[:, None, None]
        if params.get("level") == "uniform":
            assert (grown == budget).all()
        else:  # pair: one top-k over the layer's (KV head, token) pairs: head counts vary around the budget
            assert (grown.sum(axis=2) == budget * text.num_key_value_heads).all()
    else:  # merged or truncated down to the budget at every step
        assert (held == budget).all()
    per_token = 2 * text.num_key_value_heads * text.head_dim * 4 * text.num_hidden_layers
    assert trace["cache_bytes"].values[-1] < len(run.prompt_ids) * per_token


def test_bad_parameters_fail_clearly():
    with pytest.raises(wb.ParameterError, match="'block' is 0; it must be >= 1"):
        wb.cache.get("epicache", block=0)
    with pytest.raises(wb.ParameterError, match="'level' is 'layer'; allowed: 'pair', 'uniform'"):
        wb.cache.get("epicache", level="layer")
    with pytest.raises(wb.ParameterError, match="'episodes' is 0; it must be >= 1"):
        wb.cache.get("epicache", episodes=0)
    with pytest.raises(wb.ParameterError, match=r"budget 16 is smaller than sinks \+ window \(4 \+ 32\)"):
        wb.cache.get("epicache", budget=16)
    with pytest.raises(wb.ParameterError, match="'chunk' is 1; it must be >= 2"):
        wb.cache.get("chelsea", chunk=1)
    with pytest.raises(wb.ParameterError, match=r"budget 20 leaves no room to merge into beyond sinks \+ window "
                                                r"\(4 \+ 16\)"):
        wb.cache.get("chelsea", budget=20)
    with pytest.raises(wb.ParameterError, match="'nearest' is 'cosine'; allowed: 'position', 'key'"):
        wb.cache.get("elastic", nearest="cosine")
    with pytest.raises(wb.ParameterError, match="'distance' got 'far'; expected int"):
        wb.cache.get("elastic", distance="far")
    with pytest.raises(wb.ParameterError, match=r"budget 1 is smaller than sinks \+ window \(1 \+ 1\)"):
        wb.cache.get("elastic", budget=1)


# -- epicache ----------------------------------------------------------------------------------------------------
def block_scores(keys, queries, candidates, start, stop, window):
    """EpiCache's score, written out: for each KV head h and candidate p, the largest softmax weight that any of the
    block's last `window` queries of any query head of h's group pays p, over the candidates it sees (causal)."""
    kv_heads, groups, dim = keys.shape[0], queries.shape[0] // keys.shape[0], keys.shape[-1]
    scores = []
    for h in range(kv_heads):
        head = {}
        for q in range(max(start, stop - window), stop):
            seen = sorted(p for p in candidates[h] if p <= q)
            for query_head in range(h * groups, (h + 1) * groups):
                logits = torch.stack([queries[query_head, q] @ keys[h, p] for p in seen]) / math.sqrt(dim)
                for p, w in zip(seen, torch.softmax(logits, dim=0).tolist()):
                    head[p] = max(head.get(p, 0.0), w)
        scores.append({p: head.get(p, 0.0) for p in candidates[h]})
    return scores


def blockwise_expected(keys, queries, budget, sinks, window, block, level):
    """Kept positions per KV head after block-wise prefill: after each block, the sinks and the block's last
    `window` tokens plus the best-scored others, `budget` per head (uniform) or budget x heads in all (pair)."""
    kv_heads, n = keys.shape[0], keys.shape[1]
    kept = [set() for _ in range(kv_heads)]
    for start in range(0, n, block):
        stop = min(start + block, n)
        candidates = [k | set(range(start, stop)) for k in kept]
        sizes = [len(c) for c in candidates]
        if (sum(sizes) <= budget * kv_heads) if level == "pair" else max(sizes) <= budget:
            kept = candidates
            continue
        scores = block_scores(keys, queries, candidates, start, stop, window)
        protected = [{p for p in c if p < sinks or p > stop - 1 - window} for c in candidates]
        others = [(-scores[h][p], h, p) for h in range(kv_heads) for p in candidates[h] - protected[h]]
        if level == "pair":
            chosen = sorted(others)[:budget * kv_heads - sum(len(p) for p in protected)]
        else:
            chosen = [x for h in range(kv_heads) for x in sorted(o for o in others if o[1] == h)[:budget -
                                                                                                  len(protected[h])]]
        kept = [protected[h] | {p for _, g, p in chosen if g == h} for h in range(kv_heads)]
    return [sorted(k) for k in kept]


@pytest.mark.parametrize("level", ["uniform", "pair"])
def test_epicache_compresses_after_every_block_scored_by_its_last_queries(one_layer, level):
    torch.manual_seed(3)
    keys, queries = torch.randn(2, 20, 8), torch.randn(4, 20, 8)
    keys[1] *= 3  # KV head 1 attends more sharply: a few tokens score high, the rest low
    policy = wb.cache.get("epicache", budget=7, sinks=1, window=2, block=6, level=level)
    cache = policy.build(one_layer)
    fill(cache, 0, keys)
    kept = testing.attend(cache, 0, queries)
    assert kept == blockwise_expected(keys, queries, 7, 1, 2, 6, level)
    if level == "pair":
        assert sum(map(len, kept)) == 14 and len(kept[0]) != len(kept[1])  # one top-k over both heads
    # the same prompt in one block is SnapKV-like scoring with the max: another selection
    single = wb.cache.get("epicache", budget=7, sinks=1, window=2, block=20, level=level).build(one_layer)
    fill(single, 0, keys)
    assert testing.attend(single, 0, queries) == blockwise_expected(keys, queries, 7, 1, 2, 20, level) != kept


def test_epicache_in_pass_blocks_only_evict_so_the_oracle_holds(tiny_models):
    for family in ("llama", "gemma2"):
        model = tiny_models[family]
        run = wb.generate(model, PROMPT, cache=wb.cache.get("epicache", budget=40, window=8, block=32),
                          max_new_tokens=10, ignore_eos=True, record=["logits", "cache"])
        assert (run.steps["cache_evicted_at"] >= 0).any() and (run.steps["cache_merged_into"] < 0).all()
        torch.testing.assert_close(torch.from_numpy(run.steps["logits"].values), masked_dense_logits(model, run),
                                   atol=2e-4, rtol=1e-4)


def test_epicache_blocks_fed_as_passes_bound_the_peak_memory(tiny_llama):
    """Fed as a prefill of one block and 'append' passes of the next, the cache never holds more than budget +
    block tokens on the layer compressing and the budget on the others; one whole-prompt pass holds the prompt."""
    budget, block = 48, 32
    policy = wb.cache.get("epicache", budget=budget, window=8, block=block, level="uniform")
    ids = tiny_llama.encode(PROMPT)[0]
    text = tiny_llama.text_config
    per_layer_token = 2 * text.num_key_value_heads * text.head_dim * 4
    layers = text.num_hidden_layers
    with wb.Session(tiny_llama, policy) as session:
        prefill_blockwise(session, ids)
        assert session.forwards == math.ceil(len(ids) / block)
        assert (session.cache.tokens_held() == budget).all()
        blockwise = session.peak_bytes
    bound = (layers * budget + block + layers * (2 * slack(budget + block) + 1)) * per_layer_token
    assert blockwise <= bound
    run = wb.generate(tiny_llama, PROMPT, cache=policy, max_new_tokens=1)
    assert run.peak_cache_bytes >= ((layers - 1) * budget + len(ids)) * per_layer_token > blockwise


EPISODE_A, EPISODE_B = [10, 11, 12, 13], [50, 51, 52, 53]
LAYOUT = "ABABAA"  # six segments of 4 tokens: episode A holds 16 tokens, B 8


def test_epicache_episodes_share_the_budget_by_dhondt(one_layer):
    torch.manual_seed(5)
    n = 4 * len(LAYOUT)
    token_ids = [t for kind in LAYOUT for t in (EPISODE_A if kind == "A" else EPISODE_B)]
    keys, queries = torch.randn(2, n, 8), torch.randn(4, n, 8)
    budget, sinks, window = 7, 1, 2
    policy = wb.cache.get("epicache", budget=budget, sinks=sinks, window=window, block=64, level="uniform",
                          episodes=2, segment=4)
    cache = policy.build(one_layer)
    fill(cache, 0, keys, token_ids=token_ids)
    labels = cache.state["episode_labels"].tolist()  # equal segments, equal embeddings: exactly two clusters
    assert labels == [0 if kind == "A" else 1 for kind in LAYOUT for _ in range(4)]
    kept = testing.attend(cache, 0, queries)
    scores = block_scores(keys, queries, [set(range(n))] * 2, 0, n, window)
    share = {0: 16, 1: 8}
    for h in range(2):  # D'Hondt: the i-th best free token of an episode of share s ranks at i / s
        protected = {p for p in range(n) if p < sinks or p > n - 1 - window}
        ranked = []
        for episode in (0, 1):
            free = sorted((p for p in range(n) if labels[p] == episode and p not in protected),
                          key=lambda p: -scores[h][p])
            ranked += [((i + 1) / share[episode], -scores[h][p], p) for i, p in enumerate(free)]
        chosen = {p for *_, p in sorted(ranked)[:budget - len(protected)]}
        assert kept[h] == sorted(protected | chosen)
        assert sum(labels[p] == 1 for p in chosen) == 1  # priorities 1/16, 2/16, 1/8, 3/16 | 4/16, ...: A A B A


def test_epicache_episodes_need_the_prompt_tokens(one_layer):
    cache = wb.cache.get("epicache", budget=8, sinks=0, window=2, episodes=2).build(one_layer)
    with pytest.raises(wb.WorkbenchError, match="clusters the prompt's tokens: the prefill pass must carry"):
        fill(cache, 0, torch.randn(2, 12, 8))


# -- chelsea -----------------------------------------------------------------------------------------------------
CHELSEA_KEYS = torch.tensor([
    [1.0, 0.1, 0, 0],  # 0 source of chunk 0: nearest destination 1 (cos 0.995)
    [1.0, 0, 0, 0],  # 1 destination
    [1.0, 0, 0.3, 0],  # 2 source: nearest destination 1 too (cos 0.958): 1's cluster is {0, 1, 2}
    [0, 0, 0, 1.0],  # 3 destination
    [0, 0, 0, 1.0],  # 4 source of chunk 1: identical to 3, but 3 is in chunk 0; nearest of its chunk 5 (0.894)
    [0, 0, 0.5, 1.0],  # 5 destination
    [0, 1.0, 0, 0],  # 6 source: nearest destination 7 (cos 0.447): the least similar, stays
    [0, 1.0, 2.0, 0],  # 7 destination
    [0.3, 0.3, 0.3, 0.3],  # 8 the recent window
])


def test_chelsea_merges_the_most_similar_sources_of_each_chunk_into_centroids(one_layer):
    keys, values = CHELSEA_KEYS.expand(2, -1, -1).clone(), torch.randn(2, 9, 4)
    cache = wb.cache.get("chelsea", budget=6, sinks=0, window=1, chunk=4).build(one_layer)
    fill(cache, 0, keys, values)
    assert testing.attend(cache, 0, torch.randn(4, 9, 4)) == [[1, 3, 5, 6, 7, 8]] * 2  # r = 3: 0, 2, 4 merge
    assert merged_into(cache) == [(h, [0, 2, 4], [1, 1, 5]) for h in (0, 1)]
    layer = cache.layers[0]
    for h in range(2):
        torch.testing.assert_close(layer.held_keys()[h, 0], keys[h, [0, 1, 2]].mean(0))  # centroids
        torch.testing.assert_close(layer.held_values()[h, 0], values[h, [0, 1, 2]].mean(0))
        torch.testing.assert_close(layer.held_keys()[h, 2], keys[h, [4, 5]].mean(0))
        torch.testing.assert_close(layer.held_values()[h, 2], values[h, [4, 5]].mean(0))
        torch.testing.assert_close(layer.held_keys()[h, [1, 3, 4, 5]], keys[h, [3, 6, 7, 8]])
    # a decoding step pushes the heads one over: the re-chunked cache [1, 3, 5, 6 | 7, 8] (9: the window) merges
    # its single most similar (source, destination) pair, weighted by the tokens each entry stands for
    entries = {1: (layer.held_keys()[0, 0].clone(), 3), 3: (keys[0, 3], 1), 5: (layer.held_keys()[0, 2].clone(), 2),
               6: (keys[0, 6], 1), 7: (keys[0, 7], 1), 8: (keys[0, 8], 1)}
    pairs = [(s, d) for s, d in [(1, 3), (1, 6), (5, 3), (5, 6), (7, 8)]]
    nearest = {s: max((d for s2, d in pairs if s2 == s), key=lambda d: cos(entries[s][0], entries[d][0]))
               for s in (1, 5, 7)}
    source = max(nearest, key=lambda s: cos(entries[s][0], entries[nearest[s]][0]))
    dest = nearest[source]
    (k_s, n_s), (k_d, n_d) = entries[source], entries[dest]
    fill(cache, 0, torch.zeros(2, 1, 4) + torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.randn(2, 1, 4))
    testing.attend(cache, 0, torch.randn(4, 1, 4))
    assert held_positions(cache) == [sorted({1, 3, 5, 6, 7, 8, 9} - {source})] * 2
    assert merged_into(cache) == [(h, [source], [dest]) for h in (0, 1)]
    slot = sorted({1, 3, 5, 6, 7, 8, 9} - {source}).index(dest)
    torch.testing.assert_close(layer.held_keys()[0, slot], (n_s * k_s + n_d * k_d) / (n_s + n_d))


def test_chelsea_matches_again_past_a_halving_and_centroids_stay_means_of_the_originals(one_layer):
    torch.manual_seed(1)
    x, y = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    group = torch.stack([x] * 4 + [y] * 4) + 0.05 * torch.randn(8, 4)  # 0-3 one direction, 4-7 another
    keys = torch.cat([group, torch.tensor([[0, 0, 1.0, 0]])]).expand(2, -1, -1).clone()
    values = torch.randn(2, 9, 4)
    cache = wb.cache.get("chelsea", budget=3, sinks=0, window=1, chunk=8).build(one_layer)
    fill(cache, 0, keys, values)
    assert testing.attend(cache, 0, torch.randn(4, 9, 4)) == [[3, 7, 8]] * 2  # 4 sources merge, then 2 more
    layer = cache.layers[0]
    for h in range(2):
        torch.testing.assert_close(layer.held_keys()[h, :2], torch.stack([keys[h, :4].mean(0), keys[h, 4:8].mean(0)]))
        torch.testing.assert_close(layer.held_values()[h, :2],
                                   torch.stack([values[h, :4].mean(0), values[h, 4:8].mean(0)]))
    assert layer.extra("size")[:, :3].tolist() == [[4.0, 4.0, 1.0]] * 2


# -- elastic -----------------------------------------------------------------------------------------------------
def elastic_cache(model, **params):
    keys, values = torch.randn(2, 10, 4), torch.randn(2, 10, 4)
    cache = wb.cache.get("elastic", budget=5, **params).build(model)
    fill(cache, 0, keys, values)
    mass = torch.full((1, 2, 10), 0.1) + torch.arange(10) * 0.01  # distinct, all small
    for position, m in {2: 5.0, 6: 4.0, 8: 3.0}.items():  # the anchors: the most attended (0 and 9 are kept)
        mass[0, :, position] = m
    testing.attend(cache, 0, torch.randn(4, 10, 4), AttentionResult(torch.zeros(1), key_mass=mass))
    return cache, keys, values


def test_elastic_merges_every_thrown_token_into_its_nearest_anchor(one_layer):
    torch.manual_seed(2)
    cache, keys, values = elastic_cache(one_layer)
    assert held_positions(cache) == [[0, 2, 6, 8, 9]] * 2
    # nearest anchor by position, ties to the earlier: 1, 3, 4 (2 or 6 at 2: 2) -> 2; 5, 7 (6 or 8 at 1: 6) -> 6
    assert merged_into(cache) == [(h, [1, 3, 4, 5, 7], [2, 2, 2, 6, 6]) for h in (0, 1)]
    layer = cache.layers[0]
    for h in range(2):  # an anchor becomes the plain mean of itself and what it absorbed
        torch.testing.assert_close(layer.held_keys()[h, 1], keys[h, [2, 1, 3, 4]].mean(0))
        torch.testing.assert_close(layer.held_values()[h, 1], values[h, [2, 1, 3, 4]].mean(0))
        torch.testing.assert_close(layer.held_keys()[h, 2], keys[h, [6, 5, 7]].mean(0))
        torch.testing.assert_close(layer.held_values()[h, 2], values[h, [6, 5, 7]].mean(0))
        torch.testing.assert_close(layer.held_keys()[h, [0, 3, 4]], keys[h, [0, 8, 9]])  # sink, anchor 8, window


def test_elastic_can_find_the_nearest_anchor_by_key_similarity(one_layer):
    torch.manual_seed(4)
    cache, keys, values = elastic_cache(one_layer, nearest="key")
    assert held_positions(cache) == [[0, 2, 6, 8, 9]] * 2
    layer = cache.layers[0]
    for h, (_, positions, into) in enumerate(merged_into(cache)):
        assert positions == [1, 3, 4, 5, 7]
        expected = [max((2, 6, 8), key=lambda a: cos(keys[h, t], keys[h, a])) for t in positions]
        assert into == expected
        for slot, anchor in enumerate((2, 6, 8), start=1):
            absorbed = [anchor] + [t for t, a in zip(positions, expected) if a == anchor]
            torch.testing.assert_close(layer.held_keys()[h, slot], keys[h, absorbed].mean(0))


@pytest.mark.parametrize("distance, gone", [(-2, [8, 9, 10]), (2, [6, 8, 9]), (-25, [2, 6, 8])])
def test_elastic_truncates_generation_at_a_fixed_point(one_layer, distance, gone):
    """Held [0, 2, 6, 8, 9] at budget 5: each decoding step evicts the token at held index budget + distance (or
    distance, when positive), clamped to [sinks, budget - window - 1]: what crosses the point goes, oldest first."""
    torch.manual_seed(2)
    cache, _, _ = elastic_cache(one_layer, distance=distance)
    cache.drain_events()
    held = [0, 2, 6, 8, 9]
    for step, position in enumerate(gone):
        fill(cache, 0, torch.randn(2, 1, 4))
        testing.attend(cache, 0, torch.randn(4, 1, 4))
        held = [p for p in held if p != position] + [10 + step]
        assert held_positions(cache) == [held] * 2
        assert merged_into(cache) == [(h, [position], [-1]) for h in (0, 1)]  # truncation drops, no merge


@pytest.mark.parametrize("name", ["chelsea", "elastic"])
def test_merges_are_recorded_in_the_trace(tiny_llama, name):
    run = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get(name, budget=48, window=8), max_new_tokens=4,
                      ignore_eos=True, record=["cache"])
    evicted_at, into = run.steps["cache_evicted_at"].values, run.steps["cache_merged_into"].values
    layer, head, position = (into >= 0).nonzero()
    assert len(position) > 0
    targets = into[layer, head, position]
    assert (targets != position).all() and (evicted_at[layer, head, position] >= 0).all()
    later = evicted_at[layer, head, targets]  # merged into a token that was still held then (chelsea: a
    gone = evicted_at[layer, head, position]  # centroid may merge again in the next matching round of that step)
    assert ((later == -1) | (later > gone) | ((later == gone) if name == "chelsea" else False)).all()
