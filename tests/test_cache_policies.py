"""Eviction policies: each keeps what its paper's rule says on hand-built inputs, frees real memory, matches an
independent masked dense computation, and reproduces the full cache when the budget covers everything."""

import pytest
import torch

import workbench as wb
from workbench.attention.base import AttentionResult
from workbench.cache.testing import assert_bytes_are_real, attend, fill

POLICIES = ["streaming_llm", "h2o", "snapkv", "tova", "knorm", "pyramidkv"]
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 byte tokens on the tiny models


def filled_cache(model, policy, keys):
    cache = policy.build(model)
    fill(cache, 0, keys)
    return cache


def evict(cache, query, result=None):
    return attend(cache, 0, query, result)


def test_streaming_llm_keeps_sinks_and_the_most_recent(tiny_llama):
    cache = filled_cache(tiny_llama, wb.cache.get("streaming_llm", budget=6, sinks=2), torch.randn(2, 12, 64))
    kept = evict(cache, torch.randn(4, 12, 64))
    assert kept == [[0, 1, 8, 9, 10, 11]] * 2


def test_knorm_keeps_the_smallest_keys(tiny_llama):
    keys = torch.randn(2, 10, 64)
    norms = torch.tensor([[5, 1, 9, 2, 8, 3, 7, 4, 6, 0.5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10.0]])
    keys = keys / keys.norm(dim=-1, keepdim=True) * norms[..., None]
    cache = filled_cache(tiny_llama, wb.cache.get("knorm", budget=4, window=1, full_layers=""),
                         keys)
    kept = evict(cache, torch.randn(4, 10, 64))
    assert kept == [[1, 3, 5, 9], [0, 1, 2, 9]]  # head 0: norms 1, 2, 3 and the recent 9; head 1: 1, 2, 3 + recent


def attention_to(targets, n, heads=4, dim=64):
    """Keys and a last query such that the query attends (almost) only to `targets` (per KV head of 2)."""
    keys = torch.zeros(2, n, dim)
    query = torch.zeros(heads, n, dim)
    for kv_head, chosen in enumerate(targets):
        for slot in chosen:
            keys[kv_head, slot, slot] = 1.0
            query[2 * kv_head:2 * kv_head + 2, -1, slot] = 40.0
    return keys, query


def test_tova_keeps_what_the_last_query_attends_to_over_all_heads(tiny_llama):
    """TOVA's rule (Oren et al., Eq. 4): the last query's attention averaged over every head of the layer ranks the
    tokens; the layer keeps one set. Here the two KV groups attend to different tokens with different strength."""
    keys, query = attention_to([[2, 5], [0, 7]], n=10)
    query[2:, -1] *= 0.1  # the second group's heads attend more diffusely, to token 0 more than to token 7
    query[2:, -1, 7] *= 0.5
    cache = filled_cache(tiny_llama, wb.cache.get("tova", budget=3), keys)
    kept = evict(cache, query)
    scores = torch.einsum("hd,hkd->hk", query[:, -1], keys.repeat_interleave(2, 0)) / 8.0  # (heads, keys)
    expected = sorted(torch.softmax(scores, dim=-1).mean(0).topk(3).indices.tolist())
    assert kept == [expected, expected] and expected == [0, 2, 5]  # per group, head 1 would have kept 0 and 7


def test_snapkv_window_votes_and_pooling_keeps_neighbours(tiny_llama):
    keys, query = attention_to([[3], [6]], n=16)
    cache = filled_cache(tiny_llama, wb.cache.get("snapkv", budget=3, window=2, kernel=1), keys)
    assert evict(cache, query) == [[3, 14, 15], [6, 14, 15]]  # the voted token and the observation window
    cache = filled_cache(tiny_llama, wb.cache.get("snapkv", budget=5, window=2, kernel=3), keys)
    kept = evict(cache, query)
    assert kept == [[2, 3, 4, 14, 15], [5, 6, 7, 14, 15]]  # pooling keeps the voted token's neighbours too


