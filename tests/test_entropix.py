"""entropix: the regime follows the reference's thresholds on entropy and varentropy in bits (computed here in float64
from the definitions), the argmax regime gives the argmax, a run records one regime and varentropy per token."""

import math

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.decode.entropix import Entropix
from workbench.decode.telemetry import surprisal_moments
from workbench.errors import ParameterError

LN2 = math.log(2)


def moments_nats(logits) -> tuple[float, float]:
    """Entropy and varentropy from the definitions, in float64: H = E[s], V = E[s^2] - H^2 with s = -log p."""
    z = np.asarray(logits, dtype=np.float64)
    log_p = z - z.max() - np.log(np.exp(z - z.max()).sum())
    p = np.exp(log_p)
    entropy = float(-(p * log_p).sum())
    return entropy, float((p * log_p ** 2).sum() - entropy ** 2)


def reference_regime(entropy_bits: float, varentropy_bits: float) -> str:
    """entropix/sampler.py's branches with SamplerConfig's thresholds, in its order."""
    if entropy_bits < 0.1 and varentropy_bits < 0.1:
        return "argmax"
    if entropy_bits > 5.0 and varentropy_bits < 0.1:
        return "clarify"
    if entropy_bits < 5.0 and varentropy_bits > 5.0:
        return "explore"
    if entropy_bits > 3.0 and varentropy_bits > 5.0:
        return "resample"
    return "adaptive"


def mixture(*parts: tuple[float, int]) -> np.ndarray:
    """Logits of a distribution that spreads each (mass, tokens) part evenly over its tokens."""
    return np.log(np.concatenate([np.full(n, mass / n) for mass, n in parts]))


