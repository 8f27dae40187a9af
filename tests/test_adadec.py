"""AdaDec against a reference written here from the authors' rule with plain transformers forwards (no cache, the
whole sequence recomputed for every rollout token); its look-ahead leaves an evicting cache exactly as a plain replay
of the same tokens does; the threshold learner recovers known crossings of synthetic logistic data; bad input is
refused."""

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.decode.adadec import LEARNED_THRESHOLD
from workbench.decode.adadec_threshold import accuracy_cutoff, learn_threshold
from workbench.decode.base import Decoder
from workbench.run.session import Session

PROMPT = "hello there"
LONG = "def running_sum(numbers):\n    total = 0\n    out = []\n    for x in numbers:\n        total += x\n"  # 72


@pytest.fixture(scope="module")
def llama():
    return wb.tiny("llama")


def run(model, decoder, n, prompt=PROMPT, cache="full", record=None):
    return wb.generate(model, prompt, decoder=decoder, cache=cache, max_new_tokens=n, ignore_eos=True, record=record)


def next_log_p(model, rows):
    """(len(rows), vocab) next-token log-probs of equally long sequences, from one plain batched forward."""
    with torch.no_grad():
        return torch.log_softmax(model.hf(input_ids=torch.tensor(rows)).logits[:, -1].float(), -1)


def reference_adadec(model, prompt, steps, threshold, beam=3, lookahead=5):
    """The authors' AdaFixL rule for one sequence: greedy below the entropy threshold; else each top-`beam`
    candidate scored by (log p(c) + the log-probs of its `lookahead` greedy tokens) / (lookahead + 1)."""
    sequence, decisions = model.encode(prompt)[0].tolist(), []
    for _ in range(steps):
        log_p = next_log_p(model, [sequence])[0]
        entropy = float(-(log_p.exp() * log_p).sum())
        if entropy < threshold:
            sequence.append(int(log_p.argmax()))
            decisions.append("greedy")
            continue
        top_log_p, top_ids = log_p.topk(beam)
        rollouts, totals = [sequence + [c] for c in top_ids.tolist()], top_log_p.double()
        for _ in range(lookahead):  # the candidates' rollouts side by side, one batch row each
            rows = next_log_p(model, rollouts)
            best = rows.max(-1)
            totals = totals + best.values.double()
            rollouts = [r + [t] for r, t in zip(rollouts, best.indices.tolist())]
        scores = (totals / (lookahead + 1)).tolist()
        sequence.append(top_ids[int(np.argmax(scores))].item())
        decisions.append("lookahead")
    return sequence[-steps:], decisions


def greedy_entropies(model, prompt, n):
    return run(model, "greedy", n, prompt, record=["entropy"]).steps["entropy"].values


# -- (a) above every entropy it is greedy ------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [1e9, math.inf])
def test_a_threshold_above_every_entropy_is_greedy(llama, threshold):
    adadec = run(llama, wb.decode.get("adadec", threshold=threshold), 16, record=["decoding"])
    assert adadec.token_ids == run(llama, "greedy", 16).token_ids
    assert list(adadec.steps["decode_decision"].values) == ["greedy"] * 16


# -- (b) the rerank matches the reference; the look-ahead leaves the cache untouched --------------------------
@pytest.mark.parametrize("params,n", [({}, 6), ({"beam": 2, "lookahead": 1}, 10), ({"beam": 4, "lookahead": 3}, 6)])
def test_always_looking_ahead_matches_a_cacheless_reference(llama, params, n):
    adadec = run(llama, wb.decode.get("adadec", threshold=0.0, **params), n, record=["decoding"])
    expected, _ = reference_adadec(llama, PROMPT, n, 0.0, **params)
    assert adadec.token_ids == expected
    assert list(adadec.steps["decode_decision"].values) == ["lookahead"] * n
    assert adadec.token_ids != run(llama, "greedy", n).token_ids  # the rerank changed the choice somewhere


