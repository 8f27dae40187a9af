"""Merging (kvmerger, d2o) and query-aware selection (mpcache, sentence_kv) caches: hand-built inputs give the kept,
merged and selected sets the papers' rules say; merged keys/values are the stated weighted combinations and land
in the trace; attention through a selection mask equals dense attention over exactly the selected tokens; budgets
and selections covering everything reproduce the full cache; under budget the cache really holds less."""

import math

import pytest
import torch

import workbench as wb
from workbench.attention.base import AttentionResult
from workbench.cache import testing
from workbench.cache.kvcache import ForwardPass
from workbench.cache.testing import assert_bytes_are_real, dense_logits_under, fill

NAMES = ["kvmerger", "d2o", "mpcache", "sentence_kv"]
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 byte tokens, 3 sentences on the tiny models
EVERYTHING = {"kvmerger": {"budget": 400}, "d2o": {"budget": 400},
              "mpcache": {"budget": 400, "coarse": 4, "fine": 2, "top_coarse": 4, "top_fine": 8},
              "sentence_kv": {"top_sentences": 100}}


EVERY_LAYER_AT_PREFILL = {"full_layers": "", "compress": "both"}  # D2O's defaults compress no layer of these models
# at the prefill (layers 0, 1 and the last stay whole; compression starts at the first decoding step)


def filled_cache(model, policy, keys, values=None, token_ids=None):
    cache = policy.build(model)
    fill(cache, 0, keys, values, token_ids=token_ids)
    return cache


def call_for(cache, query):
    return testing.call_for(cache, 0, query)


def attend(cache, query, key_mass=None):
    """Layer 0's attention step for `query`: the mask, attention, then the policy (which may evict or merge)."""
    testing.attend(cache, 0, query, None if key_mass is None else AttentionResult(torch.zeros(1), key_mass=key_mass))


def held_positions(cache, layer=0):
    return [p.tolist() for p in cache.positions(layer)]


def mass(n, weights):
    out = torch.zeros(1, 2, n)
    for slot, w in weights.items():
        out[0, :, slot] = w
    return out


def assert_masked_attention_is_dense_over(call, layer, visible):
    """Attention through the cache's mask equals, per query head, dense attention over exactly the visible slots
    (visible: per KV head, the storage slots), computed independently."""
    call.mask = call.mask.repeat_interleave(call.groups, dim=1)
    output = wb.attention.get("sdpa").attend(call, frozenset()).output[0]  # (q, heads, dim)
    for head in range(call.query.shape[1]):
        kv = head // call.groups
        k, v = layer.held_keys()[kv][visible[kv]], layer.held_values()[kv][visible[kv]]
        weights = torch.softmax(call.query[0, head, -1] @ k.T * call.scaling, dim=-1)
        torch.testing.assert_close(output[-1, head], weights @ v, atol=1e-5, rtol=1e-5)


# -- kvmerger ---------------------------------------------------------------------------------------------------
KVMERGER_KEYS = torch.tensor([
    [1.0, 0.2, 0, 0],  # 0  } a merging set (cos 0.98): evicted 0 merges into kept 1
    [1.0, 0, 0, 0],  # 1    }
    [0, 0, 1.0, 0],  # 2  } a set with nothing kept: 2 and 3 are dropped
    [0, 0, 1.0, 0.1],  # 3  }
    [0, 2.0, 0, 0],  # 4  } a set (cos 0.97): evicted 5 merges into kept 4
    [0, 2.0, 0.5, 0],  # 5  }
    [0, 0, 0, 1.0],  # 6  kept alone
    [-1.0, 0, 0, 0],  # 7  the recent window
])


