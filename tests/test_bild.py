"""BiLD: with the big model as its own little model, or a rollback threshold so small that only the big model's
argmax survives, the tokens are exactly the big model's greedy ones; with another little model they are those of an
independent loop written here over plain transformers forward passes (no cache), with the reference's fallback and
rollback rules; bad input is refused."""

import pytest
import torch

import workbench as wb
from workbench.decode.bild import BiLD
from workbench.errors import ParameterError

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def big():
    return wb.tiny("llama")


@pytest.fixture(scope="module")
def little():
    return wb.tiny("llama", seed=1)


def greedy(model, n):
    return wb.generate(model, PROMPT, decoder="greedy", max_new_tokens=n, ignore_eos=True).token_ids


def verify_passes(run):
    if "verify_drafted" not in run.trace:  # no verify pass in the run
        return []
    drafted = run.trace["verify_drafted"].values.ravel()
    return list(zip(drafted[drafted >= 0].tolist(), run.trace["verify_accepted"].values.ravel()[drafted >= 0].tolist()))


@pytest.mark.parametrize("alpha, beta", [(1e-6, 5.0), (0.3, 5.0), (0.6, 0.01), (1.0, 5.0)])
def test_the_big_model_as_its_own_little_model_gives_its_greedy_tokens(big, alpha, beta):
    """Every little token is then the big model's argmax, and so is every token the big model puts in."""
    run = wb.generate(big, PROMPT, decoder=BiLD(little_model=big, alpha=alpha, beta=beta, max_little=4),
                      max_new_tokens=12, ignore_eos=True, record=["decoding"])
    assert run.token_ids == greedy(big, 12)
    passes = verify_passes(run)
    if alpha == 1.0:  # the little model's top probability is always below 1: only plain big steps
        assert passes == []
    if alpha < 1e-3:  # the little model never falls back: runs of max_little tokens (the last one cut by the
        assert len(passes) > 1 and all(drafted == 4 for drafted, _ in passes[:-1])  # length limit)


def test_a_tiny_rollback_threshold_keeps_only_the_big_models_argmax(big, little):
    """A kept little token has -log p_big(x) <= beta = 1e-6, so p_big(x) > 0.5: it is the big model's argmax."""
    run = wb.generate(big, PROMPT, decoder=BiLD(little_model=little, alpha=1e-6, beta=1e-6, max_little=3),
                      max_new_tokens=12, ignore_eos=True, record=["decoding"])
    assert run.token_ids == greedy(big, 12)
    assert verify_passes(run)  # the little model did propose


def forward_logits(model, ids):
    with torch.no_grad():
        return model.hf(torch.tensor([ids]), use_cache=False).logits[0].float()


def reference_bild(big, little, prompt, n, alpha, beta, max_little):
    """BiLD by the reference's rules over full recomputations: the tokens, who chose each, and per verify pass
    (little tokens, kept), plus how each little run ended."""
    sequence, out, origin, passes, ends = list(prompt), [], [], [], []
    big_turn = True  # the big model emits the first token
    while len(out) < n:
        if big_turn:
            token = int(forward_logits(big, sequence)[-1].argmax())
            sequence, out, origin, big_turn = sequence + [token], out + [token], origin + ["big"], False
            continue
        run, longest = [], min(max_little, n - len(out) - 1)
        while len(run) < longest:
            p = torch.softmax(forward_logits(little, sequence + run)[-1], -1)
            if p.max() < alpha:  # fallback: this token is discarded
                break
            run.append(int(p.argmax()))
        ends.append("length" if len(run) == longest else "fallback" if run else "at once")
        if not run:
            big_turn = True
            continue
        log_p = torch.log_softmax(forward_logits(big, sequence + run), -1)[len(sequence) - 1:]
        above = [i for i, token in enumerate(run) if -log_p[i, token] > beta]
        kept = above[0] if above else len(run)
        new = run[:kept] + [int(log_p[kept].argmax())]
        sequence, out, origin = sequence + new, out + new, origin + ["little"] * kept + ["big"]
        passes.append((len(run), kept))
        big_turn = kept < len(run)  # after a rollback the reference's loop stays with the big model one token
    return out[:n], origin[:n], passes, ends


def test_matches_an_independent_loop_over_plain_forward_passes(big, little):
    n, alpha, beta, max_little = 24, 0.2, 8.0, 3
    prompt = big.encode(PROMPT)[0].tolist()
    tokens, origin, passes, ends = reference_bild(big, little, prompt, n, alpha, beta, max_little)
    # the settings exercise every rule: immediate fallbacks, runs cut by alpha and by length, rollbacks, full keeps
    assert {"length", "fallback", "at once"} <= set(ends)
    assert any(kept < drafted for drafted, kept in passes) and any(kept == drafted for drafted, kept in passes)
    assert any(drafted > 1 for drafted, _ in passes)
    run = wb.generate(big, PROMPT, decoder=BiLD(little_model=little, alpha=alpha, beta=beta, max_little=max_little),
                      max_new_tokens=n, ignore_eos=True, record=["decoding"])
    assert run.token_ids == tokens
    assert list(run.trace["decode_decision"].values.ravel()) == origin
    assert verify_passes(run) == passes
    assert tokens != greedy(big, n)  # the little model's tokens did change the text


def test_bad_input_is_refused(big):
    with pytest.raises(ParameterError, match="little_model"):
        wb.generate(big, PROMPT, decoder=BiLD(), max_new_tokens=4)
    for alpha in (0.0, -0.1, 1.5):
        with pytest.raises(ParameterError, match=r"alpha.*\(0, 1\]"):
            BiLD(alpha=alpha)
    for beta in (0.0, -1.0):
        with pytest.raises(ParameterError, match="beta.*> 0"):
            BiLD(beta=beta)
    with pytest.raises(ParameterError, match="tokenizer or vocabulary"):
        wb.generate(big, PROMPT, decoder=BiLD(little_model=wb.tiny("llama", vocab_size=400)), max_new_tokens=4)
    assert "bild" in wb.decode.available()
