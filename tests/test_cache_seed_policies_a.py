"""CompressKV, KVCrush and LaCache: each keeps what its paper's rule, written out here independently (softmax,
sums, pooling, top-k, Hamming distances, the ladder), says it keeps; reproduces the full cache when the budget
covers everything; really holds fewer tokens under budget; computes what its eviction log says; and rejects bad
parameters clearly."""

import math

import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench.cache import compresskv, kvcrush
from workbench.cache.testing import assert_bytes_are_real, attend, fill, masked_dense_logits

NEW = ["compresskv", "kvcrush", "lacache"]
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 byte tokens on the tiny models
N, DIM, HEADS, KV_HEADS = 48, 64, 4, 2
GROUPS = HEADS // KV_HEADS


@pytest.fixture(scope="module")
def qk():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(KV_HEADS, N, DIM, generator=generator)
    queries = 3 * torch.randn(HEADS, N, DIM, generator=generator)  # peaked attention, so rankings are clear
    return queries, keys


def attention(queries, keys, rows):
    """Softmax attention (heads, len(rows), n) of the query rows, causal, each query head over its KV head's keys,
    scaled by 1/sqrt(d)."""
    n = keys.shape[1]
    scores = torch.einsum("hqd,hkd->hqk", queries[:, rows], keys.repeat_interleave(GROUPS, 0)) / math.sqrt(DIM)
    seen = torch.arange(n)[None] <= torch.arange(n)[rows][:, None]
    return torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)


def top(scores, k, among):
    """The k best of the positions `among` by `scores` (1-D), ascending; of equal scores the older wins."""
    among = torch.as_tensor(among)
    return sorted(among[torch.sort(scores[among], descending=True, stable=True).indices[:k]].tolist())


# -- CompressKV -----------------------------------------------------------------------------------------------------

def copied_context(ids, i, radius):
    """The positions around every earlier token j that the query at i copies: ids[j-1], ids[j] == ids[i], ids[i+1]
    (1 <= j <= i), with `radius` neighbours either side, none after i."""
    span = set()
    if i + 1 < len(ids):
        for j in range(1, i + 1):
            if ids[j - 1] == ids[i] and ids[j] == ids[i + 1]:
                span.update(k for k in range(j - radius, j + radius + 1) if 0 <= k <= i)
    return sorted(span)