def test_kvmerger_merges_evicted_tokens_into_their_merging_set_with_gaussian_weights(tiny_llama):
    keys = KVMERGER_KEYS.expand(2, -1, -1).clone()
    values = torch.randn(2, 8, 4)
    policy = wb.cache.get("kvmerger", budget=4, sinks=0, window=1, threshold=0.8, sigma=0.5)
    cache = filled_cache(tiny_llama, policy, keys, values)
    attend(cache, torch.randn(4, 8, 4), key_mass=mass(8, {1: 3.0, 4: 2.0, 6: 1.0}))
    assert held_positions(cache) == [[1, 4, 6, 7]] * 2  # H2O's choice
    events = cache.drain_events()
    assert [(head, p.tolist(), m.tolist()) for _, head, p, m in events] == [(h, [0, 2, 3, 5], [1, -1, -1, 4])
                                                                             for h in (0, 1)]
    held_k, held_v = cache.layers[0].held_keys(), cache.layers[0].held_values()
    # w ∝ exp(-|k - k_pivot|² / (2 sigma² |k_pivot|²)): pivot 1 (|k|² = 1, d² = 0.04), pivot 4 (|k|² = 4, d² = 0.25)
    for h in range(2):
        w = math.exp(-0.04 / (2 * 0.25 * 1.0))
        torch.testing.assert_close(held_k[h, 0], (keys[h, 1] + w * keys[h, 0]) / (1 + w))
        torch.testing.assert_close(held_v[h, 0], (values[h, 1] + w * values[h, 0]) / (1 + w))
        w = math.exp(-0.25 / (2 * 0.25 * 4.0))
        torch.testing.assert_close(held_k[h, 1], (keys[h, 4] + w * keys[h, 5]) / (1 + w))
        torch.testing.assert_close(held_v[h, 1], (values[h, 4] + w * values[h, 5]) / (1 + w))
        torch.testing.assert_close(held_k[h, 2:4], keys[h, 6:])  # nothing merged into 6 and 7
        torch.testing.assert_close(held_v[h, 2:4], values[h, 6:])


def assert_merges_are_traced(trace):
    evicted_at = trace["cache_evicted_at"].values
    merged_into = trace["cache_merged_into"].values
    layer, head, position = (merged_into >= 0).nonzero()
    assert len(position) > 0
    targets = merged_into[layer, head, position]
    assert (targets != position).all()
    assert (evicted_at[layer, head, position] >= 0).all()  # a merged token left the cache ...
    later = evicted_at[layer, head, targets]  # ... into one that was kept then
    assert ((later == -1) | (later > evicted_at[layer, head, position])).all()


def test_kvmerger_records_merges_in_the_trace(tiny_llama):
    run = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get("kvmerger", budget=48, window=8, threshold=0.0),
                      max_new_tokens=4, ignore_eos=True, record=["cache"])
    assert_merges_are_traced(run.steps)


# -- d2o --------------------------------------------------------------------------------------------------------
def test_d2o_layer_budgets_follow_attention_density():
    policy = wb.cache.get("d2o", budget=60, sinks=2, window=4)
    assert policy.allocate(60, [0.9, 0.3], prompt_length=200) == [90, 30]  # shares of 120 in proportion 3 : 1
    assert policy.allocate(60, [1.0, 0.01], prompt_length=200) == [119, 6]  # never below sinks + window
    assert policy.allocate(60, [0.9, 0.3], prompt_length=50) == [60, 60]  # a prompt within budget stays whole


def test_d2o_density_is_the_normalised_entropy_of_the_last_rows(tiny_llama):
    policy = wb.cache.get("d2o", budget=60, sinks=0, window=4)
    cache = filled_cache(tiny_llama, policy, torch.zeros(2, 10, 8))
    assert policy.density(call_for(cache, torch.randn(4, 10, 8))) == pytest.approx(1.0)  # equal keys: uniform
    keys = torch.zeros(2, 10, 8)
    keys[:, 0, 0] = 1.0
    query = torch.zeros(4, 10, 8)
    query[..., 0] = 100.0  # every query looks at token 0 only
    cache = filled_cache(tiny_llama, policy, keys)
    assert policy.density(call_for(cache, query)) == pytest.approx(0.0, abs=1e-6)


