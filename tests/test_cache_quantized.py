"""Packed quantized stores (`kivi`, `int_per_token`): the quantizer against an independent one written here, KIVI's
flush rules, bytes that are the packed tensors' sizes, transactions that restore exactly, and the full cache's
tokens reproduced at 8 bits or with a residual covering the sequence."""

from pathlib import Path

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.kernels.quantization import BITS, LAYOUTS, bits_per_element, dequantize, quantize
from workbench.cache.quantized_store import KiviStore, PerTokenStore

from transaction_checks import (assert_same, check_a_verify_pass_committed_in_part_equals_one_by_one,
                                check_rollback_restores_the_exact_state_at_any_mark, greedy)

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 byte tokens on the tiny models


# -- an independent quantizer: numpy float32, loops over the groups, bytes packed with integer arithmetic --------
def reference_quantize(x: np.ndarray, bits: int, group: int, layout: str):
    heads, tokens, dim = x.shape
    levels = 2 ** bits - 1
    per_channel = layout == "per_channel"
    shape = (heads, tokens // group, dim) if per_channel else (heads, tokens, dim // group)
    scale, zero = np.zeros(shape, np.float16), np.zeros(shape, np.float16)
    code = np.zeros(x.shape, np.int64)
    for h in range(heads):
        for a in range(shape[1]):
            for b in range(shape[2]):
                where = (h, slice(a * group, (a + 1) * group), b) if per_channel else \
                    (h, a, slice(b * group, (b + 1) * group))
                values = x[where]
                low, high = values.min(), values.max()
                s, z = np.float16((high - low) / np.float32(levels)), np.float16(low)
                scale[h, a, b], zero[h, a, b] = s, z
                if s == 0:
                    code[where] = 0
                else:
                    code[where] = np.clip(np.rint((values - np.float32(z)) / np.float32(s)), 0, levels)
    per_byte = 8 // bits
    packed = np.zeros((heads, tokens, dim // per_byte), np.uint8)
    for c in range(dim):  # channel c: byte c // per_byte, bit offset (c % per_byte) * bits
        packed[..., c // per_byte] += (code[..., c] << ((c % per_byte) * bits)).astype(np.uint8)
    return packed, scale, zero, code


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_matches_an_independent_quantizer(layout, bits):
    torch.manual_seed(bits)
    x = torch.randn(2, 16, 32) * torch.linspace(0.1, 4, 32)  # channels of different ranges
    x[1, :8, 3] = 0.5  # a constant key group (per_channel) ...
    x[0, 5, 8:16] = -1.0  # ... and a constant value group (per_token): scale 0, decoded exactly
    codes, scale, zero = quantize(x, bits, 8, layout)
    packed, ref_scale, ref_zero, ref_code = reference_quantize(x.numpy(), bits, 8, layout)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 16, 32 * bits // 8)
    assert np.array_equal(codes.numpy(), packed)
    assert np.array_equal(scale.numpy(), ref_scale) and np.array_equal(zero.numpy(), ref_zero)
    x_hat = dequantize(codes, scale, zero, bits, 8, layout)
    axis = 1 if layout == "per_channel" else 2
    expected = (ref_code * ref_scale.astype(np.float32).repeat(8, axis)
                + ref_zero.astype(np.float32).repeat(8, axis))
    np.testing.assert_allclose(x_hat.numpy(), expected, rtol=1e-6, atol=1e-6)
    step = torch.from_numpy(ref_scale.astype(np.float32).repeat(8, axis))
    assert ((x_hat - x).abs() <= step / 2 + 2e-3 * x.abs().amax()).all()  # within half a step (fp16 zero aside)
    constant = x_hat[1, :8, 3] if layout == "per_channel" else x_hat[0, 5, 8:16]  # its group's one value
    assert (constant == constant[0]).all() and float(constant[0]) in (0.5, -1.0)


def test_bits_per_element_from_the_arithmetic():
    assert bits_per_element(2, 32) == 3.0  # KIVI-2, G = 32, float16 scale and zero: 2 + 2 * 16 / 32
    assert bits_per_element(4, 32) == 5.0 and bits_per_element(4, 64) == 4.5 and bits_per_element(8, 64) == 8.5
    assert KiviStore(2, 32, 128).bits_per_element() == 3.0 and PerTokenStore(4, 64, 128).bits_per_element() == 4.5


# -- the stores ----------------------------------------------------------------------------------------------------
def kivi_reference_counts(prompt: int, steps: int, residual: int):
    """(quantized keys, quantized values) after each step, by jy-yuan/KIVI models/llama_kivi.py's rules: the
    prompt keeps L mod R keys and min(L, R) values in full precision; each decoded key joins the key residual,
    which is quantized whole when it reaches R; each decoded value joins the value residual, whose oldest value is
    quantized when it holds R + 1."""
    keys = prompt - prompt % residual
    values = max(0, prompt - residual)
    counts = [(keys, values)]
    full_keys, full_values = prompt - keys, prompt - values
    for _ in range(steps):
        full_keys += 1
        if full_keys == residual:
            keys, full_keys = keys + residual, 0
        full_values += 1
        if full_values > residual:
            values, full_values = values + 1, full_values - 1
        counts.append((keys, values))
    return counts


def test_kivi_flushes_as_its_reference_code():
    store, data = KiviStore(2, 8, 16), torch.randn(2, 90, 64)
    store.append(data[:, :37], data[:, :37] + 1, 0)
    store.settle()
    counts = [(store.keys.quantized, store.values.quantized)]
    for t in range(37, 90):
        store.append(data[:, t:t + 1], data[:, t:t + 1] + 1, t)
        store.settle()
        counts.append((store.keys.quantized, store.values.quantized))
    assert counts == kivi_reference_counts(37, 53, 16)
    assert store.keys.held == 90 % 16 and store.values.held == 16


@pytest.mark.parametrize("store_class", [KiviStore, PerTokenStore])
def test_settling_tokens_at_once_equals_one_at_a_time(store_class):
    """A pass of many tokens (a prompt, a committed verify tail) leaves what the same tokens one by one leave."""
    data = torch.randn(2, 75, 64)
    together, one_by_one = store_class(4, 8, 16), store_class(4, 8, 16)
    together.append(data, -data, 0)
    together.settle()
    for t in range(75):
        one_by_one.append(data[:, t:t + 1], -data[:, t:t + 1], t)
        one_by_one.settle()
    for a, b in zip(together.sides, one_by_one.sides):
        assert (a.quantized, a.held) == (b.quantized, b.held)
        for x, y in zip(a.quantized_part(), b.quantized_part()):
            assert torch.equal(x, y)
        assert torch.equal(a.residual_part(), b.residual_part())


def test_per_token_store_flushes_the_residual_when_it_reaches_r():
    store, data = PerTokenStore(4, 64, 16), torch.randn(2, 40, 64)
    store.append(data[:, :20], data[:, :20], 0)
    store.settle()
    assert [(s.quantized, s.held) for s in store.sides] == [(16, 4)] * 2
    for t in range(20, 32):
        store.append(data[:, t:t + 1], data[:, t:t + 1], t)
        store.settle()
    assert [(s.quantized, s.held) for s in store.sides] == [(32, 0)] * 2


def test_view_is_the_dequantized_part_then_the_residual_and_packed_is_what_the_kernel_reads():
    from workbench.kernels.packed_decode import packed_decode_reference

    store, keys, values = KiviStore(2, 8, 16), torch.randn(2, 45, 64), torch.randn(2, 45, 64)
    store.append(keys, values, 0)
    store.settle()  # keys: 32 quantized, 13 in full precision; values: 29 quantized, 16
    k, v = store.view()
    codes, scale, zero = store.keys.quantized_part()
    assert torch.equal(k[0, :, :32], dequantize(codes, scale, zero, 2, 8, "per_channel"))
    assert torch.equal(k[0, :, 32:], keys[:, 32:]) and torch.equal(v[0, :, 29:], values[:, 29:])
    layer = store.packed()  # both sides over the same first T tokens (whole key groups): T = 24
    assert layer.keys.tokens == layer.values.tokens == 24 and layer.residual_keys.shape[1] == 21
    torch.testing.assert_close(torch.cat([layer.keys.dequantize(), layer.residual_keys], 1), k[0])
    torch.testing.assert_close(torch.cat([layer.values.dequantize(), layer.residual_values], 1), v[0])
    query = torch.randn(4, 64)
    out = packed_decode_reference(query, layer.keys, layer.values, layer.residual_keys, layer.residual_values,
                                  scaling=0.125)
    scores = torch.einsum("hd,htd->ht", query, k[0].repeat_interleave(2, 0)) / 8.0
    dense = torch.einsum("ht,htd->hd", torch.softmax(scores, -1), v[0].repeat_interleave(2, 0))
    torch.testing.assert_close(out.output, dense, atol=1e-4, rtol=1e-4)


def test_nbytes_is_the_packed_tensors_and_bits_follow_the_arithmetic():
    store, x = KiviStore(2, 32, 128), torch.randn(3, 512, 64)
    store.append(x, x, 0)
    store.settle()  # keys: all 512 quantized; values: 384, the newest 128 in full precision
    tensors = [t for side in store.sides for t in (side.codes, side.scale, side.zero, side.rows)]
    assert store.nbytes() == sum(t.numel() * t.element_size() for t in tensors)
    parts = store.nbytes_by_component()
    assert parts["codes"] == (512 + 384) * 3 * 64 * 2 // 8  # exactly 2 bits per element (first flush: no slack)
    elements = (512 + 384) * 3 * 64
    assert 8 * (parts["scales"] + parts["zeros"]) == elements * 1  # 2 * 16 / 32 bits per element
    assert 8 * (parts["codes"] + parts["scales"] + parts["zeros"]) / elements == store.bits_per_element() == 3.0
    assert parts["residual"] == 2 * 3 * (128 + 8) * 64 * 4  # R + slack rows per side, float32 (the prompt's freed)
    assert store.bits_per_element_held() == 8 * store.nbytes() / (2 * 3 * 512 * 64)


def test_crop_of_the_residual_is_exact_and_below_it_keeps_the_sequence():
    store, x = KiviStore(4, 8, 16), torch.randn(2, 50, 64)
    store.append(x, -x, 0)
    store.settle()  # keys: 48 quantized + 2; values: 34 + 16
    before = [t.clone() for t in store.view()]
    store.append(torch.randn(2, 5, 64), torch.randn(2, 5, 64), 50)  # an unsettled (provisional) tail
    store.crop(50, [50, 50])
    assert all(torch.equal(a, b) for a, b in zip(store.view(), before))
    store.crop(43, [43, 43])  # committed, quantized tokens (transformers' crop): the cut key group is dequantized
    k, v = store.view()
    assert k.shape[2] == v.shape[2] == 43 and store.keys.quantized == 40 and store.keys.held == 3
    assert torch.equal(k, before[0][:, :, :43]) and torch.equal(v, before[1][:, :, :43])


def test_keep_drops_provisional_tokens_only():
    store, x = PerTokenStore(8, 64, 16), torch.randn(2, 40, 64)
    store.append(x, x, 0)
    store.settle()  # 32 quantized, 8 held
    store.append(x[:, :4] * 2, x[:, :4] * 3, 40)
    k, v = store.view()
    alive = torch.ones(2, 44, dtype=torch.bool)
    alive[:, [41, 43]] = False
    store.keep(alive, [42, 42])
    k2, v2 = store.view()
    assert torch.equal(k2, k[:, :, alive[0]]) and torch.equal(v2, v[:, :, alive[0]])
    alive = torch.ones(2, 42, dtype=torch.bool)
    alive[:, 3] = False
    with pytest.raises(wb.WorkbenchError, match="cannot drop quantized tokens"):
        store.keep(alive, [41, 41])


# -- policies on models --------------------------------------------------------------------------------------------
def test_bad_parameters_fail_clearly(tiny_llama):
    with pytest.raises(wb.ParameterError, match="cache 'kivi' parameter 'bits' is 3; allowed: 2, 4, 8"):
        wb.cache.get("kivi", bits=3)
    with pytest.raises(wb.ParameterError, match="'int_per_token' parameter 'bits' is 1; allowed: 2, 4, 8"):
        wb.cache.get("int_per_token", bits=1)
    with pytest.raises(wb.ParameterError, match="residual R=16 is smaller than the group G=32: R must be a multiple"):
        wb.cache.get("kivi", residual=16)
    with pytest.raises(wb.ParameterError, match="R=100 is not a multiple of the group G=32 .* e.g. 96 or 128"):
        wb.cache.get("kivi", residual=100)
    with pytest.raises(wb.ParameterError, match="'group' is 48: it must divide the model's head dimension 64 .*"
                                                "allowed: 1, 2, 4, 8, 16, 32, 64"):
        wb.cache.get("int_per_token", group=48).build(tiny_llama)
    with pytest.raises(wb.ParameterError, match="'group' is 96: it must divide"):
        wb.cache.get("kivi", group=96, residual=96).build(tiny_llama)


@pytest.mark.parametrize("name", ["kivi", "int_per_token"])
def test_a_residual_covering_the_sequence_reproduces_the_full_cache_exactly(tiny_models, name):
    for family in ("llama", "qwen3_moe", "gemma2"):
        model = tiny_models[family]
        full = wb.generate(model, PROMPT, max_new_tokens=8, ignore_eos=True, record=["logits", "cache"])
        run = wb.generate(model, PROMPT, cache=wb.cache.get(name, residual=256), max_new_tokens=8,
                          ignore_eos=True, record=["logits", "cache"])
        assert run.token_ids == full.token_ids
        torch.testing.assert_close(torch.from_numpy(run.steps["logits"].values),
                                   torch.from_numpy(full.steps["logits"].values), atol=1e-5, rtol=1e-5)
        assert (run.steps["cache_evicted_at"] == -1).all()


def test_plain_hf_generate_runs_over_the_quantized_cache(tiny_llama):
    """No workbench attention needed: transformers' own generate, the same tokens as workbench.generate."""
    policy = wb.cache.get("kivi", group=8, residual=16)
    ids = tiny_llama.encode(PROMPT)
    cache = policy.build(tiny_llama)
    out = tiny_llama.hf.generate(ids, max_new_tokens=6, do_sample=False, cache=cache)
    ours = wb.generate(tiny_llama, PROMPT, cache=policy, max_new_tokens=6, ignore_eos=True)
    assert out[0, ids.shape[1]:].tolist() == ours.token_ids
    assert cache.layers[0].store.keys.quantized == 128


@pytest.mark.embedded
def test_every_store_at_8_bits_reproduces_the_full_cache_and_memory_shrinks(embedded):
    text = (Path(__file__).parents[1] / "datasets" / "harbor_town.txt").read_text().split("\n", 1)[1]
    ids = embedded.tokenizer(text)["input_ids"][:512]
    prompt = embedded.tokenizer.decode(ids[:300])
    full = wb.generate(embedded, prompt, max_new_tokens=16, ignore_eos=True)
    for name in ("kivi", "int_per_token"):  # 300 + 16 tokens: most of them quantized (R = 128)
        run = wb.generate(embedded, prompt, cache=wb.cache.get(name, bits=8), max_new_tokens=16, ignore_eos=True)
        assert run.token_ids == full.token_ids, name
    sizes = {}
    for name in ("full", wb.cache.get("kivi")):  # a 512-token prefill
        with wb.Session(embedded, name) as session:
            session.feed(ids, "prefill", logits="none")
            sizes[str(name)] = session.cache.nbytes()
            assert sum(session.cache.nbytes_by_component().values()) == sizes[str(name)]
    ratio = sizes["full"] / sizes[str(wb.cache.get("kivi"))]
    print(f"512-token prefill: full {sizes['full']} bytes, kivi-2 {sizes[str(wb.cache.get('kivi'))]} bytes, "
          f"{ratio:.2f}x smaller")
    assert ratio > 2.5


# -- the flush schedule end to end, against KIVI simulated on transformers' own cache ------------------------------
def fake_quantized(x: torch.Tensor, bits: int, group: int, per_channel: bool) -> torch.Tensor:
    """x (batch, heads, tokens, D) quantized and dequantized, min/max asymmetric over groups of `group` tokens per
    channel (keys) or `group` channels per token (values), float16 scale and zero as the store keeps them."""
    b, h, t, d = x.shape
    g = x.reshape(b, h, t // group, group, d) if per_channel else x.reshape(b, h, t, d // group, group)
    axis = 3 if per_channel else 4
    low, high = g.amin(axis, keepdim=True), g.amax(axis, keepdim=True)
    scale, zero = ((high - low) / (2 ** bits - 1)).half().float(), low.half().float()
    code = torch.where(scale > 0, ((g - zero) / scale).round().clamp(0, 2 ** bits - 1), torch.zeros_like(g))
    return (code * scale + zero).reshape(x.shape)


def kivi_on_dynamic_cache(model, prompt: list[int], tokens: list[int], bits: int, group: int, residual: int):
    """Logits of the prompt's last position and of each token fed after it, with HF's DynamicCache holding what
    KIVI would (its reference code's rule, applied to the float keys/values after every pass): keys of the first
    T - T % R tokens quantized per channel, values of all but the newest R per token, the rest exact."""
    from transformers import DynamicCache

    cache, floats, out = DynamicCache(config=model.hf.config), {}, []
    with torch.inference_mode():
        for ids in [prompt] + [[t] for t in tokens]:
            out.append(model.hf(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).logits[0, -1])
            for i, layer in enumerate(cache.layers):
                new = (layer.keys[..., -len(ids):, :], layer.values[..., -len(ids):, :])
                floats[i] = [torch.cat([old, x], 2) for old, x in zip(floats[i], new)] if i in floats else list(new)
                keys, values = (x.clone() for x in floats[i])
                total = keys.shape[2]
                k, v = total - total % residual, max(0, total - residual)
                keys[..., :k, :] = fake_quantized(floats[i][0][..., :k, :], bits, group, True)
                values[..., :v, :] = fake_quantized(floats[i][1][..., :v, :], bits, group, False)
                layer.keys, layer.values = keys, values
    return torch.stack(out)


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_decodes_as_kivi_simulated_on_transformers_dynamic_cache(tiny_llama, bits):
    """Over several key flushes and a full value FIFO, each step's logits equal those of the unmodified HF model
    whose cache holds what KIVI's rule says (quantize-dequantize), so the store's schedule, grouping and scales
    are KIVI's."""
    prompt = tiny_llama.encode(PROMPT)[0].tolist()[:45]
    tokens = torch.randint(5, 200, (40,), generator=torch.Generator().manual_seed(bits)).tolist()
    expected = kivi_on_dynamic_cache(tiny_llama, prompt, tokens, bits, group=8, residual=16)
    with wb.Session(tiny_llama, wb.cache.get("kivi", bits=bits, group=8, residual=16), "sdpa") as session:
        got = [session.feed(prompt, "prefill")[-1]] + [session.feed([t], "decode")[-1] for t in tokens]
    torch.testing.assert_close(torch.stack(got), expected, atol=1e-4, rtol=1e-4)


# -- transactions: the core transaction tests, run for the quantized policies ------------------------------------
FLUSHING = {"kivi": dict(group=8, residual=16), "int_per_token": dict(bits=4, group=16, residual=16)}
COVERING = {"kivi_covering": dict(residual=128), "int_per_token_covering": dict(residual=128)}


def policy(name):
    return wb.cache.get(name.removesuffix("_covering"), **{**FLUSHING, **COVERING}[name])


def packed_state(cache):
    """Every tensor the quantized stores hold (codes, scales, zeros, residual), up to what is held."""
    out = []
    for layer in cache.layers:
        for side in layer.store.sides:
            parts = side.quantized_part() if side.quantized else ()
            out.append([side.quantized, side.held, *(t.clone() for t in parts), side.residual_part().clone()])
    return out


@pytest.fixture
def model(tiny_models):
    return tiny_models["llama"]


@pytest.mark.parametrize("name", list(FLUSHING) + list(COVERING))
def test_rollback_restores_the_exact_state_at_any_mark(model, name):
    check_rollback_restores_the_exact_state_at_any_mark(model, lambda: policy(name))
    with wb.Session(model, policy(name)) as session:  # and every packed tensor is as it was
        greedy(session, session.feed(model.encode(PROMPT), "prefill"), 3)
        before, mark = packed_state(session.cache), session.mark()
        session.feed([11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27], "verify")  # > R
        session.feed([30], "rollout")
        session.rollback(mark)
        assert_same(packed_state(session.cache), before)


@pytest.mark.parametrize("name", list(COVERING))
def test_a_verify_pass_committed_in_part_equals_one_by_one_while_nothing_is_flushed(model, name):
    check_a_verify_pass_committed_in_part_equals_one_by_one(model, lambda: policy(name))


@pytest.mark.parametrize("name", list(FLUSHING))
def test_commit_flushes_the_accepted_tokens_as_one_by_one_decoding_would(model, name):
    """A verify tail is never quantized until commit; then the accepted tokens are flushed by the same rule, so
    the store holds as many quantized and residual tokens as one-by-one feeding leaves, with the same codes for
    every token quantized before the tail, and the tail's dropped tokens are gone."""
    ids = model.encode(PROMPT)
    draft = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]
    with wb.Session(model, policy(name)) as reference, wb.Session(model, policy(name)) as verified:
        reference.feed(ids, "prefill")
        verified.feed(ids, "prefill")
        before = packed_state(verified.cache)
        for token in draft[:17]:
            reference.feed([token], "decode")
        verified.feed(draft, "verify")
        assert packed_state(verified.cache)[0][:2] == [before[0][0], before[0][1] + len(draft)]  # all in residual
        verified.commit(17)
        a, b = packed_state(verified.cache), packed_state(reference.cache)
        assert [side[:2] for side in a] == [side[:2] for side in b]
        for side_a, side_b, side_before in zip(a, b, before):
            if side_before[0]:  # what was quantized before the tail is untouched
                q = side_before[0]
                assert torch.equal(side_a[2][:, :q], side_before[2]) and torch.equal(side_b[2][:, :q], side_before[2])
        assert verified.position == reference.position == ids.shape[1] + 17
        p = torch.log_softmax(reference.feed([3], "decode")[-1], -1)
        q = torch.log_softmax(verified.feed([3], "decode")[-1], -1)
        assert float((p.exp() * (p - q)).sum()) < 0.5  # close: the tail's rows saw unflushed neighbours


def test_committing_a_tree_path_keeps_it_in_the_residual_like_feeding_it(model):
    """A tree verify pass (commit with rows) drops the other branches from the residual; with no flush inside the
    tail, the store and the next logits equal feeding the path token by token over an already quantized prefix."""
    from workbench.decode.tree import CandidateTree

    tree = CandidateTree.of([(0, 0), (1,), (0,), (0, 1), (0, 0, 0)], heads=3)  # as tests/test_tree_verify.py
    prompt = torch.randint(5, 200, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    policy = wb.cache.get("int_per_token", group=16, residual=32)
    with wb.Session(model, policy, "sdpa") as session, wb.Session(model, policy, "sdpa") as reference:
        session.feed(prompt, "prefill")
        session.feed([21, 22, 23, 24, 25, 26], "verify", tree=tree)
        session.commit(3, rows=[0, 1, 4])  # the root and the path (0,) -> (0, 1)
        reference.feed(prompt, "prefill")
        for token in [21, 22, 25]:
            reference.feed([token], "decode")
        assert session.cache.layers[0].store.keys.quantized == 32
        assert_same(packed_state(session.cache), packed_state(reference.cache), exact=False)
        torch.testing.assert_close(session.feed([7], "decode"), reference.feed([7], "decode"), rtol=1e-4, atol=1e-4)


# -- decoding straight from the codes: flash over a packed store ---------------------------------------------------
def _generate_twice(model, policy, monkeypatch, record=("logits", "entropy")):
    """(reads, run over the packed codes, run over the dequantized view): the second with the packed path off."""
    flash = type(wb.attention.get("flash"))
    reads, attend_packed = [], flash.attend_packed

    def counting(self, call, packed, want):
        reads.append(packed.keys.tokens)
        return attend_packed(self, call, packed, want)

    monkeypatch.setattr(flash, "attend_packed", counting)
    options = dict(cache=policy, attention="flash", max_new_tokens=10, ignore_eos=True, record=list(record))
    packed = wb.generate(model, PROMPT, **options)
    monkeypatch.setattr(flash, "reads_packed", False)
    return reads, packed, wb.generate(model, PROMPT, **options)


@pytest.mark.parametrize("name", list(FLUSHING))
def test_flash_decodes_from_the_packed_codes_as_attention_over_the_dequantized_view(tiny_llama, name, monkeypatch):
    reads, packed, dense = _generate_twice(tiny_llama, policy(name), monkeypatch)
    assert len(reads) == 9 * tiny_llama.num_layers and min(reads) > 0  # every decode pass, over quantized tokens
    assert packed.token_ids == dense.token_ids
    for variable in ("logits", "attention_entropy"):
        torch.testing.assert_close(torch.from_numpy(packed.steps[variable].values),
                                   torch.from_numpy(dense.steps[variable].values), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:flash attention does not support")  # soft-capping: flash's dense fallback
def test_layers_the_kernel_cannot_serve_read_the_dequantized_view(tiny_models, monkeypatch):
    """Gemma 2 soft-caps its logits and alternates sliding-window layers: flash falls back to the view, exactly."""
    reads, packed, dense = _generate_twice(tiny_models["gemma2"], policy("kivi"), monkeypatch, record=["logits"])
    assert reads == []
    assert packed.token_ids == dense.token_ids
    assert np.array_equal(packed.steps["logits"].values, dense.steps["logits"].values)


def test_only_full_attention_layers_read_the_codes_without_soft_capping(monkeypatch):
    """The same Gemma 2 without soft-capping: its full-attention layers read the codes, its sliding-window
    layers (a window mask) the view; the run equals the view-only one."""
    model = wb.tiny("gemma2", attn_logit_softcapping=None, final_logit_softcapping=None, sliding_window=16)
    full_layers = [i for i, kind in enumerate(model.hf.config.layer_types) if kind == "full_attention"]
    flash = type(wb.attention.get("flash"))
    layers, attend_packed = [], flash.attend_packed
    monkeypatch.setattr(flash, "attend_packed",
                        lambda self, call, packed, want: layers.append(call.layer) or attend_packed(self, call, packed,
                                                                                                   want))
    options = dict(cache=policy("kivi"), attention="flash", max_new_tokens=6, ignore_eos=True, record=["logits"])
    packed = wb.generate(model, PROMPT, **options)
    monkeypatch.setattr(flash, "reads_packed", False)
    dense = wb.generate(model, PROMPT, **options)
    assert full_layers and sorted(set(layers)) == full_layers and len(layers) == 5 * len(full_layers)
    assert packed.token_ids == dense.token_ids
    torch.testing.assert_close(torch.from_numpy(packed.steps["logits"].values),
                               torch.from_numpy(dense.steps["logits"].values), atol=1e-4, rtol=1e-4)


def test_attention_rows_and_shared_kv_layers_read_the_dequantized_view(tiny_llama, monkeypatch):
    """Recording attention rows needs the whole key matrix; Gemma 3n's last layers reuse the keys and values an
    earlier layer's update returned, so no update may return a stand-in."""
    reads, packed, dense = _generate_twice(tiny_llama, policy("kivi"), monkeypatch, record=["attention"])
    assert reads == [] and packed.token_ids == dense.token_ids
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    torch.manual_seed(0)
    config = Gemma3nTextConfig(vocab_size=320, vocab_size_per_layer_input=320, hidden_size=128,
                               hidden_size_per_layer_input=16, intermediate_size=256, num_hidden_layers=4,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_kv_shared_layers=2,
                               layer_types=["full_attention"] * 4, laurel_rank=8,
                               activation_sparsity_pattern=[0.0] * 4, altup_num_inputs=2)
    shared = wb.models.wrap(Gemma3nForCausalLM(config).eval(), wb.models.byte_tokenizer())
    monkeypatch.setattr(type(wb.attention.get("flash")), "reads_packed", True)
    reads.clear()
    over_codes = wb.generate(shared, PROMPT, cache=policy("kivi"), attention="flash", max_new_tokens=6,
                             ignore_eos=True, record=["logits"])
    over_view = wb.generate(shared, PROMPT, cache=policy("kivi"), attention="sdpa", max_new_tokens=6,
                            ignore_eos=True, record=["logits"])
    assert reads == [] and over_codes.token_ids == over_view.token_ids


# -- telemetry: bytes by part, quantization error -------------------------------------------------------------------
def test_quantization_error_is_measured_against_the_float_keys_and_values(tiny_llama):
    """Layer 0's keys and values depend on the tokens only, so a full cache fed the same prompt holds the floats the
    quantized cache started from; the error is recomputed from them with the independent quantizer above."""
    ids = tiny_llama.encode(PROMPT)
    with wb.Session(tiny_llama, policy("kivi")) as quantized, wb.Session(tiny_llama, "full") as full:
        quantized.cache.measure_quant_error()  # off by default: it costs a dequantization per flush
        quantized.feed(ids, "prefill")
        full.feed(ids, "prefill")
        measured = quantized.cache.quant_error()
        keys, values = (t[0].numpy() for t in full.cache.layers[0].store.view())
        store = quantized.cache.layers[0].store
        for side, x, layout, measured_error in ((store.keys, keys, "per_channel", measured[0, :, 0]),
                                                (store.values, values, "per_token", measured[0, :, 1])):
            x = x[:, :side.quantized]
            _, scale, zero, code = reference_quantize(x, side.bits, side.group, layout)
            axis = 1 if layout == "per_channel" else 2
            x_hat = code * scale.astype(np.float32).repeat(side.group, axis) + \
                zero.astype(np.float32).repeat(side.group, axis)
            expected = np.linalg.norm(x - x_hat, axis=(1, 2)) / np.linalg.norm(x, axis=(1, 2))  # per KV head
            assert side.quantized > 0 and measured_error.numpy() == pytest.approx(expected, rel=1e-4)
    assert wb.Session(tiny_llama, "full").cache.quant_error() is None  # a float cache does not quantize


@pytest.mark.parametrize("cache", ["full", "kivi"])
def test_the_trace_has_bytes_by_part_and_the_quantization_error(tiny_llama, cache):
    run = wb.generate(tiny_llama, PROMPT, cache=policy(cache) if cache != "full" else cache, max_new_tokens=6,
                      ignore_eos=True, record=["cache"])
    trace = run.trace
    parts = trace["cache_part_bytes"]
    assert (parts.sum("cache_part") == trace["cache_bytes"]).all()
    assert list(trace["cache_part"].values) == (["dense"] if cache == "full" else
                                                ["codes", "scales", "zeros", "residual"])
    if cache == "full":
        assert "kv_quant_error" not in trace
    else:
        error = trace["kv_quant_error"]
        assert error.dims == ("sequence", "step", "layer", "kv_head", "side")
        assert list(trace["side"].values) == ["key", "value"]
        assert ((error > 0) & (error < 1)).all()  # 2-bit codes of random-model keys: a real, bounded error
