"""Mixed-precision caches (`mikv`, `zipcache`): the full-precision tier is exactly what the wrapped eviction policy
keeps alone, the low tier holds the rest and decodes to what an independent quantizer gives, zipcache's salient
set is the top normalized attention computed from transformers' own eager attention, bytes are the tensors' sizes,
a budget covering everything reproduces the full cache, transactions restore both tiers exactly, and on the
embedded model keeping the dropped tokens at low precision is closer to the full cache than dropping them."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.cache.mixed_precision_store import QuantizedPool, tokens_for_bytes

from transaction_checks import (assert_same, check_a_verify_pass_committed_in_part_equals_one_by_one,
                                check_rollback_restores_the_exact_state_at_any_mark, greedy)

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 byte tokens on the tiny models


# -- an independent quantizer: numpy, channel balancer then per-token groups, bytes packed with integer arithmetic --
def reference_balancer(x: np.ndarray) -> np.ndarray:
    """(heads, 1, D) float16: sqrt(max |x|) per channel over the tokens (1 where a channel is all zero)."""
    peak = np.abs(x.astype(np.float32)).max(axis=1, keepdims=True)
    return np.maximum(np.where(peak > 0, np.sqrt(peak), 1.0), 1e-3).astype(np.float16)


def reference_roundtrip(x: np.ndarray, bits: int, group: int, balancer: np.ndarray | None):
    """(packed codes, x_hat) of x (heads, T, D): x / balancer quantized per token over groups of channels."""
    heads, tokens, dim = x.shape
    y = x.astype(np.float32) / balancer.astype(np.float32) if balancer is not None else x.astype(np.float32)
    levels = 2 ** bits - 1
    code = np.zeros(x.shape, np.int64)
    x_hat = np.zeros(x.shape, np.float32)
    for h in range(heads):
        for t in range(tokens):
            for g in range(dim // group):
                part = slice(g * group, (g + 1) * group)
                values = y[h, t, part]
                scale = np.float16((values.max() - values.min()) / np.float32(levels))
                zero = np.float16(values.min())
                if scale == 0:
                    code[h, t, part] = 0
                else:
                    code[h, t, part] = np.clip(np.rint((values - np.float32(zero)) / np.float32(scale)), 0, levels)
                x_hat[h, t, part] = code[h, t, part] * np.float32(scale) + np.float32(zero)
    if balancer is not None:
        x_hat = x_hat * balancer.astype(np.float32)
    per_byte = 8 // bits
    packed = np.zeros((heads, tokens, dim // per_byte), np.uint8)
    for c in range(dim):
        packed[..., c // per_byte] += (code[..., c] << ((c % per_byte) * bits)).astype(np.uint8)
    return packed, x_hat


@pytest.mark.parametrize("bits,group,balance", [(2, 64, True), (2, 16, False), (4, 32, True), (8, 64, True)])
def test_a_pool_decodes_to_what_an_independent_quantizer_gives(bits, group, balance):
    torch.manual_seed(bits + group)
    keys = torch.randn(2, 12, 64) * torch.linspace(0.05, 6, 64)  # channels of very different ranges (outliers)
    values = torch.randn(2, 12, 64)
    pool = QuantizedPool(bits, group, balance)
    valid = torch.ones(2, 12, dtype=torch.bool)
    balancer = pool.balancers(keys, values, valid)
    counts = [7, 4]  # heads keep different numbers: ragged
    pool.add(keys[:, :7], values[:, :7], torch.arange(7).repeat(2, 1) * 3, counts, balancer)
    pool.add(keys[:, 7:], values[:, 7:], torch.arange(5).repeat(2, 1) + 100, [5, 5], pool.balancer)
    got_keys, got_values, positions = pool.view(torch.float32)
    for side, x, got in (("keys", keys, got_keys), ("values", values, got_values)):
        ref_balancer = reference_balancer(x.numpy()) if balance else None
        if balance:
            assert np.array_equal(pool.balancer[side].numpy(), ref_balancer)
        packed, x_hat = reference_roundtrip(x.numpy(), bits, group, ref_balancer)
        for h, kept in enumerate(([*range(7), *range(7, 12)], [*range(4), *range(7, 12)])):
            n = len(kept)
            assert np.array_equal(pool.codes[side][h, :n].numpy(), packed[h, kept])
            np.testing.assert_allclose(got[h, :n].numpy(), x_hat[h, kept], rtol=1e-5, atol=1e-5)
    assert positions[0].tolist() == [0, 3, 6, 9, 12, 15, 18, 100, 101, 102, 103, 104]
    assert positions[1].tolist() == [0, 3, 6, 9, 100, 101, 102, 103, 104, -1, -1, -1]  # padding: -1


def test_balancing_helps_keys_with_outlier_channels():
    torch.manual_seed(0)
    keys = torch.randn(1, 64, 64)
    keys[..., 3] *= 30  # one outlier channel, as real keys have
    errors = {}
    for balance in (True, False):
        pool = QuantizedPool(2, 64, balance)
        pool.add(keys, keys, torch.arange(64)[None], [64], pool.balancers(keys, keys, torch.ones(1, 64, dtype=bool)))
        errors[balance] = float((pool.view(torch.float32)[0] - keys)[..., [c for c in range(64) if c != 3]].norm())
    assert errors[True] < 0.8 * errors[False]


# -- mikv on a model ---------------------------------------------------------------------------------------------------
def pooled_positions(store, pool="low"):
    return [set(row[row >= 0].tolist()) for row in store.pools[pool].view(torch.float32)[2]]


@pytest.mark.parametrize("selector,params", [("h2o", dict(window=8)), ("snapkv", dict(window=8))])
def test_the_full_precision_tier_is_what_the_wrapped_policy_keeps_alone(tiny_llama, selector, params):
    ids = tiny_llama.encode(PROMPT)
    options = ",".join(f"{k}={v}" for k, v in params.items())
    with wb.Session(tiny_llama, wb.cache.get("mikv", policy=selector, budget=32, options=options)) as mixed, \
            wb.Session(tiny_llama, wb.cache.get(selector, budget=32, **params)) as plain:
        mixed.feed(ids, "prefill")
        plain.feed(ids, "prefill")
        for layer in range(tiny_llama.num_layers):
            store = mixed.cache.layers[layer].store
            for head, (high, alone) in enumerate(zip(mixed.cache.positions(layer), plain.cache.positions(layer))):
                assert torch.equal(high, alone)
                assert pooled_positions(store)[head] == set(range(ids.shape[1])) - set(alone.tolist())
        for step in range(6):  # decoding: no token is ever lost, none held twice
            mixed.feed([5 + step], "decode")
            for layer in range(tiny_llama.num_layers):
                store = mixed.cache.layers[layer].store
                for head, high in enumerate(mixed.cache.positions(layer)):
                    low = pooled_positions(store)[head]
                    grows = step + 1 if selector == "snapkv" else 0  # snapkv compresses the prompt only
                    assert len(high) <= 32 + grows and not (set(high.tolist()) & low)
                    assert set(high.tolist()) | low == set(range(mixed.position))


def test_the_low_tier_holds_the_prompt_quantized_as_an_independent_quantizer_does(tiny_llama):
    ids = tiny_llama.encode(PROMPT)
    with wb.Session(tiny_llama, wb.cache.get("mikv", budget=32, bits=2, group=16)) as mixed, \
            wb.Session(tiny_llama, "full") as full:
        mixed.feed(ids, "prefill")
        full.feed(ids, "prefill")
        for layer in range(tiny_llama.num_layers):
            store = mixed.cache.layers[layer].store
            keys, values, positions = store.pools["low"].view(torch.float32)
            truth = full.cache.layers[layer]  # the full cache: slot i holds position i
            for side, x, got in (("keys", truth.held_keys(), keys), ("values", truth.held_values(), values)):
                x = x.numpy()
                balancer = reference_balancer(x)  # from every prompt token: what the store held at the first move
                _, x_hat = reference_roundtrip(x, 2, 16, balancer)
                for head in range(x.shape[0]):
                    held = positions[head][positions[head] >= 0].numpy()
                    np.testing.assert_allclose(got[head, :len(held)].numpy(), x_hat[head, held], rtol=1e-5, atol=1e-5)


def test_bytes_are_the_tensors_sizes_and_below_the_full_cache(tiny_llama):
    ids = tiny_llama.encode(PROMPT)
    with wb.Session(tiny_llama, wb.cache.get("mikv", budget=32)) as mixed, wb.Session(tiny_llama, "full") as full:
        mixed.feed(ids, "prefill")
        full.feed(ids, "prefill")
        for _ in range(3):
            mixed.feed([7], "decode")
            full.feed([7], "decode")
        total = 0
        for layer in mixed.cache.layers:
            store = layer.store
            pool = store.pools["low"]
            tensors = [store.keys, store.values, pool.positions, *pool.codes.values(), *pool.scale.values(),
                       *pool.zero.values(), *pool.balancer.values()]
            total += sum(t.numel() * t.element_size() for t in tensors)
        parts = mixed.cache.nbytes_by_component()
        assert mixed.cache.nbytes() == total == sum(parts.values())
        assert set(parts) == {"high", "low_codes", "low_scales", "low_zeros", "low_balancers", "low_positions"}
        tokens = mixed.position  # every token is held: 2-bit codes of both sides, D = 64
        low_tokens = [tokens - n for n in mixed.cache.layers[0].held]
        assert parts["low_codes"] >= 2 * sum(low_tokens) * 64 * 2 // 8 * tiny_llama.num_layers
        print(f"mikv {mixed.cache.nbytes()} bytes vs full {full.cache.nbytes()}: {parts}")
        assert mixed.cache.nbytes() < 0.6 * full.cache.nbytes()


@pytest.mark.parametrize("params", [dict(budget=512), dict(policy="snapkv", budget=512)])
def test_a_budget_covering_everything_reproduces_the_full_cache(tiny_models, params):
    for family in ("llama", "qwen3_moe"):
        model = tiny_models[family]
        full = wb.generate(model, PROMPT, max_new_tokens=8, ignore_eos=True, record=["logits"])
        run = wb.generate(model, PROMPT, cache=wb.cache.get("mikv", **params), max_new_tokens=8, ignore_eos=True,
                          record=["logits"])
        assert run.token_ids == full.token_ids
        torch.testing.assert_close(torch.from_numpy(run.steps["logits"].values),
                                   torch.from_numpy(full.steps["logits"].values), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,params", [("mikv", dict(budget=32, bits=8, group=16)),
                                         ("zipcache", dict(high_bits=8, low_bits=8, gap=3, group=16))])
def test_at_8_bits_the_low_tier_is_nearly_the_full_cache(tiny_llama, name, params):
    """Every token kept, the dropped (mikv) or all (zipcache) at 8 bits: each step's distribution is within a
    small KL of the full cache's (teacher-forced: greedy tokens of a random model flip on tiny differences)."""
    ids = tiny_llama.encode(PROMPT)
    with wb.Session(tiny_llama, wb.cache.get(name, **params)) as mixed, wb.Session(tiny_llama, "full") as full:
        pairs = [(mixed.feed(ids, "prefill")[-1], full.feed(ids, "prefill")[-1])]
        for token in (5, 6, 7, 8, 9, 10, 11):
            pairs.append((mixed.feed([token], "decode")[-1], full.feed([token], "decode")[-1]))
        assert sum(layer.store.pooled_tokens() for layer in mixed.cache.layers) > 0
    for ours, reference in pairs:
        p, q = torch.log_softmax(reference, -1), torch.log_softmax(ours, -1)
        assert float((p.exp() * (p - q)).sum()) < 0.03  # dropping them: ~1 nat here