D2O_KEYS = torch.tensor([
    [1.0, 0.3, 0, 0],  # 0 evicted: nearest kept 1 (cos 0.958)
    [1.0, 0, 0, 0],  # 1 kept
    [1.0, 0, 0.5, 0],  # 2 evicted: nearest kept 1 (cos 0.894)
    [0, 1.0, 0, 0],  # 3 kept
    [0, 0, 1.0, 0],  # 4 evicted: orthogonal to every kept key (cos 0)
    [0, 0, 0, 1.0],  # 5 the recent window
])


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def d2o_merged(kept, absorbed, similarities):
    """D2O's update: (e k_c + Σ exp(u) k_e) / (e + Σ exp(u))."""
    weights = [math.e] + [math.exp(u) for u in similarities]
    return (weights[0] * kept + sum(w * k for w, k in zip(weights[1:], absorbed))) / sum(weights)


def test_d2o_merges_above_the_threshold_with_similarity_weights(one_layer):
    keys, values = D2O_KEYS.expand(2, -1, -1).clone(), torch.randn(2, 6, 4)
    cache = filled_cache(one_layer, wb.cache.get("d2o", budget=3, window=1, threshold=0.5, **EVERY_LAYER_AT_PREFILL), keys, values)
    attend(cache, torch.randn(4, 6, 4), key_mass=mass(6, {1: 3.0, 3: 2.0}))
    assert held_positions(cache) == [[1, 3, 5]] * 2
    assert [m.tolist() for *_, m in cache.drain_events()] == [[1, 1, -1]] * 2  # 0 and 2 into 1; 4 dropped
    u0, u2 = cos(keys[0, 0], keys[0, 1]), cos(keys[0, 2], keys[0, 1])
    held_k, held_v = cache.layers[0].held_keys(), cache.layers[0].held_values()
    for h in range(2):
        torch.testing.assert_close(held_k[h, 0], d2o_merged(keys[h, 1], [keys[h, 0], keys[h, 2]], [u0, u2]))
        torch.testing.assert_close(held_v[h, 0], d2o_merged(values[h, 1], [values[h, 0], values[h, 2]], [u0, u2]))
        torch.testing.assert_close(held_k[h, 1:3], keys[h, [3, 5]])


def test_d2o_threshold_is_an_ema_of_the_similarities(one_layer):
    keys = D2O_KEYS.expand(2, -1, -1).clone()
    cache = filled_cache(one_layer, wb.cache.get("d2o", budget=3, window=1, **EVERY_LAYER_AT_PREFILL), keys)
    attend(cache, torch.randn(4, 6, 4), key_mass=mass(6, {1: 3.0, 3: 2.0}))
    u0, u2 = cos(keys[0, 0], keys[0, 1]), cos(keys[0, 2], keys[0, 1])
    tau = (u0 + u2 + 0.0) / 3  # the first eviction starts the average: 0.617, so 0 and 2 merge, 4 does not
    assert float(cache.layers[0].state["threshold"]) == pytest.approx(tau)
    assert [m.tolist() for *_, m in cache.drain_events()] == [[1, 1, -1]] * 2
    # a decoding step: token 6 arrives, 5 (least attention) is evicted; its best match is 6 (cos 0.981)
    new_key = torch.tensor([0, 0, 0.2, 1.0])
    fill(cache, 0, new_key.expand(2, 1, 4).clone(), torch.randn(2, 1, 4))
    attend(cache, torch.randn(4, 1, 4), key_mass=torch.tensor([[[0.0, 0.0, 0.0, 0.5]] * 2]))
    u5 = cos(keys[0, 5], new_key)
    tau = 0.5 * tau + 0.5 * u5  # D2O's code: both EMA weights 0.5; 0.799 <= 0.981: merged
    assert float(cache.layers[0].state["threshold"]) == pytest.approx(tau)
    assert held_positions(cache) == [[1, 3, 6]] * 2
    assert [m.tolist() for *_, m in cache.drain_events()] == [[6]] * 2


