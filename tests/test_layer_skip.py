"""`layer_skip`: the model drafting for itself with layers skipped (or exiting early) gives greedy's tokens with
full and evicting caches, the draft really runs fewer layers (and the early-exit draft is the model's norm and
lm_head over layer E's output), the target's forwards are untouched, sampling keeps the target's distribution
(seeded chi-square test, stated false-failure rate), bad parameters are refused in one line."""

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.decode.layer_skip import draft_session
from workbench.run.context import StepContext

PROMPT = "Repeat after me: a stitch in time saves nine. a stitch in time saves nine. a stitch"
CHI2_3_DOF_1E4 = 21.11  # P(X > c) = 1e-4 for 4 categories: fails by chance once in 10,000 runs (seeded: never)


@pytest.fixture(scope="module")
def four_layers() -> wb.Model:
    return wb.tiny("llama", num_hidden_layers=4)


def verify_passes(run) -> int:
    return list(run.trace["forward_phase"].values.ravel()).count("verify")


@pytest.mark.parametrize("cache", ["full", "h2o"])
def test_greedy_layer_skip_equals_greedy(four_layers, cache):
    policy = wb.cache.get(cache) if cache == "full" else wb.cache.get(cache, budget=48)
    greedy = wb.generate(four_layers, PROMPT, cache=policy, max_new_tokens=20, ignore_eos=True)
    for decoder in [wb.decode.get("layer_skip"), wb.decode.get("layer_skip", skip="1,3", k=3),
                    wb.decode.get("layer_skip", exit_layer=2), wb.decode.get("layer_skip", exit_layer=1, k=6),
                    wb.decode.get("layer_skip", skip="2", schedule="heuristic")]:
        run = wb.generate(four_layers, PROMPT, cache=policy, decoder=decoder, max_new_tokens=20, ignore_eos=True)
        assert run.token_ids == greedy.token_ids, str(decoder)


def test_acceptance_is_sane_and_full_when_nothing_is_skipped(four_layers):
    """Tokens per verify pass (the bonus token counted) lie in [1, k + 1]; a draft that skips nothing is the
    target itself and keeps every draft: 18 tokens after the first two (the prefill's and the plain step's) in
    4 passes of 4 + 1 (the last drafts only the 2 still needed)."""
    for decoder, low, high in [(wb.decode.get("layer_skip"), 1.0, 5.0),
                               (wb.decode.get("layer_skip", exit_layer=3), 1.0, 5.0),
                               (wb.decode.get("layer_skip", skip="none"), 4.5, 4.5)]:
        run = wb.generate(four_layers, PROMPT, decoder=decoder, max_new_tokens=20, ignore_eos=True,
                          record="decoding")
        passes = verify_passes(run)
        phases = run.trace["forward_phase"].values.ravel().tolist()
        # the prefill, the plain step, the verify passes, and a plain last step when one token remained
        assert phases in (["prefill", "decode"] + ["verify"] * passes,
                          ["prefill", "decode"] + ["verify"] * passes + ["decode"]), phases
        assert low <= 18 / passes <= high, str(decoder)
        # the pending token and k = 4 draft tokens each pass, but never more than the run still needs: the pass
        # emits the kept draft and one token of the target's
        fed = run.trace["forward_tokens"].values.ravel()[2:2 + passes]
        accepted = run.trace["verify_accepted"].values.ravel()[2:2 + passes]
        remaining = 18 - np.concatenate([[0], np.cumsum(accepted + 1)[:-1]])
        assert (fed == 1 + np.minimum(4, remaining - 1)).all(), (fed, remaining)


def _attention_calls(model, session, ids):
    """Which layers' attention ran during one feed of `session`."""
    called = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: called.append(i))
             for i, layer in enumerate(model.hf.get_decoder().layers)]
    try:
        session.feed(ids, "prefill")
    finally:
        for hook in hooks:
            hook.remove()
    return called


@pytest.mark.parametrize("params, runs", [({}, [0, 1, 3]), ({"skip": "1,3"}, [0, 2]),
                                          ({"exit_layer": 2}, [0, 1]), ({"skip": "none"}, [0, 1, 2, 3])])
def test_the_draft_runs_only_its_layers_and_the_target_runs_all(four_layers, params, runs):
    decoder = wb.decode.get("layer_skip", **params)
    ids = four_layers.encode("count the layers")[0].tolist()
    target = wb.Session(four_layers, "full")
    ctx = StepContext(target, torch.Generator().manual_seed(0), [], None, None, ids, {})
    draft = draft_session(decoder, ctx)
    assert _attention_calls(four_layers, draft, ids) == runs
    held = draft.cache.tokens_held()[:, 0].tolist()
    assert held == [len(ids) if i in runs else 0 for i in range(4)]  # skipped layers hold nothing
    assert _attention_calls(four_layers, target, ids) == [0, 1, 2, 3]  # the target's forward: every layer