def test_a_mid_threshold_mixes_greedy_and_lookahead_steps_as_the_reference_does(llama):
    threshold = float(np.median(greedy_entropies(llama, PROMPT, 12)))
    adadec = run(llama, wb.decode.get("adadec", threshold=threshold), 12, record=["decoding", "entropy"])
    expected, decisions = reference_adadec(llama, PROMPT, 12, threshold)
    assert adadec.token_ids == expected
    assert list(adadec.steps["decode_decision"].values) == decisions
    assert set(decisions) == {"greedy", "lookahead"}
    looked = adadec.steps["entropy"].values >= threshold
    assert list(np.where(looked, "lookahead", "greedy")) == decisions


@dataclass
class Replay(Decoder):
    """Emits given tokens with plain decode passes and nothing else (no rollouts)."""

    name = "replay"
    tokens: list = field(default_factory=list)

    def step(self, ctx):
        ctx.logits  # the plain decode pass of the pending token
        return [self.tokens[len(ctx.tokens) - ctx.state.setdefault("start", len(ctx.tokens))]]


@dataclass
class CopyReference(Decoder):
    """AdaDec's rerank computed on a deep copy of the run's cache in a session of its own, so the run's own session
    never sees a rollout: what the mark / rollback look-ahead must reproduce exactly."""

    name = "copy_reference"
    threshold: float = 0.0
    beam: int = 3
    lookahead: int = 5

    def step(self, ctx):
        log_p = torch.log_softmax(ctx.logits, -1)
        if float(ctx.entropy) < self.threshold:
            return [int(log_p.argmax())]
        top_log_p, top_ids = log_p.topk(self.beam)
        scores = []
        for c_log_p, c in zip(top_log_p.tolist(), top_ids.tolist()):
            scratch = Session(ctx.session.model, copy.deepcopy(ctx.session.cache), ctx.session.attention)
            token, total = c, c_log_p
            for _ in range(self.lookahead):
                row = torch.log_softmax(scratch.feed([token], "decode")[-1], -1)
                token = int(row.argmax())
                total += float(row[token])
            scores.append(total / (self.lookahead + 1))
        return [top_ids[int(np.argmax(scores))].item()]


def test_the_lookahead_leaves_an_evicting_cache_exactly_as_before(llama):
    decoder = wb.decode.get("adadec", threshold=0.0, beam=3, lookahead=2)  # every step looks ahead
    cache = lambda: wb.cache.get("h2o", budget=48)  # noqa: E731  (the 72-token prompt alone overflows it)
    adadec = run(llama, decoder, 8, LONG, cache(), record=["logits"])
    replay = run(llama, Replay(adadec.token_ids), 8, LONG, cache(), record=["logits"])
    assert replay.token_ids == adadec.token_ids
    # every step's logits are what a run that never looked ahead computes over the same cache policy
    np.testing.assert_array_equal(adadec.trace["logits"].values, replay.trace["logits"].values)
    # and every rerank is what rollouts on an untouched copy of the cache choose
    assert run(llama, CopyReference(0.0, 3, 2), 8, LONG, cache()).token_ids == adadec.token_ids
    # eviction changed what the look-ahead saw (the full-cache run matches the cacheless reference above), so the
    # checks above are not vacuous
    assert adadec.token_ids != run(llama, decoder, 8, LONG).token_ids


@pytest.mark.embedded
@pytest.mark.slow
def test_the_embedded_model_with_its_learned_threshold_matches_the_reference(embedded):
    prompt = 'def is_even(n):\n    """Return True if n is even."""\n'  # entropies 1.34 2.38 1.44 0.02 3.97 (nats)
    adadec = run(embedded, wb.decode.get("adadec", beam=2, lookahead=3), 5, prompt, record=["decoding"])
    expected, decisions = reference_adadec(embedded, prompt, 5, LEARNED_THRESHOLD, beam=2, lookahead=3)
    assert adadec.token_ids == expected
    assert list(adadec.steps["decode_decision"].values) == decisions
    assert set(decisions) == {"greedy", "lookahead"}


# -- (c) learn_threshold -----------------------------------------------------------------------------------------
def synthetic(crossing, slope, low, high, n=40000, seed=0):
    """Entropies uniform on [low, high], ranked_first drawn from P = sigmoid(slope * (H - crossing))."""
    rng = np.random.default_rng(seed)
    entropy = rng.uniform(low, high, n)
    return entropy, rng.random(n) < 1 / (1 + np.exp(-slope * (entropy - crossing)))