def test_d2o_threshold_is_shared_by_the_heads_of_a_layer(one_layer):
    """D2O's code gates merges by the head mean: head 1's evicted tokens are dissimilar to what it keeps, head 0's
    similar; one threshold, the mean of the two heads' mean similarities, decides for both."""
    keys = D2O_KEYS.expand(2, -1, -1).clone()
    keys[1, [0, 2]] = torch.tensor([[0, 0, 0, -1.0], [0, 0, -1.0, 0]])  # head 1: orthogonal or opposite
    cache = filled_cache(one_layer, wb.cache.get("d2o", budget=3, window=1, **EVERY_LAYER_AT_PREFILL), keys)
    attend(cache, torch.randn(4, 6, 4), key_mass=mass(6, {1: 3.0, 3: 2.0}))
    best = [[cos(keys[h, e], keys[h, c]) for c in (1, 3, 5)] for h in range(2) for e in (0, 2, 4)]
    per_head = [sum(max(b) for b in best[3 * h:3 * h + 3]) / 3 for h in range(2)]
    assert float(cache.layers[0].state["threshold"]) == pytest.approx(sum(per_head) / 2)
    merged = [m.tolist() for *_, m in cache.drain_events()]
    assert merged == [[1, 1, -1], [-1, -1, -1]]  # head 0's 0.96 and 0.89 clear the shared 0.31; head 1's do not


def test_d2o_defaults_keep_layers_0_1_and_the_last_whole_and_compress_when_decoding_starts():
    model = wb.tiny("llama", num_hidden_layers=4)
    session = wb.Session(model, wb.cache.get("d2o", budget=40, window=8))
    ids = model.encode(PROMPT)
    session.feed(ids, "prefill")
    assert (session.cache.tokens_held() == ids.shape[1]).all()  # nothing compressed at the prefill
    session.feed([65], "decode")
    held = session.cache.tokens_held()
    assert (held[[0, 1, 3]] == ids.shape[1] + 1).all() and (held[2] < ids.shape[1]).all()


def test_d2o_prefill_allocates_by_each_layers_density_then_compresses_all(tiny_llama):
    policy = wb.cache.get("d2o", budget=48, window=8, **EVERY_LAYER_AT_PREFILL)
    ids = tiny_llama.encode(PROMPT)
    session = wb.Session(tiny_llama, policy)
    session.feed(ids, "prefill")
    cache = session.cache
    with torch.inference_mode():  # the densities, independently: eager attention weights of a plain forward
        previous = tiny_llama.hf.config._attn_implementation
        tiny_llama.hf.set_attn_implementation("eager")
        try:
            attentions = tiny_llama.hf(ids, output_attentions=True).attentions
        finally:
            tiny_llama.hf.set_attn_implementation(previous)
    n = ids.shape[1]
    visible = torch.arange(n - 8, n) + 1.0
    densities = cache.state["densities"]
    for density, probs in zip(densities, attentions):
        rows = probs[0, :, -8:].float()
        expected = (torch.special.entr(rows).sum(-1) / visible.log()).mean()
        assert density == pytest.approx(float(expected), abs=1e-4)
    budgets = [b[0] for b in cache.state["budgets"]]
    assert budgets == [max(8, round(48 * 2 * d / sum(densities))) for d in densities]  # shares of 48 x 2 layers
    assert cache.tokens_held().tolist() == [[b, b] for b in budgets]


def test_d2o_records_merges_in_the_trace(tiny_llama):
    run = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get("d2o", budget=48, window=8, full_layers=""),
                      max_new_tokens=4,
                      ignore_eos=True, record=["cache"])
    assert_merges_are_traced(run.steps)


# -- mpcache ----------------------------------------------------------------------------------------------------
def clustered_keys(n=24, dim=8):
    """Slots 2..21 in four clusters by slot % 4 (interleaved in position): 0 and 2 share direction e0 (a coarse
    cluster), 1 and 3 share e1; inside, e2 or e3 tells them apart. Slots 0, 1 (sinks) and 22, 23 (window) random."""
    torch.manual_seed(0)
    centers = torch.zeros(4, dim)
    centers[0, 0], centers[0, 2] = 10, 3
    centers[2, 0], centers[2, 2] = 10, -3
    centers[1, 1], centers[1, 3] = 10, 3
    centers[3, 1], centers[3, 3] = 10, -3
    keys = torch.randn(n, dim)
    for slot in range(2, 22):
        keys[slot] = centers[slot % 4] + 0.1 * torch.randn(dim)
    return torch.stack([keys, keys])


