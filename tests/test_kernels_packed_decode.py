"""The packed (2/4-bit) KV decode kernel against its torch reference, and the reference against an independent
float64 attention over keys/values quantized and packed here (numpy, integer arithmetic, independently of the
library's quantizer and unpacker). Runs under the Triton interpreter on CPU (fp32/fp16, tiny shapes, head_dim 64),
compiled on a GPU (bf16 and realistic shapes too)."""

import math

import numpy as np
import pytest
import torch

from workbench.errors import ParameterError
from workbench.kernels import packed_decode as module
from workbench.kernels.packed_decode import (PackedKV, packed_decode, packed_decode_reference, packed_decode_triton,
                                             quantize_reference)

pytestmark = pytest.mark.interpreter
STATS = dict(lse=True, entropy=True, key_mass=True)
HEAD_DIM = 64


# -- an independent quantizer, packer and attention -----------------------------------------------------------

def quantize(x: torch.Tensor, layout: str, bits: int, group: int, scale_dtype=torch.float16):
    """Min/max asymmetric quantization of x (kv_heads, T, D) along the layout's axis, written out with numpy.
    Returns (PackedKV, x_hat float64 (kv_heads, T, D) computed from the integer codes, not from the bytes)."""
    data = x.double().numpy()
    kv_heads, tokens, head_dim = data.shape
    levels = 2 ** bits - 1
    if layout == "per_channel":  # one (scale, zero) per KV head, group of `group` tokens and channel
        blocks = data.reshape(kv_heads, tokens // group, group, head_dim)
        low, high = blocks.min(axis=2), blocks.max(axis=2)
    else:  # one (scale, zero) per KV head, token and group of `group` channels
        blocks = data.reshape(kv_heads, tokens, head_dim // group, group)
        low, high = blocks.min(axis=3), blocks.max(axis=3)
    scale = torch.from_numpy((high - low) / levels).to(scale_dtype)  # stored rounded ...
    zero = torch.from_numpy(low).to(scale_dtype)
    s, z = scale.double().numpy(), zero.double().numpy()  # ... and the codes use the stored values
    full_s = np.empty_like(data)
    full_z = np.empty_like(data)
    for n in range(tokens):
        for c in range(head_dim):
            g_s = (slice(None), n // group, c) if layout == "per_channel" else (slice(None), n, c // group)
            full_s[:, n, c] = s[g_s]
            full_z[:, n, c] = z[g_s]
    safe = np.where(full_s == 0, 1.0, full_s)
    codes = np.where(full_s == 0, 0, np.clip(np.rint((data - full_z) / safe), 0, levels)).astype(np.int64)
    per_byte = 8 // bits
    packed = np.zeros((kv_heads, tokens, head_dim // per_byte), dtype=np.int64)
    for byte in range(head_dim // per_byte):
        for j in range(per_byte):  # channel byte * per_byte + j at bit offset j * bits, lowest bits first
            packed[:, :, byte] |= codes[:, :, byte * per_byte + j] << (j * bits)
    assert packed.max(initial=0) < 256
    kv = PackedKV(torch.from_numpy(packed.astype(np.uint8)), scale, zero, layout, bits, group)
    return kv, torch.from_numpy(codes * full_s + full_z)


def unpack(codes: torch.Tensor, bits: int) -> np.ndarray:
    """uint8 (.., D * bits // 8) -> integer codes (.., D), channel by channel."""
    data = codes.numpy().astype(np.int64)
    per_byte = 8 // bits
    out = np.zeros(data.shape[:-1] + (data.shape[-1] * per_byte,), dtype=np.int64)
    for c in range(out.shape[-1]):
        out[..., c] = (data[..., c // per_byte] >> ((c % per_byte) * bits)) & (2 ** bits - 1)
    return out


def independent(query, keys_hat, values_hat, residual_keys, residual_values, scaling):
    """float64 dense attention, GQA by repeat, query i at position N - q_len + i seeing keys <= its position.
    Returns output (H, Q, D), lse (H, Q), entropy (H, Q), key_mass (KVH, N)."""
    q = query.cpu().double()
    q = q[:, None] if q.dim() == 2 else q
    heads, q_len, _ = q.shape
    kv_heads = keys_hat.shape[0]
    groups = heads // kv_heads
    k = torch.cat([keys_hat, residual_keys.cpu().double()], 1).repeat_interleave(groups, 0)
    v = torch.cat([values_hat, residual_values.cpu().double()], 1).repeat_interleave(groups, 0)
    n = k.shape[1]
    scores = q @ k.transpose(1, 2) * scaling
    for i in range(q_len):
        scores[:, i, n - q_len + i + 1:] = float("-inf")
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    entropy = -(probs * probs.log()).nan_to_num(0.0).sum(-1)
    key_mass = probs.sum(1).view(kv_heads, groups, n).sum(1)
    return probs @ v, torch.logsumexp(scores, -1), entropy, key_mass


def squeezed(expected):
    """independent()'s results in the shapes of a 2-d query: output (H, D), lse and entropy (H,)."""
    output, lse, entropy, key_mass = expected
    return output[:, 0], lse[:, 0], entropy[:, 0], key_mass


def fields(result):
    return result.output, result.lse, result.entropy, result.key_mass


def assert_matches(result, expected, dtype):
    output, lse, entropy, key_mass = expected
    out_tol = 1e-5 if dtype == torch.float32 else 2e-3
    stat_tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(result.output.cpu().double(), output.double(), atol=out_tol, rtol=out_tol)
    torch.testing.assert_close(result.lse.cpu().double(), lse.double(), atol=stat_tol, rtol=stat_tol)
    torch.testing.assert_close(result.entropy.cpu().double(), entropy.double(), atol=stat_tol, rtol=stat_tol)
    torch.testing.assert_close(result.key_mass.cpu().double(), key_mass.double(), atol=stat_tol * 10,
                               rtol=stat_tol)


def make_case(kv_heads, groups, tokens, residual, key_layout, key_bits, value_bits, dtype, q_len=1,
              key_group=4, value_group=16, value_layout="per_token", scale_dtype=torch.float16, seed=0,
              constant_group=False):
    generator = torch.Generator().manual_seed(seed)
    k = torch.randn(kv_heads, tokens, HEAD_DIM, generator=generator)
    v = torch.randn(kv_heads, tokens, HEAD_DIM, generator=generator)
    if constant_group and tokens >= key_group:  # max == min somewhere: scale 0, decodes to the value itself
        k[:, :key_group, 5] = 0.375
        v[:, 0, :value_group] = -0.25
    keys, keys_hat = quantize(k, key_layout, key_bits, key_group, scale_dtype)
    values, values_hat = quantize(v, value_layout, value_bits, value_group, scale_dtype)
    residual_keys = torch.randn(kv_heads, residual, HEAD_DIM, generator=generator).to(dtype)
    residual_values = torch.randn(kv_heads, residual, HEAD_DIM, generator=generator).to(dtype)
    shape = (kv_heads * groups, HEAD_DIM) if q_len == 1 else (kv_heads * groups, q_len, HEAD_DIM)
    query = torch.randn(shape, generator=generator).to(dtype)
    return query, keys, values, residual_keys, residual_values, keys_hat, values_hat


def to_device(kv: PackedKV, device) -> PackedKV:
    return PackedKV(kv.codes.to(device), kv.scale.to(device), kv.zero.to(device), kv.layout, kv.bits, kv.group)


# name: (kv_heads, groups, T, R, key layout, key bits, value bits, dtype, q_len, num_splits, extra)
CASES = {
    "smollm2_kivi4_r8_fp32": (3, 3, 36, 8, "per_channel", 4, 4, torch.float32, 1, 2, dict(constant_group=True)),
    "smollm2_kivi2_r8_fp16": (3, 3, 36, 8, "per_channel", 2, 2, torch.float16, 1, 2, {}),
    "smollm2_kivi4_r1_odd_fp16": (3, 3, 40, 1, "per_channel", 4, 4, torch.float16, 1, 3, {}),
    "smollm2_kivi2_r0_fp32": (3, 3, 44, 0, "per_channel", 2, 2, torch.float32, 1, 3, dict(constant_group=True)),
    "mha_per_token4_r0_odd_fp16": (2, 1, 37, 0, "per_token", 4, 4, torch.float16, 1, 3, {}),
    "mha_per_token2_r1_fp32": (2, 1, 37, 1, "per_token", 2, 2, torch.float32, 1, 2, {}),
    "smollm2_per_token_mixed_r8_fp32": (3, 3, 37, 8, "per_token", 4, 2, torch.float32, 1, 2, {}),
    "smollm2_per_token_mixed_r1_fp16": (3, 3, 29, 1, "per_token", 2, 4, torch.float16, 1, 2, {}),
    "mha_kivi4_r8_one_split_fp32": (2, 1, 36, 8, "per_channel", 4, 4, torch.float32, 1, 1, {}),
    "one_program_per_head_fp16": (3, 3, 20, 0, "per_channel", 2, 4, torch.float16, 1, 1, {}),
    "residual_only_fp32": (3, 3, 0, 7, "per_channel", 4, 4, torch.float32, 1, None, {}),
    "verify_inside_residual_fp32": (3, 3, 36, 8, "per_channel", 4, 2, torch.float32, 3, 2, {}),
    "verify_into_packed_fp16": (3, 3, 36, 1, "per_token", 4, 4, torch.float16, 4, 2, {}),
    "eight_bit_per_channel_values_fp32": (3, 3, 36, 3, "per_channel", 8, 4, torch.float32, 1, 2,
                                          dict(value_layout="per_channel", value_group=4,
                                               scale_dtype=torch.float32)),
    # scale layouts: a per-channel group spanning whole tiles (G=32 > BLOCK_N=16), one that does not tile them
    # (G=3), and every scale element gathered (expand_scales=False)
    "kivi_group_spans_tiles_fp16": (3, 3, 64, 8, "per_channel", 4, 2, torch.float16, 1, 2,
                                    dict(key_group=32, value_group=32)),
    "group_not_tiling_blocks_fp32": (2, 1, 39, 1, "per_channel", 2, 4, torch.float32, 1, 2,
                                     dict(key_group=3, value_group=64)),
    "gathered_scales_fp32": (3, 3, 36, 1, "per_channel", 4, 2, torch.float32, 1, 2,
                             dict(expand_scales=False, value_group=8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_and_independent(case, kernel_device):
    kv_heads, groups, tokens, residual, key_layout, key_bits, value_bits, dtype, q_len, splits, extra = CASES[case]
    extra = dict(extra)
    expand = extra.pop("expand_scales", True)
    query, keys, values, rk, rv, keys_hat, values_hat = make_case(kv_heads, groups, tokens, residual, key_layout,
                                                                  key_bits, value_bits, dtype, q_len, **extra)
    expected = independent(query, keys_hat, values_hat, rk, rv, HEAD_DIM ** -0.5)
    expected = squeezed(expected) if q_len == 1 else expected
    # (a) the reference is attention over exactly the dequantized values
    reference = packed_decode_reference(query, keys, values, rk, rv, scaling=HEAD_DIM ** -0.5, **STATS)
    assert_matches(reference, expected, dtype)
    # (b) the kernel equals the reference (and so the independent computation)
    device_args = (query.to(kernel_device), to_device(keys, kernel_device), to_device(values, kernel_device),
                   rk.to(kernel_device), rv.to(kernel_device))
    result = packed_decode_triton(*device_args, scaling=HEAD_DIM ** -0.5, **STATS, num_splits=splits, block_n=16,
                                  expand_scales=expand)
    heads = kv_heads * groups
    assert result.output.shape == query.shape and result.output.dtype == dtype
    assert result.lse.shape == result.entropy.shape == ((heads,) if q_len == 1 else (heads, q_len))
    assert result.key_mass.shape == (kv_heads, tokens + residual)
    assert_matches(result, fields(reference), dtype)
    assert_matches(result, expected, dtype)


def test_default_tiling_and_no_statistics(kernel_device):
    query, keys, values, rk, rv, *_ = make_case(3, 3, 100, 8, "per_channel", 4, 2, torch.float32, seed=3)
    args = (query.to(kernel_device), to_device(keys, kernel_device), to_device(values, kernel_device),
            rk.to(kernel_device), rv.to(kernel_device))
    result = packed_decode_triton(*args, scaling=0.125)  # BLOCK_N 64, splits chosen by the launcher
    assert result.lse is None and result.entropy is None and result.key_mass is None
    reference = packed_decode_reference(*args, scaling=0.125)
    torch.testing.assert_close(result.output.cpu(), reference.output.cpu(), atol=1e-5, rtol=1e-5)


def test_strided_views_as_a_store_passes_them(kernel_device):
    # a store keeps codes / scales in a buffer with spare capacity and passes views of the filled part
    query, keys, values, rk, rv, keys_hat, values_hat = make_case(3, 3, 24, 2, "per_channel", 4, 4, torch.float16,
                                                                  seed=4)

    def in_buffer(t, axis_len):
        buffer = torch.zeros(t.shape[0], axis_len, *t.shape[2:], dtype=t.dtype)
        buffer[:, :t.shape[1]] = t
        return buffer[:, :t.shape[1]].to(kernel_device)
    keys = PackedKV(in_buffer(keys.codes, 40), in_buffer(keys.scale, 10), in_buffer(keys.zero, 10),
                    keys.layout, keys.bits, keys.group)
    values = PackedKV(in_buffer(values.codes, 40), in_buffer(values.scale, 40), in_buffer(values.zero, 40),
                      values.layout, values.bits, values.group)
    assert not keys.codes.is_contiguous()
    result = packed_decode_triton(query.to(kernel_device), keys, values, in_buffer(rk, 8), in_buffer(rv, 8),
                                  scaling=0.125, **STATS, num_splits=2, block_n=16)
    assert_matches(result, squeezed(independent(query, keys_hat, values_hat, rk, rv, 0.125)), torch.float16)


def test_library_quantizer_writes_the_layout():
    x = torch.randn(2, 8, HEAD_DIM, generator=torch.Generator().manual_seed(6))
    for layout, bits, group in (("per_channel", 4, 4), ("per_token", 2, 16), ("per_channel", 2, 8),
                                ("per_token", 8, 64)):
        kv = quantize_reference(x, layout=layout, bits=bits, group=group)
        codes = unpack(kv.codes, bits)
        axis = 1 if layout == "per_channel" else 2
        scale = kv.scale.double().repeat_interleave(group, axis).numpy()
        zero = kv.zero.double().repeat_interleave(group, axis).numpy()
        x_hat = codes * scale + zero
        assert codes.max() <= 2 ** bits - 1
        # rounding to the nearest level (scale and zero rounded to fp16 first: a little slack)
        assert (np.abs(x_hat - x.double().numpy()) <= scale / 2 + 2e-3).all()
        np.testing.assert_allclose(kv.dequantize().double().numpy(), x_hat, atol=1e-6)


def test_empty_and_all_masked_rows(kernel_device):
    _, keys, values, _, _, *_ = make_case(3, 3, 0, 0, "per_channel", 4, 4, torch.float32)
    query = torch.randn(9, HEAD_DIM)
    for function in (packed_decode_triton, packed_decode_reference):
        result = function(query.to(kernel_device), to_device(keys, kernel_device), to_device(values, kernel_device),
                          scaling=0.125, **STATS)
        assert (result.output == 0).all() and (result.lse == float("-inf")).all() and (result.entropy == 0).all()
        assert result.key_mass.shape == (3, 0)
    # q_len 3 over 2 tokens: the first query sees nothing (output 0, lse -inf, entropy 0)
    query, keys, values, rk, rv, keys_hat, values_hat = make_case(1, 2, 0, 2, "per_channel", 4, 4, torch.float32,
                                                                  q_len=3)
    result = packed_decode_triton(query.to(kernel_device), to_device(keys, kernel_device),
                                  to_device(values, kernel_device), rk.to(kernel_device), rv.to(kernel_device),
                                  scaling=0.125, **STATS, block_n=16)
    assert (result.output[:, 0].cpu() == 0).all() and (result.lse[:, 0] == float("-inf")).all()
    assert_matches(result, independent(query, keys_hat, values_hat, rk, rv, 0.125), torch.float32)


def test_dispatch(monkeypatch):
    query, keys, values, rk, rv, *_ = make_case(3, 3, 8, 2, "per_channel", 4, 4, torch.float32)
    calls = []
    monkeypatch.setattr(module, "packed_decode_triton", lambda *a, **k: calls.append("triton"))
    monkeypatch.setattr(module, "packed_decode_reference", lambda *a, **k: calls.append("reference"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    packed_decode(query, keys, values, rk, rv, scaling=0.125)  # CPU tensors under the interpreter: the kernel
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    packed_decode(query, keys, values, rk, rv, scaling=0.125)  # CPU tensors otherwise: the reference
    assert calls == (["triton"] if module.HAS_TRITON else ["reference"]) + ["reference"]


def packed(kv_heads=3, tokens=8, layout="per_channel", bits=4, group=4, head_dim=HEAD_DIM):
    """A PackedKV with the given (possibly inconsistent) metadata, shaped as the layout says where it can be."""
    width = head_dim * bits // 8 if bits in (2, 4, 8) else head_dim // 2
    scale_shape = (kv_heads, max(1, tokens // group), head_dim) if layout == "per_channel" else \
        (kv_heads, tokens, max(1, head_dim // group))
    return PackedKV(torch.zeros(kv_heads, tokens, width, dtype=torch.uint8), torch.ones(scale_shape),
                    torch.zeros(scale_shape), layout, bits, group)


@pytest.mark.parametrize("keys,values,heads,residual,message", [
    (packed(bits=3), packed(), 9, None, r"keys: bits must be one of 2, 4, 8; got 3"),
    (packed(), packed(layout="per_token", group=24), 9, None,
     r"values: per_token group \(24\) must divide head_dim \(64\)"),
    (packed(tokens=10), packed(tokens=10, layout="per_token", group=16), 9, None,
     r"keys: per_channel quantized tokens \(10\) must be a multiple of group \(4\)"),
    (packed(), packed(), 8, None, r"query heads \(8\) must be a multiple of kv heads \(3\)"),
    (packed(), packed(kv_heads=2), 9, None, r"keys and values must have the same kv heads; got 3 and 2"),
    (packed(), packed(tokens=12), 9, None, r"keys and values must hold the same quantized tokens; got 8 and 12"),
    (packed(), packed(layout="sideways"), 9, None, r"values: layout must be one of per_channel, per_token"),
    (packed(), packed(), 9, torch.zeros(3, 2, HEAD_DIM, dtype=torch.float16), r"residual_keys must be torch.float32"),
])
def test_errors(keys, values, heads, residual, message):
    query = torch.zeros(heads, HEAD_DIM)
    for function in (packed_decode_triton, packed_decode_reference):
        with pytest.raises(ParameterError, match=message):
            function(query, keys, values, residual, residual, scaling=0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim,context", [(32, 8, 128, 16384), (32, 32, 128, 4096),
                                                             (9, 3, 64, 8191)])
@pytest.mark.parametrize("bits", [2, 4])
def test_bfloat16_realistic_on_gpu(heads, kv_heads, head_dim, context, bits):
    generator = torch.Generator(device="cuda").manual_seed(9)
    residual = 128 + context % 32  # KIVI: G = 32, up to R = 128 (+ the unfinished group) unquantized
    tokens = context - residual
    k, v = (torch.randn(kv_heads, tokens, head_dim, generator=generator, device="cuda") for _ in range(2))
    keys = quantize_reference(k, layout="per_channel", bits=bits, group=32)
    values = quantize_reference(v, layout="per_token", bits=bits, group=32)
    for dtype in (torch.bfloat16, torch.float16):
        rk, rv = (torch.randn(kv_heads, residual, head_dim, generator=generator, device="cuda").to(dtype)
                  for _ in range(2))
        for q_len in (1, 3):
            query = torch.randn(heads, q_len, head_dim, generator=generator, device="cuda").to(dtype)
            result = packed_decode_triton(query, keys, values, rk, rv, scaling=head_dim ** -0.5, **STATS)
            expected = packed_decode_reference(query, keys, values, rk, rv, scaling=head_dim ** -0.5, **STATS)
            tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
            torch.testing.assert_close(result.output.float(), expected.output.float(), atol=tol, rtol=tol)
            torch.testing.assert_close(result.lse, expected.lse, atol=tol, rtol=1e-3)
            torch.testing.assert_close(result.entropy, expected.entropy, atol=tol, rtol=tol)
            torch.testing.assert_close(result.key_mass, expected.key_mass, atol=5 * tol, rtol=tol)
            assert math.isfinite(result.entropy.sum().item())
