"""The fused flash-attention kernel (output, lse, entropy, key mass) against its torch reference and against an
independent dense computation (softmax of masked scores in float64, masks built key by key). Runs under the
Triton interpreter on CPU (fp32/fp16, tiny shapes), compiled on a GPU (bf16 and realistic shapes too)."""

import math

import pytest
import torch

from workbench.errors import ParameterError
from workbench.kernels import flash_attention, flash_attention_reference, flash_attention_triton

pytestmark = pytest.mark.interpreter
STATS = dict(lse=True, entropy=True, key_mass=True)


def inputs(batch, heads, kv_heads, q_len, k_len, head_dim=64, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    # q as transformers makes it: a (B, Q, H, D) projection viewed as (B, H, Q, D), so not contiguous
    q = torch.randn(batch, q_len, heads, head_dim, generator=generator).transpose(1, 2)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator)
    return tuple(t.to(dtype).to(device) for t in (q, k, v))


def allowed_by_rule(shape, causal=True, window=0, sinks=0, block_mask=None, block_size=64, mask=None):
    """The attention rule written out key by key, independently of the library's vectorized version."""
    batch, heads, q_len, k_len = shape
    rule = torch.zeros(q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        position = k_len - q_len + i
        for j in range(k_len):
            in_window = window == 0 or j > position - window or j < sinks
            rule[i, j] = (j <= position or not causal) and in_window
    allowed = rule.expand(shape).clone()
    if block_mask is not None:  # each bit stretched over its block_size x block_size tile
        tiles = block_mask.cpu().repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)
        allowed &= tiles[:, :, :q_len, :k_len]
    if mask is not None:
        allowed &= mask.cpu()
    return allowed