def test_mpcache_clusters_hierarchically_and_selects_by_query(tiny_llama):
    policy = wb.cache.get("mpcache", budget=24, sinks=2, window=2, coarse=2, fine=2, top_coarse=1, top_fine=1)
    cache = filled_cache(tiny_llama, policy, clustered_keys())
    attend(cache, torch.randn(4, 24, 8))  # the prefill: nothing to evict (24 <= budget), then clustering
    for index in cache.layers[0].state["clusters"]:
        labels = index.labels.tolist()
        assert labels[:2] == [-1, -1] and labels[22:] == [-1, -1]  # sinks and window: always attended
        groups = [{labels[s] for s in range(2, 22) if s % 4 == j} for j in range(4)]
        assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 4  # the four clusters, exactly
        assert index.parents[labels[2]] != index.parents[labels[3]]  # e0 and e1 clusters: different coarse
        assert index.parents[labels[4]] == index.parents[labels[2]]  # 0 and 2 share a coarse cluster
    fill(cache, 0, torch.randn(2, 1, 8))  # a decoding step: slot 24
    query = torch.zeros(4, 1, 8)
    query[0, 0, 0], query[1, 0, 2] = 2.0, 1.0  # KV head 0's group, summed: e0 and +e2 -> cluster 0 (slot % 4 == 0)
    query[2, 0, 1], query[3, 0, 3] = 2.0, -1.0  # KV head 1's group: e1 and -e3 -> cluster 3
    call = call_for(cache, query)
    chosen = [[0, 1, *(s for s in range(2, 22) if s % 4 == j), 22, 23, 24] for j in (0, 3)]
    assert [torch.nonzero(call.mask[0, h, 0]).flatten().tolist() for h in range(2)] == chosen
    assert float(cache.layers[0].state["selected_fraction"]) == pytest.approx(20 / 50)
    assert_masked_attention_is_dense_over(call, cache.layers[0], chosen)


def test_mpcache_reclusters_a_later_turn_that_evicts(tiny_llama):
    """With compress_turns a second turn re-evicts and compacts the slots, so the clusters must be rebuilt over the
    keys held now. Turn 2's keys point along e5 (turn 1's are random) and its queries look for them, so they are
    kept; a decoding query along e5 must then select every one of them (a stale index from turn 1 does not)."""
    torch.manual_seed(1)
    policy = wb.cache.get("mpcache", budget=16, sinks=2, window=4, coarse=2, fine=1, top_coarse=1, top_fine=1,
                          compress_turns=True)
    cache = filled_cache(tiny_llama, policy, torch.randn(2, 40, 8))
    attend(cache, torch.randn(4, 40, 8))  # turn 1: 40 -> 16 tokens, clustered
    fill(cache, 0, torch.randn(2, 1, 8))
    attend(cache, torch.randn(4, 1, 8))  # a decoding step: 17 held
    e5 = torch.zeros(8)
    e5[5] = 1.0
    fill(cache, 0, (5 * e5 + 0.1 * torch.randn(2, 12, 8)), phase="append")  # turn 2: positions 41..52
    attend(cache, 3 * e5.expand(4, 12, 8).clone())  # its queries look for e5: 29 -> 16 tokens
    fill(cache, 0, torch.randn(2, 1, 8))  # a decoding step (position 53) asking for e5
    call = call_for(cache, 3 * e5.expand(4, 1, 8).clone())
    for head in range(2):
        positions = cache.layers[0].positions()[head, :16].tolist()
        turn2 = [slot for slot, p in enumerate(positions) if 41 <= p <= 48]  # turn 2 outside the window
        assert len(turn2) == 8
        assert call.mask[0, head, 0, turn2].all()


