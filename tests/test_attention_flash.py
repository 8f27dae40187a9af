"""The `flash` attention variant inside real models, against `sdpa`: same greedy tokens, same recorded entropy
and attention rows, same cache decisions from its key mass. On CPU it runs the kernel's torch reference; the
kernel itself is checked in test_kernels_flash_attention.py."""

import warnings

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.attention.base import AttentionCall
from workbench.attention.flash import Flash
from workbench.attention.reference import dense_attention

RAW = "The quick brown fox jumps over the lazy dog. Then the fox"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_greedy_tokens_and_entropy_match_sdpa(tiny_llama):
    flash = wb.generate(tiny_llama, RAW, attention=Flash(), max_new_tokens=8, record=["entropy", "logits"],
                        ignore_eos=True)
    sdpa = wb.generate(tiny_llama, RAW, attention="sdpa", max_new_tokens=8, record=["entropy", "logits"],
                       ignore_eos=True)
    assert flash.token_ids == sdpa.token_ids
    for name in ("logits", "entropy", "attention_entropy", "prompt_attention_entropy"):
        np.testing.assert_allclose(flash.steps[name].values, sdpa.steps[name].values, atol=1e-4, rtol=1e-4)


def test_recorded_attention_rows_for_chosen_heads(tiny_llama):
    record = {"attention": {"layers": [0], "heads": [1]}, "entropy": True}
    flash = wb.generate(tiny_llama, RAW, attention=Flash(), max_new_tokens=4, record=record)
    sdpa = wb.generate(tiny_llama, RAW, attention="sdpa", max_new_tokens=4, record=record)
    for name in ("attention", "prompt_attention"):
        assert flash.steps[name].sizes["attn_head"] == 1
        np.testing.assert_allclose(flash.steps[name].values, sdpa.steps[name].values, atol=1e-5, equal_nan=True)


def test_key_mass_drives_an_eviction_cache_like_sdpa(tiny_llama):
    runs = [wb.generate(tiny_llama, RAW, attention=attention, cache=wb.cache.get("h2o", budget=24, sinks=2, window=8),
                        max_new_tokens=8, record=["cache"], ignore_eos=True) for attention in (Flash(), "sdpa")]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].steps["cache_tokens"].values.max() <= 24 < len(runs[0].prompt_ids)  # it did evict
    np.testing.assert_array_equal(runs[0].steps["cache_evicted_at"].values, runs[1].steps["cache_evicted_at"].values)


def call_for(query, key, value, mask=None, **kwargs):
    return AttentionCall(0, query, key, value, mask, query.shape[-1] ** -0.5, None, kwargs)


def random_call(head_dim=64, q_len=5, k_len=12, **kwargs):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, q_len, head_dim, generator=generator)
    key, value = (torch.randn(1, 2, k_len, head_dim, generator=generator) for _ in range(2))
    return call_for(query, key, value, **kwargs)


def test_statistics_and_selected_heads_match_dense_attention():
    call = random_call()
    mask = torch.rand(1, 1, 5, 12, generator=torch.Generator().manual_seed(1)) < 0.7
    mask[..., -1] = True
    for call_mask in (None, mask):
        call.mask, call.probs_heads = call_mask, (3, 0)
        result = Flash().attend(call, frozenset({"entropy", "probs", "key_mass"}))
        output, expected = dense_attention(call, frozenset({"entropy", "probs", "key_mass"}))
        torch.testing.assert_close(result.output, output)
        torch.testing.assert_close(result.entropy, expected["entropy"])
        torch.testing.assert_close(result.key_mass, expected["key_mass"])
        torch.testing.assert_close(result.probs, expected["probs"][:, [3, 0]])
    assert Flash().attend(call, frozenset()).entropy is None


def test_unsupported_head_dim_fails_clearly_on_cpu():
    with pytest.raises(wb.ParameterError, match=r"head_dim 32 is not supported by the flash kernel"):
        Flash().attend(random_call(head_dim=32), frozenset())


def test_softcap_falls_back_to_dense_attention_with_a_warning():
    call = random_call(softcap=5.0)
    with pytest.warns(RuntimeWarning, match="softcap"):
        result = Flash().attend(call, frozenset({"entropy"}))
    output, expected = dense_attention(call, frozenset({"entropy"}))
    torch.testing.assert_close(result.output, output)
    torch.testing.assert_close(result.entropy, expected["entropy"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once per reason
        Flash().attend(call, frozenset())


@pytest.mark.embedded
def test_embedded_greedy_and_entropy_match_sdpa(embedded):
    flash = wb.generate(embedded, CHAT, attention=Flash(), max_new_tokens=12, record=["entropy"])
    sdpa = wb.generate(embedded, CHAT, attention="sdpa", max_new_tokens=12, record=["entropy"])
    assert flash.token_ids == sdpa.token_ids
    np.testing.assert_allclose(flash.steps["attention_entropy"].values, sdpa.steps["attention_entropy"].values,
                               atol=1e-3, rtol=1e-3)
