"""Decoding telemetry (record=["decoding"]): per verify pass counts, per token origin and probabilities checked
against the unmodified HF models run on the whole sequence; the acceptance summary on known answers; SmartSpec's
goodput rule and cache_draft (the target over a compressed cache drafting for itself)."""

import numpy as np
import pytest
import torch
import xarray as xr

import workbench as wb
from workbench.decode.speculative import PassCosts, goodput_length
from workbench.decode.telemetry import acceptance

REPEAT = "Repeat after me: a stitch in time saves nine. a stitch in time saves nine. a stitch"


def hf_probs(model: wb.Model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """(len(ids), vocab) next-token probabilities of the plain HF model over the whole sequence, no cache."""
    with torch.no_grad():
        logits = model.hf(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.softmax(logits / temperature, -1)


def test_a_self_drafting_run_keeps_every_draft_and_says_so(tiny_llama):
    """The target drafting for itself keeps everything: 22 tokens are the prefill's, the plain step's and 4 verify
    passes of 4 drafts + the bonus token; every accepted token had p = q, so min(1, p/q) = 1."""
    run = wb.generate(tiny_llama, "hello there", decoder=wb.decode.get("speculative", draft_model=tiny_llama),
                      max_new_tokens=22, ignore_eos=True, record=["decoding"])
    summary = run.summary()["acceptance"]
    assert (summary["verify_passes"], summary["drafted"], summary["accepted"], summary["bonus"]) == (4, 16, 16, 4)
    assert summary["mean_accepted_length"] == 5.0 and summary["acceptance_rate"] == 1.0
    assert summary["per_position"] == [1.0] * 4 and summary["histogram"] == [0, 0, 0, 0, 4]
    origins = list(run.steps["token_origin"].values)
    assert origins == ["plain", "plain"] + (["accepted"] * 4 + ["bonus"]) * 4
    accepted = run.steps["token_origin"].values == "accepted"
    np.testing.assert_allclose(run.steps["accept_prob"].values[accepted], 1.0, atol=1e-4)
    np.testing.assert_allclose(run.steps["draft_prob"].values[accepted], run.steps["target_prob"].values[accepted],
                               atol=1e-4)
    phases = run.steps["forward_phase"].values
    drafted = run.steps["verify_drafted"].values
    assert (drafted[phases == "verify"] == 4).all() and (drafted[phases != "verify"] == -1).all()


def test_per_token_probabilities_are_the_hf_models(tiny_llama):
    """In a sampling run, target_prob is the target's softmax at the token's position and draft_prob the draft
    model's, both from the unmodified HF models over the whole emitted sequence; accept_prob is min(1, p/q)."""
    draft = wb.tiny("llama", seed=1)
    run = wb.generate(tiny_llama, REPEAT, decoder=wb.decode.get("speculative", draft_model=draft, k=3, greedy=False),
                      max_new_tokens=24, ignore_eos=True, record=["decoding"])
    ids = run.prompt_ids + run.token_ids
    rows = len(run.prompt_ids) - 1 + np.arange(len(run.token_ids))
    p = hf_probs(tiny_llama, ids)[rows, run.token_ids].numpy()
    q = hf_probs(draft, ids)[rows, run.token_ids].numpy()
    np.testing.assert_allclose(run.steps["target_prob"].values, p, rtol=1e-3, atol=1e-6)
    origins = run.steps["token_origin"].values
    assert set(origins) >= {"accepted", "resampled", "plain"}  # the test sees every kind
    drafted = (origins == "accepted") | (origins == "resampled")
    np.testing.assert_allclose(run.steps["draft_prob"].values[drafted], q[drafted], rtol=1e-3, atol=1e-6)
    assert np.isnan(run.steps["draft_prob"].values[~drafted]).all()
    accepted = origins == "accepted"
    np.testing.assert_allclose(run.steps["accept_prob"].values[accepted], np.minimum(1, p / q)[accepted], rtol=1e-3)
    assert np.isnan(run.steps["accept_prob"].values[~accepted]).all()


def test_the_acceptance_summary_on_hand_made_passes():
    """Three verify passes of 4 drafts keeping 0, 2 and 4: position 0 kept in 2 of 3 tries, position 1 in 2 of 2,
    position 2 in 1 of 2, position 3 in 1 of 1; 1 + 6/3 tokens a pass. Plain decode passes take 0.1 s and each
    verify step 0.2 s: (6 + 3) tokens in 0.6 s against 9 x 0.1 s of greedy steps is 1.5x."""
    phase = ["prefill", "decode", "verify", "verify", "verify"]
    trace = xr.Dataset({
        "forward_phase": ("forward", np.array(phase, dtype=object)),
        "forward_seconds": ("forward", [1.0, 0.1, 0.15, 0.15, 0.15]),
        "verify_drafted": ("forward", [-1, -1, 4, 4, 4]),
        "verify_accepted": ("forward", [-1, -1, 0, 2, 4]),
        "verify_bonus": ("forward", [-1, -1, 0, 0, 1]),
        "draft_seconds": ("forward", [np.nan, np.nan, 0.04, 0.04, 0.04]),
        "commit_seconds": ("forward", [np.nan, np.nan, 0.01, 0.01, 0.01])})
    summary = acceptance(trace)
    assert summary["per_position"] == [round(2 / 3, 4), 1.0, 0.5, 1.0]
    assert summary["histogram"] == [1, 0, 1, 0, 1] and summary["mean_accepted_length"] == 3.0
    assert summary["acceptance_rate"] == 0.5 and summary["bonus"] == 1
    assert summary["goodput_tokens_per_s"] == pytest.approx(9 / 0.6)
    assert summary["speedup_vs_greedy"] == pytest.approx(1.5)


def test_the_goodput_rule_drafts_long_when_drafts_are_kept_and_cheap():
    """Known answers of SmartSpec's rule: nothing accepted -> the shortest draft; everything accepted and free
    drafting -> the longest; a draft token costing as much as a verify pass is worth it only above a = 1/2
    (k = 1: (1 + a) / 2 beats 1 / 1 exactly when a > 1/2)."""
    def line(intercept, slope):
        return lambda n: intercept + slope * n

    assert goodput_length(0.0, 0.001, line(0.01, 0.0), 8) == 1
    assert goodput_length(0.99, 0.0, line(0.01, 0.0005), 8) == 8
    assert goodput_length(0.6, 0.01, line(0.01, 0.0), 1) == 1
    assert goodput_length(0.9, 0.0, line(0.01, 0.01), 6) < 6  # verify time grows with the draft: stop short
    # a measured step in the verify cost (4+ tokens at 1.5x, as on a 2-core CPU): at a = 0.5 a 2-token draft wins
    # (E = 1.75 tokens for 1.0 vs 1.875 for 1.5 at k = 3); a linear fit through the same points would pick longer
    def step(n):
        return 1.0 if n <= 3 else 1.5

    assert goodput_length(0.5, 0.0, step, 10) == 2


@pytest.mark.parametrize("schedule", ["constant", "goodput"])
def test_cache_draft_equals_greedy_and_drafts_through_its_own_policy(tiny_llama, schedule):
    greedy = wb.generate(tiny_llama, REPEAT, max_new_tokens=30, ignore_eos=True)
    for decoder in [wb.decode.get("cache_draft", draft_budget=24, schedule=schedule),
                    wb.decode.get("cache_draft", draft_cache="snapkv", draft_budget=32, schedule=schedule)]:
        run = wb.generate(tiny_llama, REPEAT, decoder=decoder, max_new_tokens=30, ignore_eos=True,
                          record=["decoding"])
        assert run.token_ids == greedy.token_ids, str(decoder)
        assert acceptance(run.trace)["verify_passes"] > 0
    # with a budget above the text, the draft IS the target: every draft is kept
    whole = wb.generate(tiny_llama, REPEAT, decoder=wb.decode.get("cache_draft", draft_budget=512, k=3),
                        max_new_tokens=17, ignore_eos=True, record=["decoding"])
    assert acceptance(whole.trace)["acceptance_rate"] == 1.0


def test_cache_draft_refuses_an_unknown_policy():
    with pytest.raises(wb.ParameterError, match="draft_cache' is 'nope'; choose a cache policy: .*snapkv"):
        wb.decode.get("cache_draft", draft_cache="nope")


def test_step_values_recorded_at_some_steps_stay_aligned(tiny_llama):
    """A decoder that records a step variable only from its third step: the first two are missing, not shifted."""
    class Late(wb.decode.Greedy):
        name = "late_recorder"

        def step(self, ctx):
            tokens = super().step(ctx)
            if ctx.state.setdefault("n", 0) >= 2:
                ctx.record("decode_decision", f"step{ctx.state['n']}")
            ctx.state["n"] += 1
            return tokens

    run = wb.generate(tiny_llama, "hi", decoder=Late(), max_new_tokens=5, ignore_eos=True, record=["decoding"])
    assert list(run.steps["decode_decision"].values) == ["", "", "step2", "step3", "step4"]


@pytest.mark.embedded
def test_cache_draft_on_the_embedded_model_equals_greedy_and_keeps_drafts(embedded):
    """The real model over a 32-token StreamingLLM cache drafts for itself over a SnapKV target cache: the tokens
    are greedy's, and a real share of the drafts is kept (measured 0.38; random drafts of a 49k vocabulary would
    keep none)."""
    passage = ("The harbor town wakes before dawn. Fishing boats leave the pier one by one, their lanterns "
               "swinging, while the baker on Quay Street lights his ovens and the gulls gather on the roofs.")
    prompt = [{"role": "user", "content": f"Summarise this passage in one sentence:\n\n{passage}"}]
    policy = wb.cache.get("snapkv", budget=64)
    greedy = wb.generate(embedded, prompt, cache=policy, max_new_tokens=24)
    run = wb.generate(embedded, prompt, cache=policy, decoder=wb.decode.get("cache_draft", draft_budget=32),
                      max_new_tokens=24, record=["decoding"])
    assert run.token_ids == greedy.token_ids
    assert acceptance(run.trace)["acceptance_rate"] > 0.25


def test_pass_costs_estimate_the_per_token_acceptance_from_the_positions_tried():
    """Two passes of 4 drafts: one kept 1 (tried 2: the kept one and the first rejected), one kept all 4 (tried
    4): a = 5 / 6, not 5 / 8 (the positions after a rejection were never tried)."""
    costs = PassCosts()
    costs.add(4, 1, 0.1, 0.2)
    costs.add(4, 4, 0.1, 0.3)
    assert costs.acceptance == pytest.approx(5 / 6)
    assert costs.draft_seconds == pytest.approx(0.2 / 8)
    assert costs.verify_seconds(5) == pytest.approx(0.25)  # one length seen: its mean, no slope
    costs.add(1, 0, 0.0, 0.1)  # 2 tokens in 0.1 s, 5 in 0.25: the line 0.05 n
    assert costs.verify_seconds(3) == pytest.approx(0.15)
    assert PassCosts({3: 0.7}).verify_seconds(3) == 0.7  # a profiled length reads the profile


@pytest.mark.embedded
def test_a_deterministic_draft_has_q_one_where_kept_and_zero_where_resampled(embedded):
    prompt = [{"role": "user", "content": "Repeat exactly, then count on: one two three four five, one two three "
                                          "four five, one two three four five."}]
    run = wb.generate(embedded, prompt, decoder=wb.decode.get("prompt_lookup", k=4), max_new_tokens=30,
                      ignore_eos=True, record="decoding")
    origins, q = run.steps["token_origin"].values, run.steps["draft_prob"].values
    assert (origins == "accepted").any() and (origins == "resampled").any()
    assert (q[origins == "accepted"] == 1.0).all() and (q[origins == "resampled"] == 0.0).all()
    assert np.isnan(q[(origins == "bonus") | (origins == "plain")]).all()


def test_goodput_profiles_verify_costs_on_a_fork_the_trace_never_sees(tiny_llama):
    """The goodput rule's verify profile (lengths 1..k+1) runs on a fork of the session: the run's tokens are
    greedy's and its trace holds only the run's own passes."""
    from workbench.decode import speculative

    speculative._PROFILES.clear()
    greedy = wb.generate(tiny_llama, REPEAT, max_new_tokens=20, ignore_eos=True)
    run = wb.generate(tiny_llama, REPEAT, decoder=wb.decode.get("prompt_lookup", k=4, schedule="goodput"),
                      max_new_tokens=20, ignore_eos=True, record="decoding")
    assert run.token_ids == greedy.token_ids
    [profile] = speculative._PROFILES.values()
    assert sorted(profile) == [1, 2, 3, 4, 5] and all(seconds > 0 for seconds in profile.values())
    phases = run.trace.forward_phase.values[0]
    drafted = run.trace.verify_drafted.values[0]
    assert (phases == "verify").sum() == (drafted >= 0).sum() > 0
    assert run.trace.sizes["forward"] == len(phases) == 1 + (phases != "prefill").sum()
