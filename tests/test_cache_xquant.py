"""`xquant` (XQuant, Tomar et al., 2025): the cached layer input X (or its SVD latents) against X captured here by a
hook of the test's own; codes against an independent min/max quantizer written here; rematerialized keys and
values against transformers' own (the full cache's); bytes that are the stored tensors' sizes and the arithmetic;
bad parameters."""

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.cache.xquant import XQuant
from workbench.cache.xquant_store import XQuantStore
from workbench.errors import ParameterError

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 byte tokens on the tiny models


# -- independent references ---------------------------------------------------------------------------------------
def minmax_round_trip(x: np.ndarray, bits: int, group: int, axis: str) -> np.ndarray:
    """x (tokens, width) quantized and dequantized with asymmetric min/max codes: 'channel' groups G consecutive
    tokens of one channel, 'token' G consecutive channels of one token; scale and zero rounded to float16."""
    x = x.astype(np.float64)
    t, w = x.shape
    g = x.reshape(t // group, group, w) if axis == "channel" else x.reshape(t, w // group, group)
    reduce = 1 if axis == "channel" else 2
    low, high = g.min(reduce, keepdims=True), g.max(reduce, keepdims=True)
    scale = ((high - low) / (2 ** bits - 1)).astype(np.float16).astype(np.float64)
    zero = low.astype(np.float16).astype(np.float64)
    code = np.clip(np.round((g - zero) / np.where(scale == 0, 1, scale)), 0, 2 ** bits - 1)
    code = np.where(scale == 0, 0, code)
    return (code * scale + zero).reshape(t, w)


def layer_inputs(model, ids) -> list[torch.Tensor]:
    """Per layer, the post-norm input of attention (tokens, hidden): the input_layernorm's output, via a forward
    hook of this test's own on a plain forward without any cache."""
    captured, handles = {}, []
    for i, layer in enumerate(model.hf.model.layers):
        handles.append(layer.input_layernorm.register_forward_hook(
            lambda module, args, out, i=i: captured.__setitem__(i, out[0].detach().clone())))
    try:
        with torch.inference_mode():
            model.hf(torch.tensor([ids]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in range(len(captured))]


def prefilled(model, cache, ids):
    session = wb.Session(model, cache)
    session.feed(ids, "prefill", logits="none")
    return session


def tensors(store: XQuantStore) -> list[torch.Tensor]:
    return [t for side in store.streams for t in (side.codes, side.scale, side.zero, side.rows) if t is not None]


# -- what is stored -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_x_is_stored_quantized_per_channel_as_an_independent_quantizer_does(tiny_llama, bits):
    ids = tiny_llama.tokenizer(PROMPT)["input_ids"]
    xs = layer_inputs(tiny_llama, ids)
    with prefilled(tiny_llama, wb.cache.get("xquant", bits=bits, group=32, residual=32), ids) as session:
        for layer, x in zip(session.cache.layers, xs):
            store = layer.store
            assert store.remat.form == "x" and len(store.streams) == 1  # tiny: X (128) narrower than K + V (256)
            assert store.seen == len(ids)  # X came from the attention's input, not from the keys
            side = store.streams[0]
            assert side.quantized == len(ids) // 32 * 32 and side.held == len(ids) % 32
            got = side.view()[0].double().numpy()
            want = minmax_round_trip(x[:side.quantized].numpy(), bits, 32, "channel")
            np.testing.assert_allclose(got[:side.quantized], want, atol=1e-5, rtol=1e-5)
            np.testing.assert_array_equal(got[side.quantized:], x[side.quantized:].numpy())  # residual: exact


def test_gqa_latents_are_the_svd_of_the_projections_and_the_value_latent_is_per_token(tiny_llama):
    ids = tiny_llama.tokenizer(PROMPT)["input_ids"]
    xs = layer_inputs(tiny_llama, ids)
    with prefilled(tiny_llama, wb.cache.get("xquant", bits=4, group=32, residual=32, form="svd"), ids) as session:
        for layer, x, module in zip(session.cache.layers, xs, (l.self_attn for l in tiny_llama.hf.model.layers)):
            remat, (key_side, value_side) = layer.store.remat, layer.store.streams
            for down, up, proj in ((remat.down_k, remat.up_k, module.k_proj), (remat.down_v, remat.up_v,
                                                                              module.v_proj)):
                torch.testing.assert_close(down.T @ down, torch.eye(down.shape[1]), atol=1e-5, rtol=0)  # U's columns
                torch.testing.assert_close(down @ up, proj.weight.detach().T, atol=1e-5, rtol=1e-5)  # U S B^T = W^T
            q = value_side.quantized
            latent = (x.double() @ remat.down_v.double()).numpy()
            want = minmax_round_trip(latent[:q], 4, 32, "token")
            np.testing.assert_allclose(value_side.view()[0][:q].double().numpy(), want, atol=1e-4, rtol=1e-4)
            assert key_side.layout == "per_channel" and value_side.layout == "per_token"


def test_unquantized_rematerialized_keys_and_values_are_transformers_own(tiny_models):
    for family in ("llama", "qwen3", "gemma2"):  # qwen3: k_norm; gemma2: a sliding-window layer
        model = tiny_models[family]
        ids = model.tokenizer(PROMPT)["input_ids"]
        with prefilled(model, "full", ids) as session:
            reference = [layer.store.view() for layer in session.cache.layers]
        for form in ("x", "svd"):
            with prefilled(model, wb.cache.get("xquant", residual=512, group=64, form=form), ids) as session:
                for layer, (k, v) in zip(session.cache.layers, reference):
                    keys, values = layer.store.view()
                    torch.testing.assert_close(keys, k, atol=1e-4, rtol=1e-4)
                    torch.testing.assert_close(values, v, atol=1e-4, rtol=1e-4)


def test_a_pass_whose_x_was_not_seen_recovers_the_streams_from_its_keys(tiny_llama):
    ids = tiny_llama.tokenizer(PROMPT)["input_ids"]
    with prefilled(tiny_llama, "full", ids) as session:
        k, v = session.cache.layers[0].store.view()
    for form in ("x", "svd"):
        store = XQuant(residual=512, group=64, form=form).build(tiny_llama).layers[0].store
        store.append(k[0], v[0], 0)  # as a replayed prefill does: no X staged
        assert store.seen == 0
        keys, values = store.view()
        torch.testing.assert_close(keys, k, atol=1e-3, rtol=1e-3)  # float32 solves: measured 2.5e-4 at most
        torch.testing.assert_close(values, v, atol=1e-3, rtol=1e-3)


# -- bytes ------------------------------------------------------------------------------------------------------------
def test_bytes_are_the_stored_tensors_and_half_the_full_cache_for_x(tiny_llama):
    ids = tiny_llama.tokenizer(PROMPT)["input_ids"]
    n, bits, group = len(ids), 4, 32
    text = tiny_llama.text_config
    layers, hidden, kv = text.num_hidden_layers, text.hidden_size, text.num_key_value_heads * text.head_dim
    with prefilled(tiny_llama, "full", ids) as session:
        full = session.cache.nbytes()
    assert full == layers * 2 * kv * 4 * n  # K and V, float32, exactly the prompt
    with prefilled(tiny_llama, wb.cache.get("xquant", bits=bits, group=group, residual=group), ids) as session:
        cache = session.cache
        stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in tensors(layer.store))
        assert cache.nbytes() == stored == sum(cache.nbytes_by_component().values())
        quantized = n // group * group  # 128 of 135
        for layer in cache.layers:
            side = layer.store.streams[0]
            codes = quantized * hidden * bits // 8
            scales_zeros = 2 * (quantized // group) * hidden * 2  # float16, one per channel per group of tokens
            residual = side.rows.shape[1] * hidden * 4  # float32 rows, a few spare (slack) ones
            assert side.rows.shape[1] < group + 16
            assert layer.store.nbytes() == codes + scales_zeros + residual
        # X is half as wide as K + V here: 4 bits + 2 * 16 / 32 bits of scale and zero per element, over 2 x 32
        # bits, on the quantized tokens: at most (5 / 64) * full plus the residual rows
        assert cache.nbytes() < full * 5 / 64 + layers * (group + 16) * hidden * 4
        assert cache.nbytes() < full / 4  # measured 4.5x fewer bytes (61440 of 276480)


# -- parameters -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,needle", [({"bits": 3}, "bits"), ({"residual": 48, "group": 32}, "multiple"),
                                           ({"form": "latent"}, "form")])
