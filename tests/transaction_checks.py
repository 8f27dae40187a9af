"""The transaction contract every cache policy keeps, as checks the policy tests run for their own policies
(tests/test_transactions.py for the eviction policies, the quantized, mixed-precision, fp8 and offload tests for
theirs): rollback restores exactly what was there, and a verify pass committed in part leaves the state that
feeding the accepted tokens one by one leaves. The references are independent runs: the same tokens fed one at a
time through a second session. `make` builds a fresh policy each time it is called."""

import pytest
import torch

import workbench as wb

PROMPT = "Rollbacks must restore every byte. " * 2  # 70 byte tokens on the tiny models
SMALL = dict(budget=24, sinks=2, window=4)
PARAMS = {  # every policy, set to act within a few steps (small budgets, selections that narrow)
    "full": {},
    "streaming_llm": SMALL, "h2o": SMALL, "snapkv": SMALL, "tova": SMALL, "knorm": SMALL, "pyramidkv": SMALL,
    "cake": dict(budget=24, window=4), "lazy_eviction": dict(SMALL, every=2), "razor_attention": SMALL,
    "kvmerger": SMALL, "d2o": SMALL,
    "mpcache": dict(SMALL, coarse=2, fine=2, top_coarse=1, top_fine=2),
    "sentence_kv": dict(SMALL, top_sentences=1),
    "h2o_prefill_only": dict(SMALL, compress="prefill"),
    "shadowkv": dict(budget=8, rank=8, outlier_chunks=1, local_chunks=2),  # 6 chunks of 8: 1 outlier, 1 of 5 read
}
MERGING = {"kvmerger", "d2o", "razor_attention"}  # merges cannot be tentative: they evict once at commit


def policy(name):
    return wb.cache.get("h2o" if name == "h2o_prefill_only" else name, **PARAMS[name])


def state_of(cache):
    """Everything a cache holds, per layer and head: the positions held, their keys, values and the policy's
    statistics, the layer's values, and the run's (budgets, positions)."""
    layers = []
    for layer in cache.layers:
        valid, positions = layer.valid(), layer.positions()
        heads = []
        for h in range(positions.shape[0]):
            slots = valid[h]
            heads.append({"positions": positions[h][slots].clone(), "keys": layer.held_keys()[h][slots].clone(),
                          "values": layer.held_values()[h][slots].clone(),
                          **{name: t[h, :len(slots)][slots].clone() for name, t in layer.store.extras.items()
                             if name != "hidden"}})
        state = dict(layer.state)
        if "clusters" in state:  # mpcache's per-head cluster indexes: compare what they hold
            state["clusters"] = [(c.labels, c.parents, c.coarse_centroids, c.fine_centroids) for c in state["clusters"]]
            state["index"] = dict(vars(state["index"]))
        layers.append({"heads": heads, "held": layer.held, "state": state})
    return {"layers": layers, "position": cache.position, "committed": cache.committed,
            "run": {k: v for k, v in cache.state.items() if k != "sentences"}}


def assert_same(a, b, exact=True, path="cache"):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        if exact or not a.is_floating_point():
            assert a.shape == b.shape and torch.equal(a, b), path
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=path, equal_nan=True)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], exact, f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, exact, f"{path}[{i}]")
    elif isinstance(a, float) and not exact:
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), path
    else:
        assert a == b, path


def greedy(session, logits, n):
    """n greedy tokens fed one by one; returns them."""
    tokens = []
    for _ in range(n):
        tokens.append(int(logits[-1].argmax()))
        logits = session.feed([tokens[-1]], "decode")
    return tokens


def check_rollback_restores_the_exact_state_at_any_mark(model, make):
    with wb.Session(model, make()) as session:
        greedy(session, session.feed(model.encode(PROMPT), "prefill"), 3)
        before = state_of(session.cache)
        mark = session.mark()
        session.feed([11, 12, 13, 14], "verify")  # a draft checked at once
        session.rollback(mark)
        assert_same(state_of(session.cache), before)
        session.feed([21], "rollout")  # a look-ahead, one token at a time
        inner, after_one = session.mark(), state_of(session.cache)
        session.feed([22], "rollout")
        session.feed([23, 24], "verify")
        session.rollback(inner)  # a mark inside the provisional tail
        assert_same(state_of(session.cache), after_one)
        session.rollback(mark)
        assert_same(state_of(session.cache), before)
        assert session.position == mark == session.committed


def check_a_verify_pass_committed_in_part_equals_one_by_one(model, make):
    """Each verify row sees what it would have seen one token at a time (per-row masks hide what the policy
    evicts after each row), so commit(j) leaves the state j decode passes leave; both then decode alike."""
    ids = model.encode(PROMPT)
    with wb.Session(model, make()) as scout:
        tokens = greedy(scout, scout.feed(ids, "prefill"), 8)
    with wb.Session(model, make()) as reference, wb.Session(model, make()) as verified:
        reference.feed(ids, "prefill")
        for token in tokens[:6]:
            expected = reference.feed([token], "decode")
        verified.feed(ids, "prefill")
        for token in tokens[:3]:
            verified.feed([token], "decode")
        rows = verified.feed(tokens[3:8], "verify")  # a draft of 5; the first 3 are accepted
        verified.commit(3)
        assert_same(state_of(verified.cache), state_of(reference.cache), exact=False)
        torch.testing.assert_close(rows[2:3], expected, atol=1e-4, rtol=1e-4)  # row 2 saw what token 5 saw
        for token in (5, 6, 9):  # and the two caches go on alike
            torch.testing.assert_close(verified.feed([token], "decode"), reference.feed([token], "decode"),
                                       atol=1e-4, rtol=1e-4)