def compresskv_expected(queries, keys, ids, heads, budget, window, kernel):
    """CompressKV's rule on one layer: the query heads paying the most attention to the context of what they copy
    vote SnapKV-style (window sums over the prefix, average pooling), the mean vote picks one token set."""
    n = keys.shape[1]
    probs = attention(queries, keys, slice(None))  # every row: the probe covers the whole prompt here
    if ids is None:
        chosen = list(range(HEADS))
    else:
        contexts = [copied_context(ids, i, kernel // 2) for i in range(n)]
        scores = torch.tensor([sum(float(probs[h, i, k]) for i in range(n) for k in contexts[i])
                               for h in range(HEADS)])
        chosen = torch.sort(scores, descending=True, stable=True).indices[:heads].tolist()
    votes = probs[chosen, n - window:].sum(1)
    votes[:, n - window:] = 0.0
    pooled = F.avg_pool1d(votes[:, None], kernel, stride=1, padding=kernel // 2)[:, 0].mean(0)
    return top(pooled, budget - window, range(n - window)) + list(range(n - window, n)), chosen


def test_compresskv_copy_contexts_by_hand():
    ids = torch.tensor([5, 7, 9, 5, 7, 9])
    spans = compresskv.copy_spans(ids, torch.tensor([2, 3, 4, 5]), radius=1)
    # query 3 (5, next 7) copies position 1; query 4 (7, next 9) copies 2; 2 and 5 copy nothing
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[1, [0, 1, 2]] = True
    expected[2, [1, 2, 3]] = True
    assert torch.equal(spans, expected)


@pytest.mark.parametrize("heads", [1, 2])
def test_compresskv_retrieval_heads_choose_one_token_set_for_the_layer(one_layer, qk, heads):
    queries, keys = qk
    ids = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(1)).tolist()  # many copies
    budget, window, kernel = 20, 8, 5
    expected, chosen = compresskv_expected(queries, keys, ids, heads, budget, window, kernel)
    everyone, _ = compresskv_expected(queries, keys, None, heads, budget, window, kernel)
    assert expected != everyone  # the retrieval heads' choice is not all heads' choice
    cache = wb.cache.get("compresskv", budget=budget, window=window, heads=heads, min_budget=8).build(one_layer)
    fill(cache, 0, keys, token_ids=ids)
    assert attend(cache, 0, queries) == [expected] * KV_HEADS  # every KV head keeps the same tokens
    assert len(chosen) == heads


def test_compresskv_without_copies_every_head_votes(one_layer, qk):
    queries, keys = qk
    expected, _ = compresskv_expected(queries, keys, None, 4, 20, 8, 5)
    for ids in (list(range(N)), None):  # distinct tokens copy nothing; no token ids at all
        cache = wb.cache.get("compresskv", budget=20, heads=1, min_budget=8).build(one_layer)
        fill(cache, 0, keys, token_ids=ids)
        assert attend(cache, 0, queries) == [expected] * KV_HEADS


def test_compresskv_allocation_by_hand():
    # 10 each, the 80 others by error share: 20 and 60 -> the second capped at 60, the 10 left to the first
    assert compresskv.allocate([1.0, 3.0], total=100, floor=10, cap=60) == [40, 60]
    # 10 + round(70 / 3) = 33 each: one token short, it goes to the largest error (ties: the first layer)
    assert compresskv.allocate([1.0, 1.0, 1.0], total=100, floor=10, cap=100) == [34, 33, 33]
    # round(5.5) = 6 (half to even, as numpy): one token over, it comes from the smallest error
    assert compresskv.allocate([1.0, 1.0], total=11, floor=0, cap=100) == [5, 6]
    assert compresskv.allocate([0.0, 0.0], total=40, floor=8, cap=100) == [20, 20]  # no error at all: equal


def window_error(queries, keys, values, window, budget):
    """||O_c - O|| / ||O|| of the window queries' attention output (all heads) when the layer keeps `budget`
    tokens: the window and the best of the others by the heads' mean window votes (no pooling)."""
    n = keys.shape[1]
    probs = attention(queries, keys, slice(n - window, n))
    votes = probs.sum(1)[:, :n - window].mean(0)
    kept = torch.zeros(n)
    kept[top(votes, budget - window, range(n - window)) + list(range(n - window, n))] = 1.0
    full_values = values.repeat_interleave(GROUPS, 0)
    full = probs @ full_values
    narrowed = probs * kept
    compressed = (narrowed / narrowed.sum(-1, keepdim=True)) @ full_values
    return float((compressed - full).norm() / (full.norm() + 1e-5)), votes


def test_compresskv_layer_budgets_follow_each_layers_eviction_error(tiny_llama):
    generator = torch.Generator().manual_seed(2)
    n, window, budget = 40, 4, 16
    keys = [torch.randn(2, n, 64, generator=generator) for _ in range(2)]
    values = [torch.randn(2, n, 64, generator=generator) for _ in range(2)]
    queries = [torch.randn(4, n, 64, generator=generator), 4 * torch.randn(4, n, 64, generator=generator)]
    cache = wb.cache.get("compresskv", budget=budget, window=window, kernel=1, min_budget=8).build(tiny_llama)
    for layer in (0, 1):
        fill(cache, layer, keys[layer], values[layer])
    attend(cache, 0, queries[0])
    assert cache.tokens_held()[0].tolist() == [32, 32]  # alone, layer 0 may take the whole 2 x 16 (cap 3 x 16)
    attend(cache, 1, queries[1])
    measured = [window_error(queries[i], keys[i], values[i], window, budget) for i in (0, 1)]
    errors = [e for e, _ in measured]
    assert errors[0] != pytest.approx(errors[1], rel=0.05)
    shares = [8 + round(e / sum(errors) * (32 - 2 * 8)) for e in errors]  # CompressKV's split, no cap reached
    held = cache.tokens_held()
    assert held[:, 0].tolist() == shares and sum(shares) == 32
    votes = measured[0][1]  # layer 0 shrank, in the cascade, to its share by its own votes
    expected = top(votes, shares[0] - window, range(n - window)) + list(range(n - window, n))
    assert [p.tolist() for p in cache.positions(0)] == [expected] * 2


# -- KVCrush --------------------------------------------------------------------------------------------------------

def test_kvcrush_signature_and_representatives_by_hand():
    per_head = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    selectable = torch.tensor([True, True, True, False])  # 3 selectable: each head marks its best 1
    assert kvcrush.signatures(per_head, selectable).int().tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]
    votes = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    distance = torch.tensor([0, 0, 2, 1, 1, 0])
    kept, representatives = kvcrush.select(votes, distance, torch.ones(6, dtype=torch.bool), pool=4, crush=0.5)
    # 2 best by vote (0, 1); the rest by (distance, slot): 5, 3, 4, 2; 2 representatives: the first and the last
    assert kept.tolist() == [0, 1] and representatives.tolist() == [5, 2]


ANCHOR = {"alternate": [0, 1, 0, 1], "zeros": [0, 0, 0, 0], "ones": [1, 1, 1, 1],
          "random": torch.randint(0, 2, (HEADS,), generator=torch.Generator().manual_seed(0)).tolist()}


@pytest.mark.parametrize("anchor", list(ANCHOR))
def test_kvcrush_keeps_the_base_selection_and_one_representative_per_group(one_layer, qk, anchor):
    queries, keys = qk
    budget, window, crush = 24, 8, 0.25
    probs = attention(queries, keys, slice(N - window, N))
    per_head = probs.sum(1)  # (heads, N): each query head's window attention
    votes = per_head.view(KV_HEADS, GROUPS, N).sum(1)  # the base (SnapKV) vote of each KV group
    selectable = list(range(N - window))
    bits = torch.zeros(HEADS, N, dtype=torch.bool)
    for head in range(HEADS):  # head-behaviour: the top half of the selectable tokens for that head
        bits[head, top(per_head[head], len(selectable) // 2, selectable)] = True
    distance = (bits != torch.tensor(ANCHOR[anchor], dtype=torch.bool)[:, None]).sum(0)
    pool = budget - window
    representatives = int(crush * pool)  # 4 of the 16 selectable slots
    expected, base_only = [], []
    for head in range(KV_HEADS):
        best = top(votes[head], pool - representatives, selectable)
        rest = sorted((t for t in selectable if t not in best), key=lambda t: (int(distance[t]), t))
        picks = [rest[i * (len(rest) - 1) // (representatives - 1)] for i in range(representatives)]
        expected.append(sorted(best + picks) + list(range(N - window, N)))
        base_only.append(top(votes[head], pool, selectable) + list(range(N - window, N)))
    cache = wb.cache.get("kvcrush", budget=budget, window=window, sinks=0, anchor=anchor).build(one_layer)
    fill(cache, 0, keys)
    assert attend(cache, 0, queries) == expected
    assert expected != base_only  # the representatives are not what the base would have kept


def test_kvcrush_without_a_crush_share_is_the_base_selection(one_layer, qk):
    queries, keys = qk
    votes = attention(queries, keys, slice(N - 8, N)).sum(1).view(KV_HEADS, GROUPS, N).sum(1)
    expected = [top(votes[h], 16, range(4, N - 8)) for h in range(KV_HEADS)]
    cache = wb.cache.get("kvcrush", budget=28, window=8, sinks=4, crush=0.0).build(one_layer)
    fill(cache, 0, keys)
    assert attend(cache, 0, queries) == [[0, 1, 2, 3] + h + list(range(N - 8, N)) for h in expected]


# -- LaCache --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers, span, overlap, expected", [
    (32, 16, 0, (2, 1, 1)),  # LaCache's default on 32 layers: every other token, alternating layers
    (32, 8, 0, (4, 1, 3)),  # B = 1 + ceil(24 / 8), A = ceil(8 / 8)
    (32, 8, 4, (7, 2, 5)),  # B = 1 + ceil(24 / 4), A = ceil(8 / 4)
    (24, 9, 7, (9, 5, 4)),  # B = 1 + ceil(15 / 2), A = ceil(9 / 2)
    (2, None, 0, (2, 1, 1)),  # span: half the layers
])
def test_lacache_ladder_shape(layers, span, overlap, expected):
    policy = wb.cache.get("lacache", span=span, overlap=overlap)
    assert policy.ladder(layers)[:3] == expected
    assert policy.ladder(layers)[3] == layers  # the window defaults to the number of layers


def ladder(prompt, steps, layers, budget, sinks, window, block, kept):
    """LaCache's ladder and iterative compaction on lists of positions: per layer, (the positions it holds at the
    end, {position: the step it was evicted at}). Step 0 is the prefill, step s feeds position prompt + s - 1."""
    freed = block - kept
    held = [[] for _ in range(layers)]
    cursor = [sinks] * layers
    evicted = [{} for _ in range(layers)]
    for step in range(steps + 1):
        new = list(range(prompt)) if step == 0 else [prompt + step - 1]
        for layer in range(layers):
            tokens = held[layer] + new
            while len(tokens) > budget:
                fits = (len(tokens) - window - cursor[layer]) // block
                blocks = min(-(-(len(tokens) - budget) // freed), fits)
                if blocks <= 0:  # the ladder reached the window: start over after the sinks
                    cursor[layer] = sinks
                    continue
                start, step_offset = cursor[layer], layer % (freed + 1)  # the layer's step on the ladder
                region = tokens[start:start + block * blocks]
                keep = [region[b * block + step_offset + k] for b in range(blocks) for k in range(kept)]
                for token in region:
                    if token not in keep:
                        evicted[layer][token] = step
                tokens = tokens[:start] + keep + tokens[start + block * blocks:]
                cursor[layer] = start + kept * blocks
            held[layer] = tokens
    return held, evicted


def test_lacache_ladder_by_hand(tiny_llama):
    # 2 layers, span 1: blocks of 2, layer 0 keeps the first of each and layer 1 the second
    cache = wb.cache.get("lacache", budget=6, sinks=1, window=1).build(tiny_llama)
    for layer in (0, 1):
        fill(cache, layer, torch.randn(2, 8, 64))
    held = [attend(cache, layer, torch.randn(4, 8, 64))[0] for layer in (0, 1)]
    assert held == [[0, 1, 3, 5, 6, 7], [0, 2, 4, 5, 6, 7]]  # blocks (1, 2) and (3, 4) compacted
    expected = [[[0, 1, 3, 5, 7, 8], [0, 2, 4, 6, 7, 8]],  # token 8: block (5, 6)
                [[0, 1, 3, 5, 7, 9], [0, 2, 4, 6, 8, 9]],  # token 9: block (7, 8)
                [[0, 1, 5, 7, 9, 10], [0, 4, 6, 8, 9, 10]]]  # token 10: no block fits: start over, (1, 3) / (2, 4)
    for step, want in enumerate(expected):
        for layer in (0, 1):
            fill(cache, layer, torch.randn(2, 1, 64))
        assert [attend(cache, layer, torch.randn(4, 1, 64)) for layer in (0, 1)] == [[w] * 2 for w in want], step
    simulated, _ = ladder(8, 3, 2, 6, 1, 1, 2, 1)
    assert simulated == expected[-1]


@pytest.mark.parametrize("layers, params, shape", [
    (2, {}, (2, 1)),  # span 1 of 2 layers: blocks of 2, each layer keeps one
    (4, {"span": 1, "window": 6, "sinks": 2}, (4, 1)),  # blocks of 4: layer l keeps the token at offset l
    (4, {"span": 2, "overlap": 1}, (3, 2)),  # blocks of 3: layers 0, 2 keep offsets 0-1, layers 1, 3 offsets 1-2
])
def test_lacache_iterative_compaction_over_a_long_generation(tiny_models, layers, params, shape):
    model = tiny_models["llama"] if layers == 2 else wb.tiny("llama", num_hidden_layers=layers)
    budget, steps = 40, 70
    run = wb.generate(model, PROMPT, cache=wb.cache.get("lacache", budget=budget, **params),
                      max_new_tokens=steps + 1, ignore_eos=True, record=["logits", "cache"])
    held = run.steps["cache_tokens"].values
    assert (held <= budget).all() and (held == budget).any()  # never over the budget, however long it runs
    prompt = len(run.prompt_ids)
    sinks, window = params.get("sinks", 4), params.get("window", layers)
    final, evicted = ladder(prompt, steps, layers, budget, sinks, window, *shape)
    log = run.steps["cache_evicted_at"].values[..., :prompt + steps]  # (layer, kv_head, position)
    for layer in range(layers):
        want = [evicted[layer].get(p, -1) for p in range(prompt + steps)]
        assert (log[layer] == want).all(), layer
    assert final[0] != final[1]  # the layers keep different tokens
    torch.testing.assert_close(torch.from_numpy(run.steps["logits"].values), masked_dense_logits(model, run),
                               atol=2e-4, rtol=1e-4)


# -- all three, end to end on the tiny models ------------------------------------------------------------------------

@pytest.mark.parametrize("name", NEW)
def test_under_budget_the_cache_really_holds_less(tiny_llama, name):
    budget = 40
    run = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get(name, budget=budget), max_new_tokens=6,
                      ignore_eos=True, record=["cache"])
    assert_bytes_are_real(tiny_llama, run.steps)
    held = run.steps["cache_tokens"].values  # (step, layer, kv_head)
    if name == "lacache":  # compacts while decoding: never above the budget
        assert (held <= budget).all() and (held[-1] == budget).all()
    elif name == "kvcrush":  # every head of every layer exactly at the budget, then it grows
        assert (held[0] == budget).all() and (held[-1] == budget + 5).all()
    else:  # the layers share budget x layers unevenly, then grow
        assert (held[0].sum(0) <= 2 * budget).all() and held[0, 0, 0] != held[0, 1, 0]
        assert (held[-1] == held[0] + 5).all()
    full_bytes = len(run.prompt_ids) * 2 * 2 * 2 * 64 * 4  # tokens x layers x K,V x KV heads x dim x float32
    assert run.held_cache_bytes < full_bytes / 2


@pytest.mark.parametrize("name", NEW)
def test_a_run_computes_what_its_eviction_log_says_on_a_sliding_window_model(tiny_models, name):
    model = tiny_models["gemma2"]
    run = wb.generate(model, PROMPT, cache=wb.cache.get(name, budget=40), max_new_tokens=12, ignore_eos=True,
                      record=["logits", "cache"])
    assert (run.steps["cache_evicted_at"] >= 0).any()
    torch.testing.assert_close(torch.from_numpy(run.steps["logits"].values), masked_dense_logits(model, run),
                               atol=2e-4, rtol=1e-4)


def test_bad_parameters_fail_clearly(tiny_llama):
    with pytest.raises(wb.ParameterError, match="'kernel' is 4; it must be odd"):
        wb.cache.get("compresskv", kernel=4)
    with pytest.raises(wb.ParameterError, match=r"min_budget 4 is smaller than sinks \+ window \(0 \+ 8\)"):
        wb.cache.get("compresskv", min_budget=4)
    with pytest.raises(wb.ParameterError, match="'compress' is 'both'; allowed: 'prefill'"):
        wb.cache.get("compresskv", compress="both")
    with pytest.raises(wb.ParameterError, match="compresskv' compresses the prompt once"):
        wb.cache.get("compresskv", compress_turns=True)
    with pytest.raises(wb.ParameterError, match="'max_scale' is 0.5; it must be >= 1.0"):
        wb.cache.get("compresskv", max_scale=0.5)
    with pytest.raises(wb.ParameterError, match="'crush' is 1.5; it must be <= 1.0"):
        wb.cache.get("kvcrush", crush=1.5)
    with pytest.raises(wb.ParameterError, match="'anchor' is 'mean'; allowed: 'alternate', 'random'"):
        wb.cache.get("kvcrush", anchor="mean")
    with pytest.raises(wb.ParameterError, match="kvcrush' groups the tokens of one prefill"):
        wb.cache.get("kvcrush", compress_turns=True)
    with pytest.raises(wb.ParameterError, match="budget 10 is smaller than sinks \\+ window"):
        wb.cache.get("kvcrush", budget=10)
    with pytest.raises(wb.ParameterError, match="overlap 4 must be smaller than span 4"):
        wb.cache.get("lacache", span=4, overlap=4)
    with pytest.raises(wb.ParameterError, match="span 2 with overlap 0 keeps every token in every one of the 2 "
                                                "layers"):
        wb.cache.get("lacache", span=2).build(tiny_llama)
    with pytest.raises(wb.ParameterError, match=r"budget 7 leaves no room for the ladder on this 2-layer model: it "
                                                r"must be >= sinks \+ window \+ one block of 2 tokens \(4 \+ 2 \+ 2\)"):
        wb.cache.get("lacache", budget=7).build(tiny_llama)


@pytest.mark.parametrize("name", NEW)
def test_speculative_decoding_keeps_what_token_by_token_decoding_keeps(name):
    """prompt_lookup drafts from the repeated prompt and verifies the drafts in provisional passes: the policies
    evict tentatively row by row (LaCache frees 2 tokens per block here, so some rows evict and some do not), and
    the run must keep and produce exactly what greedy decoding one token at a time does."""
    # span 2 of 5 layers: blocks of 3, one kept; 3 KV heads of 2 query heads each
    model = wb.tiny("llama", num_hidden_layers=5, hidden_size=192, num_attention_heads=6, num_key_value_heads=3)
    runs = [wb.generate(model, PROMPT, cache=wb.cache.get(name, budget=40), decoder=decoder, max_new_tokens=40,
                        ignore_eos=True, record=["cache"]) for decoder in ("greedy", "prompt_lookup")]
    assert "verify" in runs[1].steps["forward_phase"].values
    assert runs[0].token_ids == runs[1].token_ids
    fed = len(runs[0].prompt_ids) + 39
    logs = [run.steps["cache_evicted_at"].values[..., :fed] for run in runs]
    assert (logs[0] == logs[1]).all()
