"""Sessions and transactional caches: rollback restores exactly what was there, a verify pass committed in part
leaves the state feeding the accepted tokens one by one leaves, and later chat turns are not prefills.

The references are independent runs: the same tokens fed one at a time through a second session."""

import pytest
import torch

import workbench as wb
from transaction_checks import (MERGING, PARAMS, PROMPT, check_a_verify_pass_committed_in_part_equals_one_by_one,
                                check_rollback_restores_the_exact_state_at_any_mark, greedy, policy)

KL_BOUND = {"kvmerger": 0.05, "d2o": 0.25, "razor_attention": 0.05}  # nats, on the tiny random model


@pytest.fixture
def model(tiny_models):
    return tiny_models["llama"]


@pytest.mark.parametrize("name", list(PARAMS))
def test_rollback_restores_the_exact_state_at_any_mark(model, name):
    check_rollback_restores_the_exact_state_at_any_mark(model, lambda: policy(name))


@pytest.mark.parametrize("name", sorted(set(PARAMS) - MERGING))
def test_a_verify_pass_committed_in_part_equals_feeding_the_accepted_tokens_one_by_one(model, name):
    check_a_verify_pass_committed_in_part_equals_one_by_one(model, lambda: policy(name))


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