def test_mpcache_evicts_once_like_snapkv(tiny_llama):
    keys, values, query = torch.randn(2, 40, 8), torch.randn(2, 40, 8), torch.randn(4, 40, 8)
    kept = {}
    for name in ("snapkv", "mpcache"):
        cache = filled_cache(tiny_llama, wb.cache.get(name, budget=16, sinks=2, window=4), keys, values)
        attend(cache, query)
        kept[name] = held_positions(cache)
    assert kept["mpcache"] == kept["snapkv"] and len(kept["mpcache"][0]) == 16
    for _ in range(3):  # decoding never evicts: the kept prompt plus every new token
        fill(cache, 0, torch.randn(2, 1, 8))
        attend(cache, torch.randn(4, 1, 8))
    assert cache.tokens_held()[0].tolist() == [19, 19]


# -- sentence_kv ------------------------------------------------------------------------------------------------
def test_sentence_kv_splits_sentences_at_punctuation_and_newlines(tiny_llama):
    cache = wb.cache.get("sentence_kv").build(tiny_llama)
    text = "Hi. Yo!\nA b? end"
    sentences = cache.state["sentences"]
    sentences.see(0, tiny_llama.tokenizer.encode(text, add_special_tokens=False))
    #                  H  i  .     Y  o  !  \n A     b  ?     e  n  d
    assert sentences.ids == [0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4]
    sentences.see(8, tiny_llama.tokenizer.encode("c. d", add_special_tokens=False))  # after a rollback to 8
    assert sentences.ids == [0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 4, 4]


SENTENCES = "aaa. bbb. ccc. ddd. ee"  # sentences 0: 0-3, 1: 4-8, 2: 9-13, 3: 14-18, 4 (open): 19-21


def sentence_cache(model, **params):
    """A sentence_kv cache holding SENTENCES, whose keys make sentence 3 the best match of e0 by mean key although
    sentence 2 holds the single best-matching token (10 e0 once, then -2 e0: mean 0.4, against 3's mean 1)."""
    keys = torch.zeros(22, 8)
    keys[0:4, 5], keys[4:9, 5] = 0.5, 1.0  # sentences 0 and 1: orthogonal to e0
    keys[9, 0], keys[10:14, 0] = 10.0, -2.0
    keys[14:19, 0] = 1.0
    keys[19:22, 6] = 1.0
    cache = wb.cache.get("sentence_kv", **params).build(model)
    fill(cache, 0, keys.expand(2, -1, -1).clone(), torch.randn(2, 22, 8),
         token_ids=model.tokenizer.encode(SENTENCES, add_special_tokens=False))
    return cache


def test_sentence_kv_attends_to_the_sentences_whose_mean_key_matches(tiny_llama):
    cache = sentence_cache(tiny_llama, sinks=1, window=2, top_sentences=1)
    attend(cache, torch.randn(4, 22, 8))  # the prefill: everything visible, nothing evicted (no budget)
    fill(cache, 0, torch.randn(2, 1, 8), token_ids=tiny_llama.tokenizer.encode("e", add_special_tokens=False))
    # position 22, in sentence 4
    query = torch.zeros(4, 1, 8)
    query[0:2, 0, 0] = 1.0  # KV head 0's group: e0 -> sentence 3 (by mean key)
    query[2, 0, 5], query[3, 0, 0] = 1.0, -0.5  # KV head 1's group: e5 - e0/2 -> sentence 1 (mean 1 against 0.5)
    call = call_for(cache, query)
    own = [19, 20, 21, 22]  # the query's sentence (and the window 21, 22)
    chosen = [[0, *range(14, 19), *own], [0, *range(4, 9), *own]]
    assert [torch.nonzero(call.mask[0, h, 0]).flatten().tolist() for h in range(2)] == chosen
    assert float(cache.layers[0].state["selected_fraction"]) == pytest.approx(20 / 46)
    assert_masked_attention_is_dense_over(call, cache.layers[0], chosen)


