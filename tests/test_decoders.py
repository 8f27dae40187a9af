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
    assert len(draws(None)) == 30


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
