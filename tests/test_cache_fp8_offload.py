"""The `fp8` cache (float8 keys and values, vLLM's scaling) and `offload` (any policy's stores in host memory).

References are independent: fp8 codes against a cast done here, bytes against numel, the fp8 cache's logits
against a dense forward whose attention rounds keys and values to fp8 itself (a transformers attention function
registered here, no cache); offloaded runs against the same policy without offloading, with real host copies
made on CPU (mode "copy") so that every move is exercised without a GPU."""

import warnings

import pytest
import torch

import workbench as wb
from workbench.cache import offload as offload_module
from workbench.cache.fp8_store import Fp8Store
from workbench.cache.offload import Offload
from workbench.cache.offload_store import OffloadedStore, offload
from workbench.cache.storage import DenseStore
from workbench.errors import ParameterError, UnknownComponentError

from transaction_checks import (check_a_verify_pass_committed_in_part_equals_one_by_one,
                                check_rollback_restores_the_exact_state_at_any_mark)
from transaction_checks import policy as base_policy  # small budgets that act within a few steps

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 byte tokens on the tiny models
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def reference(x, scale, fp8):
    """fp8 round trip done here: saturate x / scale to the format's range, cast, cast back, times the scale."""
    top = torch.finfo(fp8).max
    return (x.float() / scale).clamp(-top, top).to(fp8).to(torch.float32) * scale


# -- fp8: codes, scales, bytes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize("scaling", ["tensor", "token_head"])
def test_fp8_round_trip_equals_a_cast_done_here(fmt, scaling):
    torch.manual_seed(0)
    keys, values = torch.randn(3, 20, 16) * 4, torch.randn(3, 20, 16) / 8
    keys[0, 3, 5] = 1e5  # beyond both formats' range: saturates, never inf/NaN
    k_scale, v_scale = (0.5, 2.0) if scaling == "tensor" else (1.0, 1.0)
    store = Fp8Store(FP8[fmt], scaling, k_scale, v_scale)
    store.append(keys[:, :12], values[:, :12], 0)
    store.append(keys[:, 12:], values[:, 12:], 12)  # a second pass encodes alike
    if scaling == "tensor":
        k_ref, v_ref = reference(keys, k_scale, FP8[fmt]), reference(values, v_scale, FP8[fmt])
    else:  # per token and head: amax / max (vLLM's floor 1 / (max * 512) does not bind here)
        top = torch.finfo(FP8[fmt]).max
        ks, vs = keys.abs().amax(-1, keepdim=True) / top, values.abs().amax(-1, keepdim=True) / top
        k_ref, v_ref = reference(keys, ks, FP8[fmt]), reference(values, vs, FP8[fmt])
        torch.testing.assert_close(store.token_scales()[0], ks[..., 0], rtol=0, atol=0)
    k_hat, v_hat = store.view()
    assert k_hat.dtype == torch.float32 and store.keys.dtype == FP8[fmt]
    assert torch.equal(k_hat[0], k_ref) and torch.equal(v_hat[0], v_ref)
    assert torch.isfinite(k_hat).all()
    codes = store.codes()[0]
    expected = (keys / (k_scale if scaling == "tensor" else ks)).clamp(-torch.finfo(FP8[fmt]).max,
                                                                         torch.finfo(FP8[fmt]).max).to(FP8[fmt])
    assert torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))


def test_fp8_error_is_bounded_by_the_format_precision():
    """e4m3 keeps 3 mantissa bits: relative error <= 2^-4 in the normal range, absolute <= 2^-10 below it
    (half its subnormal step 2^-9) at scale 1."""
    torch.manual_seed(1)
    x = torch.randn(2, 64, 32) * 3
    store = Fp8Store()
    store.append(x, x, 0)
    error = (store.view()[0][0] - x).abs()
    assert (error <= x.abs() * 2 ** -4 + 2 ** -10).all()