def test_sentence_kv_over_budget_evicts_the_lowest_sentences_whole(tiny_llama):
    cache = sentence_cache(tiny_llama, budget=12, sinks=1, window=2)
    query = torch.zeros(4, 22, 8)
    query[:, -1, 0] = 1.0  # the last prompt query ranks: own sentence 4, then 3 (mean 1), 2 (0.4), then 0 and 1
    attend(cache, query)
    # sink 0 and window 20, 21; then 19 (own sentence), 14-18 (sentence 3), and the latest 3 of sentence 2
    assert held_positions(cache) == [[0, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]] * 2


def test_sentence_kv_needs_the_token_ids(tiny_llama):
    cache = wb.cache.get("sentence_kv").build(tiny_llama)
    with pytest.raises(wb.WorkbenchError, match="needs the token ids of every forward pass"):
        cache.begin_pass(ForwardPass("prefill", 0, 4))  # a pass announced without them
    ids = tiny_llama.encode(PROMPT)  # model.generate inside use_attention hands them over
    cache = wb.cache.get("sentence_kv", top_sentences=1, window=8).build(tiny_llama)
    with wb.run.use_attention(tiny_llama, "sdpa", cache=cache):
        out = tiny_llama.hf.generate(ids, max_new_tokens=4, do_sample=False, cache=cache)
    ours = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get("sentence_kv", top_sentences=1, window=8),
                       max_new_tokens=4)
    assert out[0, ids.shape[1]:].tolist() == ours.token_ids


# -- all four, end to end ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mpcache", "sentence_kv"])
def test_a_narrow_selection_really_masks_during_decoding(tiny_llama, name):
    narrow = {"mpcache": {"budget": 400, "coarse": 4, "fine": 2, "top_coarse": 1, "top_fine": 1, "window": 8},
              "sentence_kv": {"top_sentences": 1, "window": 8}}[name]
    ids = tiny_llama.encode(PROMPT)
    session = wb.Session(tiny_llama, wb.cache.get(name, **narrow))
    session.feed(ids, "prefill")
    layers = session.cache.layers
    assert all("selected_fraction" not in layer.state for layer in layers)  # the prefill sees its causal past
    token = torch.tensor([[ids[0, 5]]])
    policy, chosen = session.cache.policy, {}
    choose = policy.visible

    def recording(layer, call):  # keep what the policy let the decode query see, per layer
        selection = choose(layer, call)
        chosen[layer.index] = (selection, layer.positions().clone())
        return selection

    policy.visible = recording
    logits = session.feed(token, "decode")[-1]
    assert all(0 < float(layer.state["selected_fraction"]) < 0.8 for layer in layers)
    # the oracle: a plain dense forward in which the decode query of each layer and KV head sees only the positions
    # the selection named (the prompt's queries their causal past)
    n = ids.shape[1] + 1
    visible = torch.ones(len(layers), 2, n, n, dtype=torch.bool).tril()
    for index, (selection, positions) in chosen.items():
        for head in range(2):
            row = torch.zeros(n, dtype=torch.bool)
            row[positions[head][selection[head, -1] & (positions[head] >= 0)]] = True
            visible[index, head, -1] = row
    assert (visible[:, :, -1].sum(-1) < n * 0.8).all()  # the selection is narrow
    expected = dense_logits_under(tiny_llama, ids[0].tolist() + [int(token)], visible)[-1]
    torch.testing.assert_close(logits[0] if logits.dim() == 2 else logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_under_budget_the_cache_really_holds_less(tiny_llama, name):
    budget, steps = 48, 6
    params = {"budget": budget, "window": 8, **({"full_layers": ""} if name == "d2o" else {})}
    run = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get(name, **params), max_new_tokens=steps,
                      ignore_eos=True, record=["cache"])
    trace, text = run.steps, tiny_llama.text_config
    bytes_per_token = 2 * text.head_dim * 4  # one KV head: K and V, float32
    held = trace["cache_tokens"].values  # (step, layer, kv_head)
    assert_bytes_are_real(tiny_llama, trace)
    if name == "mpcache":  # evicts once, then grows
        assert (held[0] == budget).all() and (held[-1] == budget + steps - 1).all()
    elif name == "d2o":  # compressed from the first decoding step on, to per-layer budgets averaging the budget
        assert (held[0] == len(run.prompt_ids)).all()
        assert (abs(held[1:].mean(axis=(1, 2)) - budget) <= 1).all() and (held[1:] != budget).any()
    else:
        assert (held == budget).all()
    assert trace["cache_bytes"].values[-1] < len(run.prompt_ids) * 2 * text.num_key_value_heads * bytes_per_token


