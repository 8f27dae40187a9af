"""Beam search against transformers' own `generate(num_beams=...)` (eos reached or not, every early_stopping
rule, length penalties, ignore_eos), against a beam search written here over fresh sessions under an evicting
cache, and `Session.fork` against a session fed the same tokens from scratch; bad parameters are refused."""

import pytest
import torch
import transformers

import workbench as wb
from workbench.errors import ParameterError, WorkbenchError
from workbench.run.session import Session

PROMPT = "The quick brown fox"
# 40 eos ids for the seed-1 tiny llama: hypotheses finish often, so the three early_stopping rules disagree
MANY_EOS = [3, 6, 47, 49, 50, 58, 60, 61, 75, 81, 82, 92, 97, 107, 114, 129, 144, 153, 155, 157, 177, 184, 193, 207,
            218, 220, 224, 231, 232, 235, 239, 244, 250, 257, 270, 282, 288, 313, 314, 319]


@pytest.fixture(scope="module")
def llama():
    return wb.tiny("llama")


@pytest.fixture(scope="module")
def many_eos():
    return wb.tiny("llama", seed=1, eos_token_id=MANY_EOS)


def hf_beam(model, n, max_new_tokens, eos, **kw):
    """transformers' beam search: the new tokens of its best sequence."""
    ids = model.encode(PROMPT)
    with torch.no_grad():
        out = model.hf.generate(ids, attention_mask=torch.ones_like(ids), num_beams=n, do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=eos, **kw)
    return out[0, ids.shape[1]:].tolist()


def beam(model, n, max_new_tokens, ignore_eos=False, cache="full", **kw):
    return wb.generate(model, PROMPT, decoder=wb.decode.get("beam", num_beams=n, **kw), cache=cache,
                       max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)


@pytest.fixture(autouse=True, scope="module")
def quiet():
    transformers.logging.set_verbosity_error()  # generate's note that num_beams=1 ignores length_penalty
    yield
    transformers.logging.set_verbosity_warning()


# -- against transformers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,lp,early", [(4, 1.0, False), (3, 1.0, False), (4, 2.0, True), (5, -1.0, "never")])
def test_equals_transformers(llama, n, lp, early):
    run = beam(llama, n, 12, length_penalty=lp, early_stopping=early)
    expected = hf_beam(llama, n, 12, 2, length_penalty=lp, early_stopping=early)
    assert run.token_ids == expected
    assert run.finish_reason == ("eos" if expected[-1] == 2 else "length")


def test_reaches_eos_and_differs_from_greedy(llama):
    # the (4, 1.0, False) case above: its output ends at eos 2, which greedy never emits
    run = beam(llama, 4, 12)
    assert run.token_ids[-1] == 2 and len(run.token_ids) < 12 and run.finish_reason == "eos"
    greedy = wb.generate(llama, PROMPT, max_new_tokens=12).token_ids
    assert 2 not in greedy and run.token_ids != greedy[:len(run.token_ids)]


@pytest.fixture(scope="module")
def rules(many_eos):
    """transformers' output under each early_stopping rule."""
    return {early: hf_beam(many_eos, 3, 20, MANY_EOS, early_stopping=early) for early in (False, True, "never")}


def test_the_three_rules_differ_here(rules):
    assert len({str(tokens) for tokens in rules.values()}) == 3  # else the test below would not tell them apart


@pytest.mark.parametrize("early", [False, True, "never"])
def test_early_stopping_rules_equal_transformers(many_eos, rules, early):
    assert beam(many_eos, 3, 20, early_stopping=early).token_ids == rules[early]


def test_ignore_eos_equals_transformers_without_eos(llama):
    no_eos = wb.tiny("llama", eos_token_id=None)  # the same weights, no end-of-sequence id
    expected = hf_beam(no_eos, 4, 12, None)
    run = beam(llama, 4, 12, ignore_eos=True)
    assert run.token_ids == expected and len(expected) == 12
    assert beam(llama, 4, 12).finish_reason == "eos"  # with eos the same search stopped early