def independent(q, k, v, scaling, allowed):
    """float64 dense attention: softmax of masked scores; empty rows give 0 output, -inf lse, 0 entropy."""
    groups = q.shape[1] // k.shape[1]
    keys = k.cpu().double().repeat_interleave(groups, 1)
    values = v.cpu().double().repeat_interleave(groups, 1)
    scores = (q.cpu().double() @ keys.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    entropy = -(probs * probs.log()).nan_to_num(0.0).sum(-1)
    batch, heads, _, k_len = probs.shape
    key_mass = probs.sum(2).view(batch, heads // groups, groups, k_len).sum(2)
    return (probs @ values).transpose(1, 2), torch.logsumexp(scores, -1), entropy, key_mass


def assert_matches(result, expected, dtype):
    out_tol = 1e-5 if dtype == torch.float32 else 2e-3
    stat_tol = 1e-5 if dtype == torch.float32 else 1e-3
    output, lse, entropy, key_mass = expected
    torch.testing.assert_close(result.output.cpu().double(), output.double(), atol=out_tol, rtol=out_tol)
    torch.testing.assert_close(result.lse.cpu().double(), lse.double(), atol=stat_tol, rtol=stat_tol)
    torch.testing.assert_close(result.entropy.cpu().double(), entropy.double(), atol=stat_tol, rtol=stat_tol)
    torch.testing.assert_close(result.key_mass.cpu().double(), key_mass.double(), atol=stat_tol * 10,
                               rtol=stat_tol)


CASES = {  # name: (batch, heads, kv_heads, q_len, k_len, options, tiling)
    "prefill_causal_gqa": (1, 4, 2, 37, 53, {}, dict(block_m=16, block_n=16)),
    "prefill_one_tile": (2, 2, 1, 20, 20, {}, {}),
    "decode": (2, 4, 2, 1, 70, {}, dict(block_n=16)),
    "decode_split_k": (1, 4, 2, 1, 70, {}, dict(block_n=16, num_splits=3)),
    "decode_few_queries": (1, 4, 2, 3, 70, {}, dict(block_n=16, num_splits=2)),
    "window_sinks": (1, 4, 2, 37, 53, dict(window=8, sinks=3), dict(block_m=16, block_n=16)),
    "window_decode_split": (1, 4, 2, 1, 70, dict(window=20, sinks=4), dict(block_n=16, num_splits=2)),
    "decode_one_head_per_kv": (1, 2, 2, 1, 70, {}, dict(block_n=16, num_splits=2)),
    "not_causal": (1, 2, 2, 9, 40, dict(causal=False), dict(block_n=16)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_and_independent(case, dtype, kernel_device):
    batch, heads, kv_heads, q_len, k_len, options, tiling = CASES[case]
    q, k, v = inputs(batch, heads, kv_heads, q_len, k_len, dtype=dtype, device=kernel_device)
    scaling = 64 ** -0.5
    result = flash_attention_triton(q, k, v, scaling=scaling, **options, **STATS, **tiling)
    reference = flash_attention_reference(q, k, v, scaling=scaling, **options, **STATS)
    assert result.output.shape == (batch, q_len, heads, 64) and result.output.dtype == dtype
    assert result.lse.shape == result.entropy.shape == (batch, heads, q_len)
    assert result.key_mass.shape == (batch, kv_heads, k_len)
    assert_matches(result, (reference.output, reference.lse, reference.entropy, reference.key_mass), dtype)
    allowed = allowed_by_rule((batch, heads, q_len, k_len), **options)
    assert_matches(result, independent(q, k, v, scaling, allowed), dtype)


@pytest.mark.parametrize("batch,mask_shape", [(2, (2, 1, 21, 40)), (1, (1, 4, 21, 40)), (2, (21, 40))])
def test_dense_mask(batch, mask_shape, kernel_device):
    q, k, v = inputs(batch, 4, 2, 21, 40, device=kernel_device, seed=1)
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(2)) < 0.6
    mask[..., -1] = True  # every row keeps its own position: no empty rows here
    result = flash_attention_triton(q, k, v, scaling=0.125, mask=mask.to(kernel_device), **STATS, block_n=32)
    allowed = allowed_by_rule((batch, 4, 21, 40), mask=mask)
    assert_matches(result, independent(q, k, v, 0.125, allowed), torch.float32)


def test_block_mask_skips_tiles_entirely(kernel_device):
    # Hand-checkable: q = 0 makes every allowed score equal, so each row is uniform over its allowed keys.
    # Key block 2 (keys 32..47) is off for every query block; its K and V are NaN, so computing that tile at
    # all (even masked) would poison the output with 0 * NaN.
    q, k, v = inputs(1, 2, 1, 48, 48, device=kernel_device, seed=3)
    q = torch.zeros_like(q)
    block_mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    block_mask[:, :, :, 2] = False
    block_mask[0, 1, 1, 0] = False  # head 1, queries 16..31 skip keys 0..15
    k[:, :, 32:] = float("nan")
    v[:, :, 32:] = float("nan")
    result = flash_attention_triton(q, k, v, scaling=0.125, block_mask=block_mask.to(kernel_device),
                                    block_size=16, **STATS)
    counts = torch.tensor([[min(i + 1, 32) for i in range(48)], [min(i + 1, 32) for i in range(48)]])
    counts[1, 16:32] = torch.arange(1, 17)  # only keys 16..i remain
    assert not torch.isnan(result.output).any()
    torch.testing.assert_close(result.entropy.cpu()[0], counts.float().log())  # uniform: log(#keys)
    torch.testing.assert_close(result.lse.cpu()[0], counts.float().log())  # scores are 0: lse = log(#keys)
    torch.testing.assert_close(result.output.cpu()[0, 20, 1], v[0, 0, 16:21].cpu().mean(0))
    torch.testing.assert_close(result.output.cpu()[0, 40, 0], v[0, 0, :32].cpu().mean(0))
    assert (result.key_mass.cpu()[0, 0, 32:] == 0).all()
    clean = [t.nan_to_num(0.0) for t in (q, k, v)]
    reference = flash_attention_reference(*clean, scaling=0.125, block_mask=block_mask.to(kernel_device),
                                          block_size=16, **STATS)
    assert_matches(result, (reference.output, reference.lse, reference.entropy, reference.key_mass),
                   torch.float32)


@pytest.mark.parametrize("q_len,num_splits", [(37, None), (2, 2)])  # (2, 2): packed decode rows, split-K
def test_block_mask_random_with_gqa(q_len, num_splits, kernel_device):
    q, k, v = inputs(1, 4, 2, q_len, 53, dtype=torch.float16, device=kernel_device, seed=4)
    block_mask = torch.rand(1, 4, -(-q_len // 16), 4, generator=torch.Generator().manual_seed(5)) < 0.6
    result = flash_attention_triton(q, k, v, scaling=0.125, block_mask=block_mask.to(kernel_device),
                                    block_size=16, window=30, sinks=2, **STATS, num_splits=num_splits)
    allowed = allowed_by_rule((1, 4, q_len, 53), window=30, sinks=2, block_mask=block_mask, block_size=16)
    assert_matches(result, independent(q, k, v, 0.125, allowed), torch.float16)


def test_empty_rows(kernel_device):
    q, k, v = inputs(1, 4, 2, 5, 30, device=kernel_device, seed=6)
    mask = torch.ones(1, 4, 5, 30, dtype=torch.bool)
    mask[0, 1, 2] = False  # one row of head 1 sees nothing
    mask[0, 3] = False  # head 3 sees nothing at all
    result = flash_attention_triton(q, k, v, scaling=0.125, mask=mask.to(kernel_device), **STATS)
    assert (result.output.cpu()[0, 2, 1] == 0).all() and (result.output.cpu()[0, :, 3] == 0).all()
    assert result.lse[0, 1, 2].item() == float("-inf") and (result.lse[0, 3] == float("-inf")).all()
    assert result.entropy[0, 1, 2].item() == 0 and (result.entropy[0, 3] == 0).all()
    allowed = allowed_by_rule((1, 4, 5, 30), mask=mask)
    assert_matches(result, independent(q, k, v, 0.125, allowed), torch.float32)  # key_mass skips them too
    # more queries than keys: the first queries sit before the first key and see nothing
    q, k, v = inputs(1, 2, 2, 20, 12, device=kernel_device, seed=7)
    result = flash_attention_triton(q, k, v, scaling=0.125, **STATS, block_m=16, block_n=16)
    assert (result.lse[:, :, :8] == float("-inf")).all() and (result.output[:, :8] == 0).all()
    assert_matches(result, independent(q, k, v, 0.125, allowed_by_rule((1, 2, 20, 12))), torch.float32)


def test_head_dim_128(kernel_device):
    q, k, v = inputs(1, 2, 1, 17, 33, head_dim=128, dtype=torch.float16, device=kernel_device, seed=8)
    result = flash_attention_triton(q, k, v, scaling=128 ** -0.5, **STATS, block_n=16)
    assert_matches(result, independent(q, k, v, 128 ** -0.5, allowed_by_rule((1, 2, 17, 33))), torch.float16)


def test_statistics_only_when_asked(kernel_device):
    q, k, v = inputs(1, 2, 1, 4, 20, device=kernel_device)
    plain = flash_attention_triton(q, k, v, scaling=0.125)
    assert plain.lse is None and plain.entropy is None and plain.key_mass is None
    torch.testing.assert_close(plain.output, flash_attention_triton(q, k, v, scaling=0.125, **STATS).output)


def test_dispatch_runs_the_reference_on_cpu():
    q, k, v = inputs(1, 4, 2, 6, 10, head_dim=24)  # the reference takes any head_dim
    result = flash_attention(q, k, v, scaling=0.2, **STATS)
    expected = flash_attention_reference(q, k, v, scaling=0.2, **STATS)
    torch.testing.assert_close(result.output, expected.output)
    assert_matches(result, independent(q, k, v, 0.2, allowed_by_rule((1, 4, 6, 10))), torch.float32)


BAD = [
    (dict(window=-1), "window must be >= 0"),
    (dict(sinks=-2, window=4), "sinks must be >= 0"),
    (dict(window=4, sinks=5), r"sinks \(5\) must not exceed window \(4\)"),
    (dict(sinks=2), "sinks=2 needs window > 0"),
    (dict(block_size=24), "block_size must be a power of two >= 16"),
    (dict(block_mask=torch.ones(1, 4, 2, 2, dtype=torch.bool), block_size=16), r"= \(1, 4, 1, 2\); got"),
    (dict(block_mask=torch.ones(1, 4, 1, 2)), "block_mask must be a bool tensor"),
    (dict(mask=torch.ones(1, 3, 6, 20, dtype=torch.bool)), "mask must be a bool tensor broadcastable"),
    (dict(mask=torch.ones(6, 20)), "mask must be a bool tensor"),
]


@pytest.mark.parametrize("options,message", BAD)
def test_bad_parameters(options, message):
    q, k, v = inputs(1, 4, 2, 6, 20)
    for function in (flash_attention_triton, flash_attention_reference):
        with pytest.raises(ParameterError, match=message):
            function(q, k, v, scaling=0.125, **options)


def test_bad_shapes_and_head_dims():
    q, k, v = inputs(1, 4, 2, 6, 20, head_dim=32)
    with pytest.raises(ParameterError,
                       match=r"head_dim 32 is not supported by the flash kernel \(supported: 64, 128\)"):
        flash_attention_triton(q, k, v, scaling=0.125)
    q, k, v = inputs(1, 3, 2, 6, 20)
    with pytest.raises(ParameterError, match=r"query heads \(3\) must be a multiple of kv heads \(2\)"):
        flash_attention_triton(q, k, v, scaling=0.125)
    q, k, v = inputs(1, 4, 2, 6, 20)
    with pytest.raises(ParameterError, match="k and v must both be"):
        flash_attention_triton(q, k, v[:, :, :5], scaling=0.125)
    with pytest.raises(ParameterError, match="must share one dtype"):
        flash_attention_triton(q, k.half(), v, scaling=0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("q_len,k_len", [(1000, 1000), (1, 5000), (4, 3000), (300, 2300)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bfloat16_on_gpu(q_len, k_len, head_dim):
    q, k, v = inputs(2, 32, 8, q_len, k_len, head_dim=head_dim, dtype=torch.bfloat16, device="cuda", seed=9)
    scaling = head_dim ** -0.5
    for options in ({}, dict(window=256, sinks=4)):
        result = flash_attention_triton(q, k, v, scaling=scaling, **options, **STATS)
        expected = flash_attention_reference(q, k, v, scaling=scaling, **options, **STATS)
        torch.testing.assert_close(result.output.float(), expected.output.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(result.lse, expected.lse, atol=2e-2, rtol=1e-3)
        torch.testing.assert_close(result.entropy, expected.entropy, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(result.key_mass, expected.key_mass, atol=5e-2, rtol=2e-2)
    assert math.isfinite(result.entropy.sum().item())