def test_surprisal_moments_matches_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 5.0, 30.0):
        logits = torch.randn(500, generator=generator) * scale
        entropy, varentropy = moments_nats(logits.numpy())
        got = surprisal_moments(logits)
        assert got == pytest.approx((entropy, varentropy), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("logits, regime, where", [
    (mixture((1 - 1e-5, 1), (1e-5, 9)), "argmax", lambda h, v: h < 0.1 and v < 0.1),
    (mixture((1.0, 64)), "clarify", lambda h, v: h == pytest.approx(6.0) and v < 1e-9),
    (mixture((0.9, 1), (0.1, 10_000)), "explore", lambda h, v: h < 5.0 and v > 5.0),
    (mixture((0.5, 16), (0.5, 100_000)), "resample", lambda h, v: h > 5.0 and v > 5.0),
    (mixture((1.0, 4)), "adaptive", lambda h, v: h == pytest.approx(2.0) and v < 1e-9),
    # both explore's and resample's conditions hold: explore is tested first, as in the reference
    (mixture((0.8, 2), (0.2, 5300)), "explore", lambda h, v: 3.0 < h < 5.0 and v > 5.0),
])
def test_the_regime_of_hand_built_distributions(logits, regime, where):
    entropy, varentropy = moments_nats(logits)
    bits = (entropy / LN2, varentropy / LN2 ** 2)
    assert where(*bits), bits  # the distribution is where the case says
    assert reference_regime(*bits) == regime
    got, got_entropy, got_varentropy = Entropix().decide(torch.tensor(logits, dtype=torch.float32))
    assert got == regime
    assert (got_entropy, got_varentropy) == pytest.approx((entropy, varentropy), rel=1e-4, abs=1e-6)


def test_the_regime_follows_the_reference_rule_over_many_distributions():
    """Random logits of many sharpnesses and tails: the decision is the reference's branch for their moments."""
    generator = torch.Generator().manual_seed(1)
    seen = set()
    for i in range(300):
        vocab = int(torch.randint(2, 4000, (), generator=generator))
        scale = float(torch.rand((), generator=generator)) ** 3 * 12  # near-uniform to very peaked
        logits = torch.randn(vocab, generator=generator) * scale
        if i % 2:
            logits[0] += float(torch.rand((), generator=generator)) * 25  # a leading token, sometimes dominant
        entropy, varentropy = moments_nats(logits.numpy())
        expected = reference_regime(entropy / LN2, varentropy / LN2 ** 2)
        # skip values within float32 rounding of a threshold, where the two computations may round apart
        edges = [abs(entropy / LN2 - t) for t in (0.1, 3.0, 5.0)] + [abs(varentropy / LN2 ** 2 - t) for t in (0.1, 5.0)]
        if min(edges) < 1e-3:
            continue
        assert Entropix().decide(logits)[0] == expected, (i, entropy / LN2, varentropy / LN2 ** 2)
        seen.add(expected)
    assert seen == {"argmax", "clarify", "explore", "resample", "adaptive"}


def test_the_argmax_regime_gives_the_argmax():
    generator = torch.Generator().manual_seed(2)
    decoder = Entropix()
    for _ in range(20):
        logits = torch.randn(300, generator=generator)
        best = int(torch.randint(300, (), generator=generator))
        logits[best] += 40.0  # p(best) ~ 1 - 300 e^-40: entropy and varentropy far below 0.1
        assert decoder.decide(logits)[0] == "argmax"
        assert int(decoder.choose(logits[None], generator)[0]) == best
        assert decoder.probabilities(logits[None])[0, best] == 1.0


def kept_tokens(z: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The tokens top-k, then top-p, then min-p keep of logits z / temperature (each on what the last kept)."""
    scaled = z / temperature
    kept = np.argsort(-scaled)[:top_k]
    p = np.exp(scaled[kept] - scaled[kept].max())
    p /= p.sum()
    kept = kept[np.cumsum(p) - p < top_p]
    p = np.exp(scaled[kept] - scaled[kept].max())
    return set(kept[p / p.sum() >= min_p * (p / p.sum()).max()].tolist())


@pytest.mark.parametrize("parts, regime, settings", [
    # resample: temperature max(2, 2 T) = 2, top-p max(0.5, 0.9); explore: temperature min(1.5, 1.2 T), top-k
    # int(1.5 * 27) = 40 (the reference's adjustments with its attention statistics at 0)
    (((0.5, 16), (0.5, 5000)), "resample", (2.0, 27, 0.9, 0.03)),
    (((0.5, 1), (0.3, 3), (0.2, 1000)), "explore", (0.666 * 1.2, 40, 0.9, 0.03)),
    (((1.0, 200),), "clarify", (0.666 * 1.3, 27, 0.9, 0.03)),
])
def test_sampling_regimes_draw_from_their_filtered_distribution(parts, regime, settings):
    generator = torch.Generator().manual_seed(3)
    z = mixture(*parts) + 0.05 * torch.randn(sum(n for _, n in parts), generator=generator).double().numpy()
    logits = torch.tensor(z, dtype=torch.float32)
    decoder = Entropix()
    assert decoder.decide(logits)[0] == regime
    allowed = kept_tokens(z, *settings)
    assert set(decoder.probabilities(logits[None])[0].nonzero().flatten().tolist()) == allowed
    draws = {int(decoder.choose(logits[None], generator)[0]) for _ in range(100)}
    assert draws <= allowed and len(draws) > 1


def test_a_run_on_a_tiny_model_records_one_regime_and_varentropy_per_token():
    model = wb.tiny("llama")
    run = wb.generate(model, "Hello there", decoder=Entropix(seed=5), record=["decoding", "logits"],
                      max_new_tokens=16, ignore_eos=True)
    trace = run.trace.isel(sequence=0)
    decisions = list(trace["decode_decision"].values)
    assert len(decisions) == len(run.token_ids) == 16
    logits = trace["logits"].values  # the logits each token was chosen from
    for step, decision in enumerate(decisions):
        entropy, varentropy = moments_nats(logits[step])
        assert decision == reference_regime(entropy / LN2, varentropy / LN2 ** 2)
        assert float(trace["varentropy"].values[step]) == pytest.approx(varentropy, rel=1e-4, abs=1e-6)
        if decision == "argmax":
            assert run.token_ids[step] == int(logits[step].argmax())
    again = wb.generate(model, "Hello there", decoder=Entropix(seed=5), max_new_tokens=16, ignore_eos=True)
    assert again.token_ids == run.token_ids  # seeded: the same tokens


def test_bad_parameters_are_refused():
    with pytest.raises(ParameterError, match="temperature"):
        Entropix(temperature=0.0)
    with pytest.raises(ParameterError, match="top_p"):
        Entropix(top_p=0.0)