def test_a_byte_budget_sets_the_full_precision_count(tiny_llama):
    ids = tiny_llama.encode(PROMPT)
    n, layers, heads = ids.shape[1], tiny_llama.num_layers, tiny_llama.num_kv_heads
    budget = 60_000
    high, low, balancers = 2 * 64 * 4, 2 * (64 * 2 // 8 + 2 * 2) + 4, 2 * 64 * 2  # float32 tokens; 2-bit, group 64
    expected = math.floor((budget / (layers * heads) - balancers - n * low) / (high - low))
    with wb.Session(tiny_llama, wb.cache.get("mikv", budget_bytes=budget, bits=2, options="window=4")) as session:
        session.feed(ids, "prefill")
        assert session.cache.state["high_tokens"] == expected == 18
        assert session.cache.layers[0].held == [expected] * heads
        held = (expected * high + (n - expected) * low + balancers) * heads * layers
        spare = sum((layer.store.capacity - expected) * heads * high for layer in session.cache.layers)  # slack
        assert held <= budget and session.cache.nbytes() - spare == held
        print(f"budget {budget}: {expected} full-precision tokens per head, cache {session.cache.nbytes()} bytes")
    plain = tokens_for_bytes(tiny_llama, budget)
    assert plain == budget // (layers * heads * high) == 29
    assert tokens_for_bytes(tiny_llama, budget, bits=2, group=64) == budget // (layers * heads * 40)


def test_bad_parameters_fail_clearly(tiny_llama):
    with pytest.raises(wb.ParameterError, match=r"'policy' is 'kivi'; it wraps a registered eviction policy: .*h2o"):
        wb.cache.get("mikv", policy="kivi")
    with pytest.raises(wb.ParameterError, match="it wraps a registered eviction policy") as error:
        wb.cache.get("mikv", policy="kvmerger")  # merges: its dropped entries are folded, not kept
    assert "snapkv" in str(error.value) and "kvmerger" not in str(error.value).split(":")[-1]
    with pytest.raises(wb.ParameterError, match="expected comma-separated name=value pairs"):
        wb.cache.get("mikv", options="window")
    with pytest.raises(wb.ParameterError, match="give 'budget' as mikv's own parameter"):
        wb.cache.get("mikv", options="budget=3")
    with pytest.raises(wb.ParameterError, match="cache 'h2o' has no parameter 'windows'"):
        wb.cache.get("mikv", options="windows=3")
    with pytest.raises(wb.ParameterError, match="'bits' is 3; allowed: 2, 4, 8"):
        wb.cache.get("mikv", bits=3)
    with pytest.raises(wb.ParameterError, match="'group' is 48: it must divide the model's head dimension 64"):
        wb.cache.get("mikv", group=48).build(tiny_llama)
    with pytest.raises(wb.ParameterError, match="high_bits \\(2\\) must be at least low_bits \\(4\\)"):
        wb.cache.get("zipcache", high_bits=2, low_bits=4)
    with pytest.raises(wb.ParameterError, match="'salient_ratio' is 1.5; it must be <= 1.0"):
        wb.cache.get("zipcache", salient_ratio=1.5)


# -- zipcache ----------------------------------------------------------------------------------------------------------
def eager_attentions(model, ids):
    """Per layer (heads, L, L): transformers' own eager attention probabilities over the prompt."""
    hf = model.hf
    previous = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = hf(ids, output_attentions=True, use_cache=False)
    finally:
        hf.set_attn_implementation(previous)
    return [a[0].float() for a in out.attentions]


def test_zipcache_salient_tokens_are_the_top_normalized_attention(tiny_llama):
    ids = tiny_llama.encode(PROMPT)
    n, groups = ids.shape[1], tiny_llama.num_heads // tiny_llama.num_kv_heads
    attentions = eager_attentions(tiny_llama, ids)
    with wb.Session(tiny_llama, wb.cache.get("zipcache", salient_ratio=0.3)) as session:
        session.feed(ids, "prefill")
        for layer, probs in enumerate(attentions):
            store = session.cache.layers[layer].store
            assert store.lengths == [0] * tiny_llama.num_kv_heads  # every prompt token quantized
            received = probs.reshape(tiny_llama.num_kv_heads, groups, n, n).sum(dim=(1, 2))  # summed over queries
            normalized = received / (n - torch.arange(n)).float()  # token p is seen by the queries p..n-1
            summed_top = None
            for head in range(tiny_llama.num_kv_heads):
                top = n - int(0.7 * n)
                expected = set(torch.topk(normalized[head], top).indices.tolist())
                assert pooled_positions(store, "high")[head] == expected
                assert pooled_positions(store, "low")[head] == set(range(n)) - expected
                summed_top = set(torch.topk(received[head], top).indices.tolist())
            assert summed_top != expected  # normalizing really changes the choice (summed favours early tokens)


def test_zipcache_quantizes_decoded_tokens_every_gap(tiny_llama):
    ids = tiny_llama.encode(PROMPT)
    with wb.Session(tiny_llama, wb.cache.get("zipcache", gap=4)) as session:
        session.feed(ids, "prefill")
        store = session.cache.layers[0].store
        sizes = []
        for step in range(9):
            session.feed([3 + step], "decode")
            sizes.append((store.lengths[0], store.pools["high"].lengths[0] + store.pools["low"].lengths[0]))
        n = ids.shape[1]
        assert sizes == [(1, n), (2, n), (3, n), (0, n + 4), (1, n + 4), (2, n + 4), (3, n + 4), (0, n + 8),
                         (1, n + 8)]
        assert store.pools["high"].lengths[0] == (n - int(0.4 * n)) + 2 * (4 - int(0.4 * 4))


# -- transactions: the core transaction tests, run for the mixed-precision policies ----------------------------------
POLICIES = {"mikv_h2o": ("mikv", dict(budget=24, options="sinks=2,window=4")),
            "mikv_snapkv": ("mikv", dict(policy="snapkv", budget=24, options="sinks=2,window=4")),
            "mikv_tova": ("mikv", dict(policy="tova", budget=24, options="sinks=2,window=4", bits=4)),
            "zipcache": ("zipcache", dict(gap=2)),
            "zipcache_waiting": ("zipcache", dict(gap=100))}


def policy(name):
    registered, params = POLICIES[name]
    return wb.cache.get(registered, **params)


def pool_state(cache):
    """Every pool of every layer, per head sorted by position: positions and dequantized keys and values."""
    out = []
    for layer in cache.layers:
        for pool in layer.store.pools.values():
            if not pool.tokens:
                out.append([])
                continue
            keys, values, positions = pool.view(torch.float32)
            heads = []
            for h in range(positions.shape[0]):
                order = positions[h].masked_fill(positions[h] < 0, 1 << 40).argsort()[:pool.lengths[h]]
                heads.append([positions[h][order].clone(), keys[h][order].clone(), values[h][order].clone()])
            out.append(heads)
    return out


@pytest.fixture
def model(tiny_models):
    return tiny_models["llama"]


@pytest.mark.parametrize("name", list(POLICIES))
def test_rollback_restores_the_exact_state_at_any_mark(model, name):
    check_rollback_restores_the_exact_state_at_any_mark(model, lambda: policy(name))
    with wb.Session(model, policy(name)) as session:  # and every pooled tensor is as it was
        greedy(session, session.feed(model.encode(PROMPT), "prefill"), 3)
        before, mark = pool_state(session.cache), session.mark()
        session.feed([11, 12, 13, 14, 15, 16, 17], "verify")
        session.feed([30], "rollout")
        session.rollback(mark)
        assert_same(pool_state(session.cache), before)
        assert session.cache.nbytes() > 0


@pytest.mark.parametrize("name", ["mikv_h2o", "mikv_snapkv", "mikv_tova", "zipcache_waiting"])
def test_a_verify_pass_committed_in_part_equals_feeding_the_accepted_tokens_one_by_one(model, name):
    """Rows of a verify pass see what one-by-one decoding sees: what an earlier row evicted, at low precision."""
    check_a_verify_pass_committed_in_part_equals_one_by_one(model, lambda: policy(name))
    ids = model.encode(PROMPT)
    with wb.Session(model, policy(name)) as reference, wb.Session(model, policy(name)) as verified:
        reference.feed(ids, "prefill")
        verified.feed(ids, "prefill")
        for token in (4, 5, 6):
            reference.feed([token], "decode")
        verified.feed([4, 5, 6, 7], "verify")
        verified.commit(3)
        assert_same(pool_state(verified.cache), pool_state(reference.cache), exact=False)


def test_a_tree_of_drafts_is_refused_rather_than_pooling_dropped_branches(model):
    """mikv acts while decoding (even over a prefill-only selector): a tree's rejected branches are never committed
    tokens, so they must not reach the low tier; trees and commits of a path are refused."""
    from workbench.decode.tree import CandidateTree

    tree = CandidateTree.of([(0,), (1,), (0, 0)], heads=2)
    with wb.Session(model, policy("mikv_snapkv")) as session:
        session.feed(model.encode(PROMPT), "prefill")
        with pytest.raises(wb.WorkbenchError, match="cannot verify a tree"):
            session.feed([21, 22, 23, 24], "verify", tree=tree)
        session.feed([21, 22, 23], "verify")
        with pytest.raises(wb.WorkbenchError, match="can keep only a prefix"):
            session.commit(2, rows=[0, 2])


# -- the embedded model: quality at equal token budget and at equal bytes ---------------------------------------------
@pytest.mark.embedded
def test_keeping_dropped_tokens_at_low_precision_beats_dropping_them(embedded):
    text = (Path(__file__).parents[1] / "datasets" / "harbor_town.txt").read_text().split("\n", 1)[1]
    ids = embedded.tokenizer(text)["input_ids"][:272]
    prompt, continuation = ids[:256], ids[256:272]

    def run(cache):
        """Next-token log-probabilities over a teacher-forced continuation, and the bytes after the prefill."""
        with wb.Session(embedded, cache) as session:
            rows = [session.feed(prompt, "prefill")[-1]]
            held = session.cache.nbytes()
            for token in continuation[:-1]:
                rows.append(session.feed([token], "decode")[-1])
        return torch.log_softmax(torch.stack(rows).float(), -1), held

    full, full_bytes = run("full")
    target = torch.tensor(continuation)

    def measure(label, cache):
        logp, held = run(cache)
        kl = float((full.exp() * (full - logp)).sum(-1).mean())
        ppl = math.exp(float(-logp[torch.arange(len(target)), target].mean()))
        print(f"{label:<34} KL {kl:.4f} nats  ppl {ppl:7.3f}  bytes {held:>9} ({held / full_bytes:.3f} of full)")
        return kl, held

    print(f"\n{'full':<34} ppl {math.exp(float(-full[torch.arange(len(target)), target].mean())):7.3f}  "
          f"bytes {full_bytes:>9}")
    h2o, h2o_bytes = measure("h2o budget 48", wb.cache.get("h2o", budget=48))
    mikv4, _ = measure("mikv(h2o) budget 48, 4-bit", wb.cache.get("mikv", budget=48, bits=4))
    assert mikv4 < 0.5 * h2o  # the same full-precision tokens: keeping the rest at 4 bits helps a lot
    # (2-bit per-token codes with the simplified balancer are not asserted: at a whole-head group they lose to
    # dropping the tokens on this model; with group 16 they are about even)
    budget = int(0.25 * full_bytes)  # equal memory: a quarter of the full cache
    plain, plain_bytes = measure(f"h2o at {budget} B", wb.cache.get("h2o", budget=tokens_for_bytes(embedded, budget)))
    mixed, mixed_bytes = measure(f"mikv(h2o) 4-bit at {budget} B", wb.cache.get("mikv", budget_bytes=budget, bits=4))
    zipped, zipped_bytes = measure(f"zipcache at {budget} B", wb.cache.get("zipcache", budget_bytes=budget))
    spare = embedded.num_layers * embedded.num_kv_heads * 8 * 2 * 64 * 4  # 8 slack slots per head, float32 K+V
    for held in (plain_bytes, mixed_bytes, zipped_bytes):
        assert held <= budget + spare  # the byte budget, full-precision buffer slack aside
    assert mixed_bytes <= 1.01 * plain_bytes and mixed < 0.5 * plain  # equal memory: mixed precision wins
