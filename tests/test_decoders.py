"""Decoders against hand-checked distributions."""

import pytest
import torch

import workbench as wb

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))


def test_greedy_is_argmax():
    logits = torch.randn(4, 100)
    assert torch.equal(wb.decode.get("greedy").choose(logits), logits.argmax(-1))


def test_top_k_keeps_the_k_largest():
    probs = wb.decode.get("sample", top_k=2).probabilities(LOGITS)
    torch.testing.assert_close(probs, torch.tensor([[2 / 3, 1 / 3, 0, 0, 0]]))
    logits = torch.randn(3, 50) * 5
    assert torch.equal(wb.decode.get("sample", top_k=1).choose(logits), logits.argmax(-1))


def test_top_p_keeps_the_smallest_nucleus():
    # 0.5 + 0.25 = 0.75 < 0.8, so the nucleus needs the third token as well
    probs = wb.decode.get("sample", top_p=0.8).probabilities(LOGITS)
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.25, 0.15, 0, 0]]) / 0.9)
    probs = wb.decode.get("sample", top_p=0.75).probabilities(LOGITS)
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.25, 0, 0, 0]]) / 0.75)
    assert wb.decode.get("sample", top_p=1e-6).probabilities(LOGITS)[0, 0] == 1.0  # the top token always stays


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    probs = wb.decode.get("sample", min_p=0.3).probabilities(LOGITS)  # threshold 0.15: keeps 0.5, 0.25, 0.15
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.25, 0.15, 0, 0]]) / 0.9)


def test_temperature_sharpens_and_flattens():
    cold = wb.decode.get("sample", temperature=0.5).probabilities(LOGITS)
    hot = wb.decode.get("sample", temperature=2.0).probabilities(LOGITS)
    torch.testing.assert_close(cold, torch.softmax(LOGITS * 2, -1))
    torch.testing.assert_close(hot, torch.softmax(LOGITS / 2, -1))


def test_greedy_draws_from_a_point_mass():
    logits = torch.randn(3, 20)
    probs = wb.decode.get("greedy").probabilities(logits)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 20).float())


def test_samples_follow_the_filtered_distribution():
    decoder = wb.decode.get("sample", top_k=4, seed=123)
    generator = torch.Generator().manual_seed(123)
    draws = torch.stack([decoder.choose(LOGITS, generator) for _ in range(4000)]).flatten()
    frequencies = torch.bincount(draws, minlength=5).float() / len(draws)
    expected = decoder.probabilities(LOGITS)[0]
    assert frequencies[4] == 0  # filtered out by top-k
    # 4000 draws: the standard error of each frequency is below 0.008; allow 4 of them
    assert torch.allclose(frequencies, expected, atol=0.032)


def test_same_seed_same_draws_and_fresh_seed_option(tiny_llama):
    def draws(seed):
        return wb.generate(tiny_llama, "abc", decoder=wb.decode.get("sample", seed=seed), max_new_tokens=30,
                           ignore_eos=True).token_ids

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert draws(None) != draws(None)  # seed=None: a fresh seed each run


def test_one_decoder_serves_runs_at_once_with_their_own_random_state(tiny_llama):
    """The run owns the generator: two runs interleaved on one decoder object draw what each would alone."""
    decoder = wb.decode.get("sample", seed=3)
    alone = wb.generate(tiny_llama, "abc", decoder=decoder, max_new_tokens=12, ignore_eos=True).token_ids
    seen = []

    def inner(event):
        if event.step == 5 and not seen:  # a second run on the same decoder in the middle of the first
            seen.append(wb.generate(tiny_llama, "abc", decoder=decoder, max_new_tokens=12,
                                    ignore_eos=True).token_ids)

    outer = wb.generate(tiny_llama, "abc", decoder=decoder, max_new_tokens=12, ignore_eos=True, stream=inner)
    assert outer.token_ids == alone and seen == [alone]


# -- the sampling family against transformers' logits processors (an independent implementation) -----------------
def _hf(processors, logits):
    for processor in processors:
        logits = processor(None, logits)
    return torch.softmax(logits, dim=-1)