def test_learn_threshold_recovers_the_crossing_of_a_known_logistic_model():
    entropy, first = synthetic(1.3, -3.0, 0.0, 5.0)
    assert learn_threshold(entropy, first, balance=False) == pytest.approx(1.3, abs=0.05)
    # at another cutoff c the crossing moves to 1.3 + logit(c) / slope
    assert learn_threshold(entropy, first, balance=False, cutoff=0.8) == pytest.approx(1.3 + math.log(4) / -3.0,
                                                                                        abs=0.05)
    symmetric = synthetic(1.3, -3.0, -0.7, 3.3)  # as many of each class: balancing changes nothing
    assert learn_threshold(*symmetric) == pytest.approx(1.3, abs=0.05)


def test_balancing_shifts_the_crossing_by_the_class_ratio():
    """Weighing the classes equally fits logit P = a + wH - log(n_first / n_not) (the case-control correction), so
    the 0.5 crossing moves from 1.3 to 1.3 + log(n_first / n_not) / w."""
    entropy, first = synthetic(1.3, -3.0, 0.0, 5.0)
    ratio = first.sum() / (~first).sum()
    assert ratio < 0.5  # far from balanced
    assert learn_threshold(entropy, first) == pytest.approx(1.3 + math.log(ratio) / -3.0, abs=0.06)


def test_accuracy_cutoff_picks_the_most_accurate_cutoff():
    p = np.array([0.1, 0.3, 0.45, 0.6, 0.9])
    assert accuracy_cutoff(p, [0, 0, 1, 1, 1]) == (0.31, 1.0)  # the first cutoff above 0.3 separates them
    assert accuracy_cutoff(p, [0, 0, 0, 0, 1]) == (0.61, 1.0)


# -- (d) bad input ------------------------------------------------------------------------------------------------
def test_none_gives_the_learned_threshold():
    assert wb.decode.get("adadec", threshold=None).threshold == LEARNED_THRESHOLD
    assert wb.decode.get("adadec", threshold="none").threshold == LEARNED_THRESHOLD
    assert wb.decode.get("adadec").params() == {"threshold": LEARNED_THRESHOLD, "beam": 3, "lookahead": 5}


@pytest.mark.parametrize("params,match", [
    ({"threshold": -0.1}, "'threshold' is -0.1; it must be >= 0"),
    ({"threshold": float("nan")}, "'threshold' must be an entropy in nats >= 0"),
    ({"beam": 0}, "'beam' is 0; it must be >= 1"),
    ({"lookahead": 0}, "'lookahead' is 0; it must be >= 1"),
    ({"lookahead": "two"}, "expected int"),
])
def test_bad_parameters_are_refused(params, match):
    with pytest.raises(wb.ParameterError, match=match):
        wb.decode.get("adadec", **params)


def test_bad_parameters_are_refused_when_built_directly():
    from workbench.decode.adadec import AdaDec

    with pytest.raises(wb.ParameterError, match="'beam' must be an integer >= 1"):
        AdaDec(beam=2.5)


@pytest.mark.parametrize("entropies,first,match", [
    ([0.1, 0.2], [1], "one ranked_first flag per entropy"),
    ([0.1, float("nan")], [1, 0], "finite entropies"),
    ([0.1, 0.2], [1, 1], "both kinds"),
    ([0.1, 0.2], [1, 2], "booleans or 0 / 1"),
])
def test_learn_threshold_refuses_bad_data(entropies, first, match):
    with pytest.raises(wb.ParameterError, match=match):
        learn_threshold(entropies, first)


def test_learn_threshold_refuses_a_bad_cutoff_and_a_non_negative_slope():
    entropy, first = synthetic(1.3, -3.0, 0.0, 5.0, n=2000)
    with pytest.raises(wb.ParameterError, match="strictly between 0 and 1"):
        learn_threshold(entropy, first, cutoff=1.0)
    with pytest.raises(wb.WorkbenchError, match="entropy does not predict"):
        learn_threshold(entropy, ~first)