def test_h2o_accumulates_attention_over_steps(tiny_llama):
    keys = torch.randn(2, 8, 64)
    cache = filled_cache(tiny_llama, wb.cache.get("h2o", budget=4, sinks=0, window=1), keys)
    mass = torch.zeros(1, 2, 8)
    mass[0, :, 1] = 3.0  # token 1 was the heavy hitter early on
    mass[0, :, 4] = 1.0
    mass[0, :, 6] = 2.0
    evict(cache, torch.randn(4, 8, 64), AttentionResult(torch.zeros(1), key_mass=mass))
    assert [p.tolist() for p in cache.positions(0)] == [[1, 4, 6, 7]] * 2
    # a decode step: token 8 arrives; now token 4 gets attention and token 6 none; 1 stays the heaviest
    fill(cache, 0, torch.randn(2, 1, 64))
    step = torch.tensor([[[0.0, 2.5, 0.0, 0.0, 0.5]] * 2])  # over slots holding positions 1, 4, 6, 7, 8
    evict(cache, torch.randn(4, 1, 64), AttentionResult(torch.zeros(1), key_mass=step))
    assert [p.tolist() for p in cache.positions(0)] == [[1, 4, 6, 8]] * 2  # 7 had the least in total
    layer = cache.layers[0]
    torch.testing.assert_close(layer.extra("attention")[0][layer.valid()[0]], torch.tensor([3.0, 3.5, 2.0, 0.5]))


def test_ragged_heads_attend_only_to_what_they_hold(tiny_llama):
    """Heads holding different tokens: attention through the cache's mask equals per-head dense attention
    over exactly the kept keys (computed head by head, independently)."""
    keys, values = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    cache = wb.cache.get("knorm", budget=4, sinks=0, window=0).build(tiny_llama)
    fill(cache, 0, keys, values)
    alive = torch.ones(2, 9, dtype=torch.bool)
    alive[0] = torch.isin(torch.arange(9), torch.tensor([0, 3, 5, 8]))  # head 0 keeps 4 tokens, head 1 all 9
    cache.layers[0].keep(alive, [4, 9])
    cache.end_pass()
    new_k, new_v = torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    fill(cache, 0, new_k, new_v)
    query = torch.randn(4, 1, 64)
    stored_k, stored_v = cache.layers[0].store.view()
    call = wb.attention.AttentionCall(0, query[None], stored_k, stored_v, None, 64 ** -0.5,
                                      wb.cache.testing.fake_module(0, 2), phase="decode", start=9)
    mask = cache.attention_mask(call, None)
    assert mask is not None and mask.shape == (1, 2, 1, 10)
    call.mask = mask.repeat_interleave(2, dim=1)
    output = wb.attention.get("sdpa").attend(call, frozenset()).output[0]  # (1, heads, dim)
    kept = {0: [0, 3, 5, 8, 9], 1: list(range(10))}  # positions; 9 is the new token
    all_k, all_v = torch.cat([keys, new_k], 1), torch.cat([values, new_v], 1)
    for head in range(4):
        kv = head // 2
        k, v = all_k[kv, kept[kv]], all_v[kv, kept[kv]]
        weights = torch.softmax(query[head] @ k.T / 8.0, dim=-1)
        torch.testing.assert_close(output[0, head], (weights @ v)[0], atol=1e-5, rtol=1e-5)


# What a policy needs, besides budget=400 where it has a budget, to keep and show every token of PROMPT
COVERING = {"mpcache": {"coarse": 4, "fine": 2, "top_coarse": 4, "top_fine": 8}, "sentence_kv": {"top_sentences": 100},
            "kivi": {"residual": 512}, "int_per_token": {"residual": 512},  # quantized: a residual covering it all
            "shadowkv": {"rank": 4096}}  # a rank above the key width: the SVD keeps the keys (up to rounding)
VARIANTS = [("epicache", {"block": 32, "level": "uniform"}), ("epicache", {"episodes": 3, "segment": 16, "block": 48}),
            ("elastic", {"nearest": "key"})]


def covering(name: str, extra: dict) -> wb.cache.CachePolicy:
    has_budget = any(spec.name == "budget" for spec in wb.cache.registry.component_class(name).parameters())
    return wb.cache.get(name, **({"budget": 400} if has_budget else {}), **COVERING.get(name, {}), **extra)