def _family_cases():
    from transformers.generation import logits_process as lp

    return [
        ({"name": "sample", "top_k": 7}, [lp.TopKLogitsWarper(7)]),
        ({"name": "sample", "top_p": 0.8}, [lp.TopPLogitsWarper(0.8)]),
        ({"name": "sample", "min_p": 0.1}, [lp.MinPLogitsWarper(0.1)]),
        ({"name": "typical", "typical_p": 0.7}, [lp.TypicalLogitsWarper(0.7)]),
        ({"name": "typical", "typical_p": 0.2}, [lp.TypicalLogitsWarper(0.2)]),
        ({"name": "epsilon", "epsilon": 0.02}, [lp.EpsilonLogitsWarper(0.02)]),
        ({"name": "epsilon", "epsilon": 0.3}, [lp.EpsilonLogitsWarper(0.3)]),
        ({"name": "eta", "epsilon": 0.05}, [lp.EtaLogitsWarper(0.05)]),
        ({"name": "eta", "epsilon": 0.0009}, [lp.EtaLogitsWarper(0.0009)]),
        ({"name": "typical", "typical_p": 0.8, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.05},
         [lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(20), lp.TopPLogitsWarper(0.9),
          lp.MinPLogitsWarper(0.05), lp.TypicalLogitsWarper(0.8)]),
        ({"name": "eta", "epsilon": 0.01, "temperature": 1.5, "top_k": 30},
         [lp.TemperatureLogitsWarper(1.5), lp.TopKLogitsWarper(30), lp.EtaLogitsWarper(0.01)]),
    ]


@pytest.mark.parametrize("index", range(11))
def test_filtered_distributions_equal_transformers_logits_processors(index):
    params, processors = _family_cases()[index]
    params = dict(params)
    decoder = wb.decode.get(params.pop("name"), **params)
    generator = torch.Generator().manual_seed(index)
    # rows from nearly flat to sharply peaked, so every rule keeps anywhere from one token to all of them
    logits = torch.randn(8, 64, generator=generator) * torch.tensor([0.1, 0.5, 1, 2, 3, 5, 8, 12])[:, None]
    ours, theirs = decoder.probabilities(logits), _hf(processors, logits.clone())
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert torch.equal(ours > 0, theirs > 0)  # the same tokens kept, not just similar probabilities


def test_typical_keeps_the_tokens_nearest_the_entropy_first():
    # entropy of [0.5, 0.25, 0.15, 0.07, 0.03] is 1.27 nats; |-log p - H| = 0.58, 0.11, 0.62, 1.39, 2.24: the
    # second token is the most typical, then the first, then the third
    probs = wb.decode.get("typical", typical_p=0.2).probabilities(LOGITS)
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1.0, 0, 0, 0]]))
    probs = wb.decode.get("typical", typical_p=0.7).probabilities(LOGITS)  # 0.25 + 0.5 = 0.75 reaches 0.7
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.25, 0, 0, 0]]) / 0.75)


def test_eta_cutoff_falls_as_entropy_rises():
    # eta = min(eps, sqrt(eps) * exp(-H)); H = 1.27 nats: sqrt(0.1) * exp(-1.27) = 0.089 < 0.1, so 0.07 and 0.03 go
    probs = wb.decode.get("eta", epsilon=0.1).probabilities(LOGITS)
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.25, 0.15, 0, 0]]) / 0.9)
    probs = wb.decode.get("epsilon", epsilon=0.1).probabilities(LOGITS)  # the plain cut-off: the same three
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.25, 0.15, 0, 0]]) / 0.9)
    flat = torch.zeros(1, 1000)  # H = ln 1000 = 6.9: eta = sqrt(0.1) * 0.001 = 3.2e-4 < 1e-3, so nothing goes
    assert (wb.decode.get("eta", epsilon=0.1).probabilities(flat) > 0).all()


@pytest.mark.parametrize("name, params, message", [
    ("typical", {"typical_p": 0.0}, "typical_p' must be in \\(0, 1\\]"),
    ("typical", {"typical_p": 1.5}, "typical_p"),
    ("epsilon", {"epsilon": 0.0}, "epsilon' must be in \\(0, 1\\)"),
    ("eta", {"epsilon": 1.0}, "epsilon' must be in \\(0, 1\\)"),
])
def test_thresholds_out_of_range_are_refused_in_one_line(name, params, message):
    with pytest.raises(wb.ParameterError, match=message) as caught:
        wb.decode.get(name, **params)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["typical", "epsilon", "eta"])
def test_the_sampling_family_generates_reproducibly(tiny_llama, name):
    decoder = wb.decode.get(name, seed=5)
    first = wb.generate(tiny_llama, "hello", decoder=decoder, max_new_tokens=8, ignore_eos=True)
    again = wb.generate(tiny_llama, "hello", decoder=decoder, max_new_tokens=8, ignore_eos=True)
    assert first.token_ids == again.token_ids and len(first.token_ids) == 8