def test_the_early_exit_draft_is_the_norm_and_lm_head_over_layer_e(four_layers):
    ids = four_layers.encode("exit early")
    hf = four_layers.hf
    with torch.inference_mode():
        hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states[2][0, -1]  # after layers 0 and 1
        expected = hf.lm_head(hf.get_decoder().norm(hidden)).float()
        full = hf(input_ids=ids).logits[0, -1].float()
    target = wb.Session(four_layers, "full")
    ctx = StepContext(target, None, [], None, None, ids[0].tolist(), {})
    drafted = draft_session(wb.decode.get("layer_skip", exit_layer=2), ctx).feed(ids, "prefill")[-1]
    torch.testing.assert_close(drafted, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(drafted, full, atol=1e-3)  # the draft is not the full model
    with torch.inference_mode():  # and the model called directly afterwards is the full model still
        torch.testing.assert_close(hf(input_ids=ids).logits[0, -1].float(), full)


@pytest.mark.slow
def test_layer_skip_sampling_keeps_the_targets_next_token_distribution(four_layers):
    """One layer_skip step (k=2) after a fixed prompt and pending token, over 600 seeds: the first token it emits
    follows the target's own top-4 distribution at that point."""
    decoder = wb.decode.get("layer_skip", k=2, greedy=False, top_k=4, exit_layer=1)
    prompt = four_layers.encode("speculate")[0].tolist()
    pending = [int(four_layers.encode("!")[0, 0])]
    with wb.Session(four_layers, "full") as session:
        exact = decoder.probabilities(session.feed(prompt + pending, "prefill"))[0]
    support = exact.nonzero().flatten()
    first = []
    for seed in range(600):
        with wb.Session(four_layers, "full") as session:
            session.feed(prompt, "prefill")
            ctx = StepContext(session, torch.Generator().manual_seed(seed), pending, None, None,
                              prompt + pending, {"timed_plain": True})  # past the plain step
            first.append(decoder.step(ctx)[0])
    assert set(first) <= set(support.tolist())
    counts = torch.bincount(torch.searchsorted(support, torch.tensor(first)), minlength=4).double()
    want = exact[support].double() * len(first)
    assert float(((counts - want) ** 2 / want).sum()) < CHI2_3_DOF_1E4


@pytest.mark.parametrize("params, message", [
    ({"skip": "2,x"}, "give comma-separated layer indices"),
    ({"skip": "0,2"}, "layer 0 always runs"),
    ({"skip": "-1"}, "layer 0 always runs"),
    ({"skip": "2", "exit_layer": 2}, "not both"),
    ({"exit_layer": -1}, "must be >= 0"),
    ({"k": 0}, "must be >= 1"),
])
def test_bad_parameters_are_refused_in_one_line(params, message):
    with pytest.raises(wb.ParameterError, match=message) as caught:
        wb.decode.get("layer_skip", **params)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("params, message", [({"skip": "2,4"}, r"layers \[4\].*must be in 1\.\.3"),
                                             ({"exit_layer": 4}, r"has 4 layers, so it must be in 1\.\.3")])
def test_layers_the_model_lacks_are_refused_at_the_first_step(four_layers, params, message):
    with pytest.raises(wb.ParameterError, match=message) as caught:
        wb.generate(four_layers, "hi", decoder=wb.decode.get("layer_skip", **params), max_new_tokens=4,
                    ignore_eos=True)
    assert "\n" not in str(caught.value)


def test_describe_names_the_papers_and_the_departures():
    text = wb.decode.get("layer_skip").describe()
    assert "Draft & Verify" in text and "SWIFT" in text and "departs from the paper" in text
    assert "layer_skip" in wb.decode.available()


@pytest.mark.embedded
def test_layer_skip_equals_greedy_on_the_embedded_model(embedded):
    prompt = [{"role": "user", "content": "Name three colours of the rainbow."}]
    greedy = wb.generate(embedded, prompt, max_new_tokens=16, ignore_eos=True)
    run = wb.generate(embedded, prompt, decoder="layer_skip", max_new_tokens=16, ignore_eos=True)
    assert run.token_ids == greedy.token_ids
    assert verify_passes(run) < 15  # some drafts were kept