# every token is kept, but as float8 or low-bit codes from the first pass on (zipcache and kvquant quantize every
# committed token; xquant quantizes X, and even its full-precision residual rematerializes K and V through other
# float32 matmuls than the model's, ~1e-5 apart): no parameter makes them reproduce the full cache
LOSSY = {"fp8", "zipcache", "kvquant", "xquant"}


@pytest.mark.parametrize("name,extra", [(n, {}) for n in wb.cache.available() if n not in {"full", *LOSSY}] + VARIANTS)
def test_a_budget_covering_everything_reproduces_the_full_cache(tiny_models, name, extra):
    for family in ("llama", "qwen3_moe", "gemma2"):
        model = tiny_models[family]
        full = wb.generate(model, PROMPT, max_new_tokens=8, ignore_eos=True, record=["logits"])
        run = wb.generate(model, PROMPT, cache=covering(name, extra), max_new_tokens=8, ignore_eos=True,
                          record=["logits", "cache"])
        assert run.token_ids == full.token_ids
        torch.testing.assert_close(torch.from_numpy(run.steps["logits"].values),
                                   torch.from_numpy(full.steps["logits"].values), atol=1e-5, rtol=1e-5)
        assert (run.steps["cache_evicted_at"] == -1).all()


@pytest.mark.parametrize("name", POLICIES)
def test_under_budget_the_cache_really_holds_less(tiny_llama, name):
    budget = 48
    policy = wb.cache.get(name, budget=budget, **({"window": 8} if name in ("snapkv", "pyramidkv", "h2o") else {}),
                          **({"full_layers": ""} if name == "knorm" else {}))  # KNorm skips layers 0-1 by default
    run = wb.generate(tiny_llama, PROMPT, cache=policy, max_new_tokens=6, ignore_eos=True, record=["cache"])
    trace = run.steps
    text = tiny_llama.text_config
    bytes_per_token = 2 * text.head_dim * 4  # one KV head: K and V, float32
    held = trace["cache_tokens"].values  # (step, layer, kv_head)
    assert_bytes_are_real(tiny_llama, trace)
    if policy.compress == "prefill":
        assert held[0].mean() <= budget and held[-1].mean() <= budget + 5  # compressed once, then it grows
    else:
        assert (held <= budget).all() and (held[-1] == budget).any()
    assert run.held_cache_bytes < len(run.prompt_ids) * 2 * text.num_key_value_heads * bytes_per_token


def test_peak_bytes_count_the_uncompressed_prefill(tiny_llama):
    """A prefill-compressing policy holds each layer's whole prompt for a moment: on the two-layer model the peak is
    layer 0 compressed plus layer 1 uncompressed, while `held_cache_bytes` is both layers compressed."""
    full = wb.generate(tiny_llama, PROMPT, max_new_tokens=1, record=["cache"])
    snap = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get("snapkv", budget=40, window=8), max_new_tokens=1,
                       record=["cache"])
    full_layer = int(full.steps["cache_bytes"][0]) // 2  # the layers hold alike
    compressed_layer = int(snap.steps["cache_bytes"][0]) // 2
    assert compressed_layer < full_layer
    assert snap.held_cache_bytes == 2 * compressed_layer
    assert snap.peak_cache_bytes == compressed_layer + full_layer


def streaming_mask(n_prompt, total, budget, sinks):
    """Which keys each query sees under StreamingLLM with compression at prefill and decoding, built directly
    from the rule: prompt queries see their causal past; the query at position p >= n_prompt sees the sinks
    and the last budget - sinks positions before it, plus itself."""
    mask = torch.ones(total, total).tril().bool()
    for p in range(n_prompt, total):
        recent = budget - sinks
        visible = torch.zeros(total, dtype=torch.bool)
        visible[:sinks] = True
        visible[max(0, p - recent):p + 1] = True
        mask[p] &= visible
    return mask