# -- under an evicting cache --------------------------------------------------------------------------------------
def reference_beam(model, cache, n, steps):
    """Beam search without eos (every hypothesis has `steps` tokens, so the length penalty does not matter): keep
    the n best sums of log p; each hypothesis's logits from a fresh session of `cache` fed prompt, then its tokens
    one by one."""
    prompt = model.encode(PROMPT)[0].tolist()

    def logits(tokens):
        session = Session(model, cache)
        row = session.feed(prompt, "prefill")[-1]
        for token in tokens:
            row = session.feed([token], "decode")[-1]
        return row

    hyps, scores = [[]], torch.zeros(1)
    for _ in range(steps):
        rows = torch.stack([logits(h) for h in hyps])
        total = (torch.log_softmax(rows, -1) + scores[:, None]).reshape(-1)
        scores, index = total.topk(n)
        vocab = rows.shape[-1]
        hyps = [hyps[i // vocab] + [i % vocab] for i in index.tolist()]
    return hyps[0]


def test_beams_run_under_the_evicting_cache(llama):
    cache = wb.cache.get("streaming_llm", budget=8)  # the 19-token prompt already evicts
    tokens = beam(llama, 3, 6, ignore_eos=True, cache=cache).token_ids
    assert tokens == reference_beam(llama, cache, 3, 6)
    assert tokens != beam(llama, 3, 6, ignore_eos=True).token_ids  # eviction changed the search


def test_one_beam_without_eos_is_greedy(llama):
    cache = wb.cache.get("h2o", budget=8)
    assert beam(llama, 1, 10, ignore_eos=True, cache=cache).token_ids == wb.generate(
        llama, PROMPT, cache=cache, max_new_tokens=10, ignore_eos=True).token_ids


def test_one_beam_is_greedy_as_in_transformers():
    # a search of one beam would look past the eos here (a longer hypothesis wins with length_penalty=3, "never")
    model = wb.tiny("llama", eos_token_id=[228])
    tokens = beam(model, 1, 12, length_penalty=3.0, early_stopping="never").token_ids
    assert tokens == hf_beam(model, 1, 12, [228], length_penalty=3.0, early_stopping="never")
    assert tokens == wb.generate(model, PROMPT, max_new_tokens=12).token_ids and tokens[-1] == 228


def test_trace_follows_the_emitted_tokens(llama):
    run = wb.generate(llama, PROMPT, decoder=wb.decode.get("beam", num_beams=3), max_new_tokens=10,
                      record="entropy", ignore_eos=True)
    assert len(run.token_ids) == 10 and run.trace.sizes["step"] == 10


# -- Session.fork -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", [("full",), ("streaming_llm", 8), ("h2o", 8)])
def test_fork_continues_like_the_original(llama, cache):
    policy = wb.cache.get(cache[0], **({"budget": cache[1]} if len(cache) > 1 else {}))
    prompt = llama.encode(PROMPT)[0].tolist()
    original = Session(llama, policy)
    original.feed(prompt, "prefill")
    original.feed([5], "decode")
    fork = original.fork()
    for token in (9, 11):  # feeding the fork leaves the original as it was
        fork.feed([token], "decode")
    after_fork = fork.feed([13], "decode")[-1]
    after_original = original.feed([7], "decode")[-1]
    for tokens, after, session in (((5, 9, 11, 13), after_fork, fork), ((5, 7), after_original, original)):
        fresh = Session(llama, policy)
        fresh.feed(prompt, "prefill")
        rows = [fresh.feed([token], "decode")[-1] for token in tokens]
        assert torch.equal(after, rows[-1])
        assert fresh.cache.tokens_held().tolist() == session.cache.tokens_held().tolist()
        assert [p.tolist() for p in fresh.cache.positions(1)] == [p.tolist() for p in session.cache.positions(1)]


def test_fork_refuses_an_open_tail(llama):
    session = Session(llama)
    session.feed(llama.encode(PROMPT), "prefill")
    session.feed([5, 6], "verify")
    with pytest.raises(WorkbenchError, match="provisional"):
        session.fork()


# -- parameters ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [{"num_beams": 0}, {"num_beams": "four"}, {"num_beams": 2.5},
                                    {"length_penalty": "long"}, {"length_penalty": None},
                                    {"early_stopping": "sometimes"}, {"early_stopping": 1}])
def test_bad_parameters(params):
    with pytest.raises(ParameterError, match="beam"):
        wb.decode.Beam(**params)


def test_bad_parameters_by_name():
    with pytest.raises(ParameterError, match="length_penalty"):
        wb.decode.get("beam", length_penalty="long")
    assert wb.decode.get("beam", early_stopping="never").early_stopping == "never"
    assert wb.decode.get("beam", early_stopping="true").early_stopping is True


@pytest.mark.embedded
def test_embedded_equals_transformers(embedded):
    ids = embedded.encode(PROMPT)
    with torch.no_grad():
        expected = embedded.hf.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, do_sample=False,
                                        max_new_tokens=5, eos_token_id=sorted(embedded.eos_token_ids))
    run = wb.generate(embedded, PROMPT, decoder=wb.decode.get("beam", num_beams=3), max_new_tokens=5)
    assert run.token_ids == expected[0, ids.shape[1]:].tolist()
