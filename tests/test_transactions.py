"""Sessions and transactional caches: rollback restores exactly what was there, a verify pass committed in part
leaves the state feeding the accepted tokens one by one leaves, and later chat turns are not prefills.

The references are independent runs: the same tokens fed one at a time through a second session."""

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
KL_BOUND = {"kvmerger": 0.05, "d2o": 0.25, "razor_attention": 0.05}  # nats, on the tiny random model


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


@pytest.fixture
def model(tiny_models):
    return tiny_models["llama"]


@pytest.mark.parametrize("name", list(PARAMS))
def test_rollback_restores_the_exact_state_at_any_mark(model, name):
    with wb.Session(model, policy(name)) as session:
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


@pytest.mark.parametrize("name", sorted(set(PARAMS) - MERGING))
def test_a_verify_pass_committed_in_part_equals_feeding_the_accepted_tokens_one_by_one(model, name):
    """Each verify row sees what it would have seen one token at a time (per-row masks hide what the policy
    evicts after each row), so commit(j) leaves the state j decode passes leave; both then decode alike."""
    ids = model.encode(PROMPT)
    with wb.Session(model, policy(name)) as scout:
        tokens = greedy(scout, scout.feed(ids, "prefill"), 8)
    with wb.Session(model, policy(name)) as reference, wb.Session(model, policy(name)) as verified:
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


@pytest.mark.parametrize("name", sorted(MERGING))
def test_merging_policies_evict_once_at_commit_and_the_difference_is_small(model, name):
    """Merges cannot be tentative, so a merging policy's verify rows see the cache before any of the pass's
    evictions, and the accepted rows are observed and evicted once at commit (see the policy's docstring). The
    cost: the next-token distributions afterwards differ from one-by-one feeding by a small KL."""
    ids = model.encode(PROMPT)
    kl = []
    with wb.Session(model, policy(name)) as verified, wb.Session(model, policy(name)) as reference:
        reference_logits = reference.feed(ids, "prefill")
        verified.feed(ids, "prefill")
        draft = greedy(reference, reference_logits, 4)  # the reference fed them one by one
        verified.feed(draft, "verify")
        verified.commit(4)
        assert verified.cache.tokens_held().tolist() == reference.cache.tokens_held().tolist()
        for token in (5, 6, 9, 10):
            p = torch.log_softmax(reference.feed([token], "decode")[-1], -1)
            q = torch.log_softmax(verified.feed([token], "decode")[-1], -1)
            kl.append(float((p.exp() * (p - q)).sum()))
    print(name, "KL(one by one || verify + commit) per step:", [round(k, 4) for k in kl])
    assert 0 < max(kl) < KL_BOUND[name], kl


def test_commit_refuses_what_is_not_provisional_and_committing_passes_wait_for_the_tail(model):
    with wb.Session(model, policy("h2o")) as session:
        session.feed(model.encode(PROMPT), "prefill")
        with pytest.raises(wb.WorkbenchError, match=r"commit takes how many of the 0 provisional tokens"):
            session.commit(1)
        session.feed([1, 2, 3], "verify")
        with pytest.raises(wb.WorkbenchError, match="3 provisional tokens are open: commit"):
            session.feed([4], "decode")
        with pytest.raises(wb.WorkbenchError, match="only the provisional tokens"):
            session.rollback(0)
        session.commit(0)
        assert session.position == session.committed == len(model.encode(PROMPT)[0])
        with pytest.raises(wb.WorkbenchError, match="a prefill must be the cache's first pass"):
            session.feed([1], "prefill")
        with pytest.raises(wb.WorkbenchError, match="unknown phase 'guess'"):
            session.feed([1], "guess")


def test_a_later_turn_does_not_recompress_the_first_under_a_prefill_only_policy(model):
    """SnapKV compresses the prompt once; an appended turn (many tokens at once) keeps it, unless asked to."""
    first, second = model.encode(PROMPT), model.encode(" And now a second question, please?")
    kept = {}
    for turns in (False, True):
        with wb.Session(model, wb.cache.get("snapkv", budget=24, window=4, compress_turns=turns)) as session:
            session.feed(first, "prefill")
            after_first = [p.tolist() for p in session.cache.positions(0)]
            session.feed(second, "append")
            kept[turns] = [p.tolist() for p in session.cache.positions(0)]
    n, m = first.shape[1], second.shape[1]
    appended = list(range(n, n + m))
    assert kept[False] == [p + appended for p in after_first]  # the first turn's 24 tokens, then the new turn
    assert all(len(p) == 24 for p in kept[True])  # compress_turns: every turn is compressed like the prompt


def test_the_phase_travels_to_the_cache_and_the_attention_variant(model):
    seen = []

    class Watch(wb.attention.SDPA):
        def attend(self, call, want):
            if call.layer == 0:
                seen.append((call.phase, call.start, call.num_queries))
            return super().attend(call, want)

    with wb.Session(model, "full", Watch()) as session:
        session.feed([1, 2, 3], "prefill")
        session.feed([4], "decode")
        session.feed([5, 6], "verify")
        session.commit(1)
        session.feed([7, 8], "append")
    assert seen == [("prefill", 0, 3), ("decode", 3, 1), ("verify", 4, 2), ("append", 5, 2)]


def test_a_speculative_step_in_one_verify_pass_is_lossless_under_greedy(model):
    """A decoder that feeds the pending token together with a draft as one verify pass, accepts the longest prefix
    greedy agrees with and commits it, produces exactly greedy's tokens, with fewer forward passes than tokens.
    The draft proposes greedy's own next tokens with every third one wrong (so both acceptance and rejection)."""
    prompt = "Rollbacks must restore every byte. " * 2
    prompt_length = model.encode(prompt).shape[1]

    class Drafting(wb.decode.Greedy):
        name = "drafting"

        def __init__(self, oracle):
            self.oracle = oracle

        def step(self, ctx):
            pending = ctx.take_pending()
            if not pending:  # the first step: the prefill's logits
                return super().step(ctx)
            done = ctx.session.position - prompt_length + 1  # tokens generated so far
            draft = [t if (done + i) % 3 else (t + 1) % 256 for i, t in enumerate(self.oracle[done:done + 3])]
            rows = ctx.session.feed(pending + draft, "verify")
            ctx.chose_from(rows[0])
            chosen = [int(rows[0].argmax())]
            for i, token in enumerate(draft):
                if chosen[-1] != token:
                    break
                chosen.append(int(rows[i + 1].argmax()))
            ctx.session.commit(len(chosen))  # the pending token and the accepted draft tokens
            return chosen

    for cache in ("full", wb.cache.get("h2o", budget=24, window=4)):
        greedy_run = wb.generate(model, prompt, cache=cache, max_new_tokens=40, ignore_eos=True)
        fast = wb.generate(model, prompt, cache=cache, decoder=Drafting(greedy_run.token_ids + [0] * 3),
                           max_new_tokens=24, ignore_eos=True, record=["entropy", "fidelity"])
        assert fast.token_ids == greedy_run.token_ids[:24]
        steps = fast.steps
        assert steps.sizes["step"] == 24 and steps.sizes["forward"] < 20  # drafts were accepted
        measured = steps["entropy"].values >= 0  # the first token of each step; NaN for accepted draft tokens
        assert measured.sum() == len(set(steps["forward_of_step"].values)) < 24
        if cache == "full":  # the measured steps are the dense model's own distributions
            assert (steps["kl_vs_dense"].values[measured] < 1e-4).all()