@pytest.mark.parametrize("dtype,ratio", [(torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4)])
@pytest.mark.parametrize("scaling", ["tensor", "token_head"])
def test_fp8_bytes_are_the_float8_tensors_plus_scales(dtype, ratio, scaling):
    full, fp8 = DenseStore(), Fp8Store(scaling=scaling)
    for start, n in ((0, 40), (40, 1), (41, 30)):  # a prompt, a step, growth
        x = torch.randn(3, n, 64, dtype=dtype)
        full.append(x, x, start)
        fp8.append(x, x, start)
    codes = fp8.keys.numel() + fp8.values.numel()  # one byte each
    scales = 2 * 4 if scaling == "tensor" else 2 * 4 * fp8.extras["k_scale"].numel()
    assert fp8.nbytes_by_component() == {"fp8": codes, "scales": scales}
    assert fp8.nbytes() == codes + scales
    assert codes * ratio == full.nbytes()


# -- fp8 in a model: an independent dense reference, closeness to the full cache -----------------------------------
def _fp8_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    fp8 = torch.float8_e4m3fn
    return sdpa_attention_forward(module, query, reference(key, 1.0, fp8).to(key.dtype),
                                  reference(value, 1.0, fp8).to(value.dtype), attention_mask, **kwargs)


def dense_fp8_logits(model, ids):
    """Logits of one dense forward (no cache) whose attention reads keys and values rounded to e4m3 here."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("fp8_reference", _fp8_attention)
    AttentionMaskInterface.register("fp8_reference", sdpa_mask)
    previous = model.hf.config._attn_implementation
    model.hf.set_attn_implementation("fp8_reference")
    try:
        with torch.inference_mode():
            return model.hf(ids, use_cache=False).logits[0].float()
    finally:
        model.hf.set_attn_implementation(previous)


def kl(p_logits, q_logits):
    p, q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (p.exp() * (p - q)).sum(-1)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fp8_logits_equal_a_dense_forward_over_fp8_keys_and_values(tiny_models, family):
    """Teacher-forced: a prefill then decode steps over the fp8 cache give what one dense forward over the same
    tokens gives when its attention rounds every key and value to e4m3 (the cache reads its own tokens in fp8)."""
    model = tiny_models[family]
    ids = model.encode(PROMPT)
    steps = [5, 17, 99, 3]
    with wb.Session(model, "fp8") as session:
        rows = [session.feed(ids, "prefill", logits="all")]
        rows += [session.feed([token], "decode") for token in steps]
    got = torch.cat(rows)
    expected = dense_fp8_logits(model, torch.cat([ids, torch.tensor([steps], device=ids.device)], 1))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_fp8_logits_are_close_to_the_full_cache(tiny_llama):
    """The perturbation is fp8's: relative 2^-4 per key and value element (above), which on the tiny random
    model (sensitive: its logits move by up to a few units) moves the next-token distributions by a small KL:
    measured 0.05 nats on average (per-tensor scales) and 0.05 (per token and head), 0.3-0.4 at worst."""
    ids = tiny_llama.encode(PROMPT)
    with wb.Session(tiny_llama, "full") as session:
        full = session.feed(ids, "prefill", logits="all")
    for policy in (wb.cache.get("fp8"), wb.cache.get("fp8", scaling="token_head")):
        bound = 0.1
        with wb.Session(tiny_llama, policy) as session:
            fp8 = session.feed(ids, "prefill", logits="all")
        divergence = kl(full, fp8)
        print(f"{policy}: KL to full mean {float(divergence.mean()):.4f} max {float(divergence.max()):.4f}, "
              f"max |logit diff| {float((fp8 - full).abs().max()):.3f}")
        assert 0 < float(divergence.mean()) < bound and float(divergence.max()) < 5 * bound


def test_fp8_generates_under_model_generate_and_the_workbench_loop(tiny_llama):
    run = wb.generate(tiny_llama, PROMPT, cache="fp8", max_new_tokens=4, ignore_eos=True, record=["cache"])
    assert len(run.token_ids) == 4 and run.held_cache_bytes > 0
    cache = wb.cache.get("fp8").build(tiny_llama)
    with torch.inference_mode():
        out = tiny_llama.hf.generate(tiny_llama.encode(PROMPT), cache=cache, max_new_tokens=3,
                                     do_sample=False)
    assert out.shape[1] == len(PROMPT) + 3 and cache.layers[0].store.keys.dtype == torch.float8_e4m3fn


def test_fp8_parameters_are_checked(tiny_llama, monkeypatch):
    with pytest.raises(ParameterError, match="allowed: 'e4m3', 'e5m2'"):
        wb.cache.get("fp8", format="e3m4")
    with pytest.raises(ParameterError, match="k_scale.*scaling='tensor' only"):
        wb.cache.get("fp8", scaling="token_head", k_scale=0.5)
    with pytest.raises(ParameterError, match="positive finite"):
        wb.cache.get("fp8", v_scale=0.0)

    def no_float8(*args, **kwargs):
        raise RuntimeError("float8 is not supported here")
    policy = wb.cache.get("fp8")
    monkeypatch.setattr(torch, "ones", no_float8)  # the device check is a tiny cast: make it fail
    with pytest.raises(ParameterError, match="cannot store torch.float8_e4m3fn on cpu"):
        policy.build(tiny_llama)


@pytest.mark.embedded
def test_fp8_on_the_embedded_model_holds_a_quarter_of_float32(embedded):
    ids = embedded.encode(PROMPT)
    sizes, logits = {}, {}
    for name in ("full", "fp8"):
        with wb.Session(embedded, name) as session:
            logits[name] = session.feed(ids, "prefill", logits="all")
            sizes[name] = session.cache.nbytes_by_component()
    divergence = kl(logits["full"], logits["fp8"])
    print(f"embedded, {ids.shape[1]}-token prefill: full {sizes['full']}, fp8 {sizes['fp8']}; KL mean "
          f"{float(divergence.mean()):.4f} max {float(divergence.max()):.4f}")
    assert sizes["fp8"]["fp8"] * 4 == sizes["full"]["dense"] and sizes["fp8"]["scales"] == 30 * 8
    assert float(divergence.mean()) < 0.1


# -- offload ------------------------------------------------------------------------------------------------------
class CopyingOffload(Offload):
    """`offload` with real host copies on CPU (mode "copy"): every acquire, prefetch and release happens."""

    def build(self, model, forward=None):
        return offload(self.policy.build(model, forward), model.device, "copy", self.prefetch)


INNER = {"full": {}, "kivi": dict(group=8, residual=16), "h2o": dict(budget=24, sinks=2, window=4),
         "snapkv": dict(budget=24, window=4)}


def run_tokens(model, policy, steps=8):
    with wb.Session(model, policy) as session:
        logits = session.feed(model.encode(PROMPT), "prefill", logits="all")
        rows, tokens = [logits], []
        for _ in range(steps):
            tokens.append(int(rows[-1][-1].argmax()))
            rows.append(session.feed([tokens[-1]], "decode"))
        return tokens, torch.cat(rows), session.cache


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("name", list(INNER))
def test_offloading_gives_the_inner_policys_tokens_and_logits_exactly(tiny_models, family, name):
    model = tiny_models[family]
    plain = wb.cache.get(name, **INNER[name])
    tokens, logits, cache = run_tokens(model, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the CPU note
        for policy in (Offload(inner=plain), CopyingOffload(inner=plain)):
            got_tokens, got_logits, got = run_tokens(model, policy)
            assert got_tokens == tokens and torch.equal(got_logits, logits)
            assert got.policy is plain and isinstance(got.layers[0].store, OffloadedStore)
            assert got.tokens_held().tolist() == cache.tokens_held().tolist()
    moves = got.prefetcher.moves  # the copying run really moved layers, and prefetched the next one
    assert moves["released"] > 8 and moves["prefetched"] > 8


def test_offloaded_bytes_say_where_they_are(tiny_llama):
    _, _, plain = run_tokens(tiny_llama, "full")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, _, none = run_tokens(tiny_llama, Offload(inner="full"))
    assert none.nbytes_by_component() == {"host": plain.nbytes(), "device": 0}  # CPU: nothing on a device
    _, _, copying = run_tokens(tiny_llama, CopyingOffload(inner="full"))
    parts = copying.nbytes_by_component()
    assert set(parts) == {"host", "device"} and sum(parts.values()) == copying.nbytes()
    layer = plain.layers[1].store.nbytes()
    # two layers: layer 1 resident after the last pass, layer 0 prefetched for the next one
    assert parts["device"] == 2 * layer and parts["host"] >= layer
    copying.prefetcher.settle()
    assert copying.nbytes_by_component() == {"host": plain.nbytes(), "device": 0}


def test_on_cpu_offloading_says_it_changes_nothing(tiny_llama, monkeypatch):
    monkeypatch.setattr(offload_module, "_warned", False)
    policy = wb.cache.get("offload", inner="kivi")
    with pytest.warns(RuntimeWarning, match="offloading changes nothing"):
        policy.build(tiny_llama)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.build(tiny_llama)  # once only
    if not torch.cuda.is_available():
        assert "offloading changes nothing" in policy.describe()
    assert "cache 'kivi'" in policy.describe()


def test_offload_names_and_wrappers(tiny_llama):
    assert wb.cache.offloaded("kivi", bits=4).policy == wb.cache.get("kivi", bits=4)
    assert wb.cache.get("offload", inner=wb.cache.get("h2o", budget=24)).budget == 24  # the inner's parameters
    assert wb.cache.get("offload", inner="snapkv").needs_bridge and not wb.cache.get("offload").needs_bridge
    with pytest.raises(ParameterError, match="offloaded cache already"):
        wb.cache.get("offload", inner="offload")
    with pytest.raises(UnknownComponentError, match="registered: .*kivi"):
        wb.cache.get("offload", inner="nope")


def test_a_forked_offloaded_session_continues_alike(tiny_llama):
    policy = CopyingOffload(inner=wb.cache.get("h2o", budget=24, window=4))
    with wb.Session(tiny_llama, policy) as session:
        session.feed(tiny_llama.encode(PROMPT), "prefill")
        fork = session.fork()
        for token in (4, 8, 15):
            torch.testing.assert_close(fork.feed([token], "decode"), session.feed([token], "decode"),
                                       rtol=0, atol=0)
        assert isinstance(fork.cache.layers[0].store, OffloadedStore)
        assert fork.cache.layers[0].store.prefetcher is fork.cache.prefetcher is not session.cache.prefetcher


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["full", "kivi", "h2o", "fp8"])
def test_gpu_prefetch_overlaps_and_reproduces_the_inner_policy(name):
    """On a GPU: pinned host stores, the next layer prefetched on the side stream, at most two layers on the device,
    and the same tokens and logits as the policy without offloading."""
    model = wb.tiny("llama", device="cuda", num_hidden_layers=6)
    plain = wb.cache.get(name, **INNER.get(name, {}))
    tokens, logits, cache = run_tokens(model, plain)
    got_tokens, got_logits, got = run_tokens(model, wb.cache.offloaded(plain))
    assert got_tokens == tokens
    torch.testing.assert_close(got_logits, logits, rtol=0, atol=0)
    assert got.prefetcher.mode == "cuda" and got.prefetcher.moves["prefetched"] > 6 * 8
    parts = got.nbytes_by_component()
    assert 0 < parts["device"] <= 2 * max(layer.store.nbytes() for layer in cache.layers) < parts["host"]
    resting = [layer.store for layer in got.layers if layer.store is not got.prefetcher.resident]
    assert all(t.is_pinned() for store in resting for t in store.inner.__dict__.values()
               if isinstance(t, torch.Tensor) and t.device.type == "cpu")


# -- transactions: the core transaction tests, run for fp8 and for offloaded policies (copying) -------------------
POLICIES = {
    "fp8": lambda: wb.cache.get("fp8"),
    "fp8_token_head": lambda: wb.cache.get("fp8", scaling="token_head"),
    "offload_full": lambda: CopyingOffload(inner="full"),
    "offload_kivi": lambda: CopyingOffload(inner=wb.cache.get("kivi", group=8, residual=16)),
    "offload_h2o": lambda: CopyingOffload(inner=base_policy("h2o")),
    "offload_snapkv": lambda: CopyingOffload(inner=base_policy("snapkv")),
}


@pytest.fixture
def model(tiny_models):
    return tiny_models["llama"]


@pytest.mark.parametrize("name", list(POLICIES))
def test_rollback_restores_the_exact_state_at_any_mark(model, name):
    check_rollback_restores_the_exact_state_at_any_mark(model, POLICIES[name])


@pytest.mark.parametrize("name", ["fp8", "fp8_token_head", "offload_full", "offload_h2o", "offload_snapkv"])
def test_a_verify_pass_committed_in_part_equals_one_by_one(model, name):
    """fp8 encodes each token from itself alone, so a verify tail's codes are the ones decoding would write."""
    check_a_verify_pass_committed_in_part_equals_one_by_one(model, POLICIES[name])