def test_bad_parameters_fail_clearly():
    with pytest.raises(wb.ParameterError, match="'threshold' is 1.5; it must be <= 1.0"):
        wb.cache.get("kvmerger", threshold=1.5)
    with pytest.raises(wb.ParameterError, match="'sigma' must be > 0"):
        wb.cache.get("kvmerger", sigma=0)
    with pytest.raises(wb.ParameterError, match="'beta' is 2.0; it must be <= 1.0"):
        wb.cache.get("d2o", beta=2)
    with pytest.raises(wb.ParameterError, match="'threshold' is -3.0; it must be >= -1.0"):
        wb.cache.get("d2o", threshold=-3)
    with pytest.raises(wb.ParameterError, match=r"budget 16 is smaller than sinks \+ window \(0 \+ 32\)"):
        wb.cache.get("d2o", budget=16)
    with pytest.raises(wb.ParameterError, match="'full_layers' is 'first'; expected comma-separated layer indices"):
        wb.cache.get("d2o", full_layers="first")
    with pytest.raises(wb.ParameterError, match="top_coarse=9 of only coarse=8 clusters; use top_coarse <= coarse"):
        wb.cache.get("mpcache", top_coarse=9)
    with pytest.raises(wb.ParameterError, match="at most top_coarse \\* fine = 8; use top_fine <= 8"):
        wb.cache.get("mpcache", top_coarse=2, fine=4, top_fine=9)
    with pytest.raises(wb.ParameterError, match="'compress' is 'both'; allowed: 'prefill'"):
        wb.cache.get("mpcache", compress="both")
    with pytest.raises(wb.ParameterError, match="'top_sentences' is 0; it must be >= 1"):
        wb.cache.get("sentence_kv", top_sentences=0)
    with pytest.raises(wb.ParameterError, match=r"budget 10 is smaller than sinks \+ window \(4 \+ 16\)"):
        wb.cache.get("sentence_kv", budget=10)


# -- the embedded model -----------------------------------------------------------------------------------------
EMBEDDED_PROMPT = [{"role": "user", "content": "Remember the number 4721. " + "The grass is green. " * 16 +
                    "What number did I ask you to remember?"}]
EMBEDDED_SMALL = {"kvmerger": {"budget": 48, "window": 16}, "d2o": {"budget": 48, "window": 16},
                  "mpcache": {"budget": 48, "window": 16}, "sentence_kv": {"budget": 48, "top_sentences": 2}}


@pytest.fixture(scope="module")
def embedded_full(embedded):
    return wb.generate(embedded, EMBEDDED_PROMPT, max_new_tokens=8)


@pytest.mark.embedded
@pytest.mark.parametrize("name", NAMES)
def test_embedded_model(embedded, embedded_full, name):
    big = wb.generate(embedded, EMBEDDED_PROMPT, cache=wb.cache.get(name, **EVERYTHING[name]), max_new_tokens=8)
    assert big.token_ids == embedded_full.token_ids
    small = wb.generate(embedded, EMBEDDED_PROMPT, cache=wb.cache.get(name, **EMBEDDED_SMALL[name]),
                        max_new_tokens=8, record=["cache"])
    assert int(small.steps["cache_bytes"][-1]) < embedded_full.held_cache_bytes / 2  # d2o: from the first step on