def test_bad_parameters_are_one_line_errors(params, needle):
    with pytest.raises(ParameterError) as error:
        wb.cache.get("xquant", **params)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_a_group_that_does_not_divide_the_latent_is_refused_at_build(tiny_llama):
    with pytest.raises(ParameterError) as error:
        wb.cache.get("xquant", group=48, residual=96, form="svd").build(tiny_llama)
    assert "divide the latent width 128" in str(error.value) and "\n" not in str(error.value)


# -- the embedded model -----------------------------------------------------------------------------------------------
@pytest.mark.embedded
def test_eight_bits_follow_the_full_cache_on_the_embedded_model(embedded):
    prompt = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"
    ids = embedded.tokenizer(prompt)["input_ids"]  # 19 tokens: with G = R = 8, 16 of them quantized
    policy = wb.cache.get("xquant", bits=8, group=8, residual=8)
    with prefilled(embedded, "full", ids) as session:
        reference = [layer.store.view() for layer in session.cache.layers]
    with prefilled(embedded, policy, ids) as session:
        for layer, (k, v) in zip(session.cache.layers, reference):
            assert layer.store.remat.form == "svd"  # GQA: X (576) wider than K + V (2 x 3 x 64)
            assert layer.store.streams[0].quantized == 16
            keys, values = layer.store.view()
            assert float((keys - k).norm() / k.norm()) < 0.01  # measured 0.003 at most
            assert float((values - v).norm() / v.norm()) < 0.01
    full = wb.generate(embedded, prompt, max_new_tokens=8, ignore_eos=True)
    run = wb.generate(embedded, prompt, cache=policy, max_new_tokens=8, ignore_eos=True)
    assert run.token_ids == full.token_ids