def test_streaming_llm_matches_a_dense_masked_forward(tiny_llama):
    budget, sinks, steps = 40, 4, 30
    run = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get("streaming_llm", budget=budget, sinks=sinks,
                                                             positions="original"),
                      max_new_tokens=steps, ignore_eos=True, record=["logits"])
    ids = torch.tensor([run.prompt_ids + run.token_ids[:-1]])
    n_prompt, total = len(run.prompt_ids), ids.shape[1]
    mask = streaming_mask(n_prompt, total, budget, sinks)[None, None]
    with torch.inference_mode():
        logits = tiny_llama.hf(ids, attention_mask=mask).logits[0, n_prompt - 1:].float()
    torch.testing.assert_close(torch.from_numpy(run.steps["logits"].values), logits, atol=1e-4, rtol=1e-4)


def test_long_decoding_under_eviction_stays_consistent(tiny_llama):
    run = wb.generate(tiny_llama, "A", cache=wb.cache.get("h2o", budget=24, window=8, sinks=2),
                      max_new_tokens=150, ignore_eos=True, record=["cache"])
    assert len(run.token_ids) == 150
    alive = wb.trace.cache_alive(run.steps).isel(step=-1)
    assert (alive.sum("position") == 24).all()
    assert alive.isel(position=slice(0, 2)).all()  # sinks survive 150 steps
    cache_positions = alive.isel(layer=0, kv_head=0).values.nonzero()[0]
    assert (cache_positions[-8:] == range(len(run.prompt_ids) + 150 - 9, len(run.prompt_ids) + 149)).all()


@pytest.mark.embedded
def test_embedded_model_policies_run_and_converge(embedded):
    prompt = [{"role": "user", "content": "Remember the number 4721. " + "The grass is green. " * 40 +
               "What number did I ask you to remember?"}]
    full = wb.generate(embedded, prompt, max_new_tokens=8)
    for name in POLICIES:
        big = wb.generate(embedded, prompt, cache=wb.cache.get(name, budget=1024), max_new_tokens=8)
        assert big.token_ids == full.token_ids, name
        small = wb.generate(embedded, prompt, cache=wb.cache.get(name, budget=64, **(
            {"window": 16} if name in ("snapkv", "pyramidkv", "h2o") else {})), max_new_tokens=8, record=["cache"])
        assert small.held_cache_bytes < full.held_cache_bytes / 2, name


def test_hf_generate_uses_the_policy_inside_the_bridge(tiny_llama):
    ids = tiny_llama.encode(PROMPT)
    cache = wb.cache.get("h2o", budget=32, window=8).build(tiny_llama)
    with pytest.raises(wb.WorkbenchError, match="use workbench.generate or a workbench.run.Session, or run "
                                                "model.generate inside"):
        tiny_llama.hf.generate(ids, max_new_tokens=4, do_sample=False, cache=cache)
    cache = wb.cache.get("h2o", budget=32, window=8).build(tiny_llama)
    with wb.run.use_attention(tiny_llama, "sdpa", cache=cache):
        out = tiny_llama.hf.generate(ids, max_new_tokens=6, do_sample=False, cache=cache)
    ours = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get("h2o", budget=32, window=8), max_new_tokens=6)
    assert out[0, ids.shape[1]:].tolist() == ours.token_ids
    assert cache.tokens_held().max() == 32


def test_bad_budgets_fail_clearly():
    with pytest.raises(wb.ParameterError, match="'budget' is 0; it must be >= 1"):
        wb.cache.get("h2o", budget=0)
    with pytest.raises(wb.ParameterError, match=r"budget 16 is smaller than sinks \+ window \(4 \+ 32\)"):
        wb.cache.get("h2o", budget=16, sinks=4, window=32)
    with pytest.raises(wb.ParameterError, match="'compress' is 'never'; allowed: 'prefill', 'decode', 'both'"):
        wb.cache.get("tova", compress="never")
    with pytest.raises(wb.UnknownComponentError, match="unknown cache 'lru'; registered: .*snapkv, streaming_llm"):
        wb.cache.get("lru")


def test_ratio_budget_follows_the_prompt(tiny_llama):
    run = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get("knorm", ratio=0.25, window=4, full_layers=""),
                      max_new_tokens=3,
                      ignore_eos=True, record=["cache"])
    assert (run.steps["cache_tokens"].values[0] == -(-len(run.prompt_ids) // 4)).all()
