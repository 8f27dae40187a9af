"""Sparse and alternative attention variants against an independent dense computation (a plain masked softmax
written here, not workbench's reference), on hand-checkable patterns, planted keys, decode and GQA shapes; and
their fused path: what they hand the kernel must mean the same attention as their dense kept mask. The kernel
is emulated from its documented visibility rule (so this runs without a GPU), and the real
workbench.kernels.flash_attention (its torch reference on CPU) is checked the same way."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from workbench.attention import sparsity
from workbench.attention.base import AttentionCall
from workbench.attention.block_sparse import BlockSparse
from workbench.attention.entropy_guided import EntropyGuided
from workbench.attention.heterogeneous import MPCViT
from workbench.attention.hybrid import Hybrid
from workbench.attention.pbs import PBS
from workbench.attention.topk_retrieval import TopKRetrieval
from workbench.attention.window import SinkWindow, SlidingWindow
from workbench.errors import ParameterError

ALL = frozenset({"entropy", "probs", "key_mass"})

SPARSE = {
    "sliding_window": SlidingWindow(window=5),
    "sink_window": SinkWindow(sinks=2, window=5),
    "hybrid_band": Hybrid(every=2, offset=1, sinks=2, window=6),
    "hybrid_strided": Hybrid(every=2, offset=1, sinks=2, window=6, stride=2, block_size=16),
    "a_shape": BlockSparse(pattern="a_shape", sinks=2, window=8),
    "vertical_slash": BlockSparse(vertical=4, slash=4, sink_columns=2, local_diagonals=2, last_q=8),
    "block_topk": BlockSparse(pattern="block_topk", block_size=16, top_k=1),
    "pbs": PBS(block_size=16, segment=32, top_k=1, last_q=8),
    "pbs_threshold_kv_head": PBS(block_size=16, segment=32, threshold=0.5, permute="kv_head", last_q=8),
    "topk_exact": TopKRetrieval(top_k=5, sinks=1, window=2, dense_prefill=False),
    "topk_pages": TopKRetrieval(select="pages", top_k=8, page_size=4, sinks=1, window=2, dense_prefill=False,
                                dense_layers=0),
}


def make_call(q_len, k_len, *, batch=1, heads=4, kv_heads=2, dim=16, seed=0, layer=0, mask=None, scaling=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=g)
    return AttentionCall(layer, q, k, v, mask, dim ** -0.5 if scaling is None else scaling,
                         SimpleNamespace(layer_idx=layer))


def causal(q_len, k_len):
    return torch.ones(q_len, k_len).tril(k_len - q_len).bool()


def dense(call, keep):
    """Masked softmax attention in float64: (output (batch, q, heads, dim), probs (batch, heads, q, k))."""
    heads, kv_heads = call.query.shape[1], call.key.shape[1]
    index = [h // (heads // kv_heads) for h in range(heads)]
    k, v = call.key[:, index].double(), call.value[:, index].double()
    s = torch.einsum("bhqd,bhkd->bhqk", call.query.double(), k) * call.scaling
    p = s.masked_fill(~keep, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bhkd->bqhd", p, v), p


def check_against_dense(variant, call):
    kept = variant.kept_mask(call)
    allowed = causal(call.query.shape[2], call.key.shape[2]) if call.mask is None else call.mask
    assert not (kept & ~allowed).any(), "a kept key the query may not see"
    kept = kept.expand(call.query.shape[0], call.query.shape[1], -1, -1)
    own = call.key.shape[2] - call.query.shape[2] + torch.arange(call.query.shape[2])
    if call.mask is None:
        assert kept[..., torch.arange(call.query.shape[2]), own].all(), "every query keeps its own key"
    result = variant.attend(call, ALL)
    output, probs = dense(call, kept)
    torch.testing.assert_close(result.output.double(), output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.probs.double(), probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.entropy.double(), torch.special.entr(probs).sum(-1), atol=1e-4, rtol=1e-4)
    groups = call.query.shape[1] // call.key.shape[1]
    mass = probs.sum(2).unflatten(1, (-1, groups)).sum(2)
    torch.testing.assert_close(result.key_mass.double(), mass, atol=1e-4, rtol=1e-4)
    return kept


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("q_len", [70, 20, 1], ids=["prefill", "chunk", "decode"])
def test_output_is_dense_attention_under_the_kept_mask(name, q_len):
    call = make_call(q_len, 70, batch=2)
    kept = check_against_dense(SPARSE[name], call)
    if q_len == 70:
        assert kept.sum() < causal(70, 70).sum() * 2 * 4, "the prefill pattern drops something"


@pytest.mark.parametrize("name", SPARSE)
def test_cache_slot_mask_is_respected(name):
    # an evicting cache's per-head slot mask: the second KV head holds 6 fewer tokens (padding at the end)
    call = make_call(4, 40)
    mask = causal(4, 40)[None, None].repeat(1, 4, 1, 1)
    mask[:, 2:] = torch.arange(40)[None] <= (30 + torch.arange(4))[:, None]  # its queries are slots 30..33
    call.mask = mask
    check_against_dense(SPARSE[name], call)


def test_sink_window_hand_pattern():
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 0],
                             [1, 1, 0, 1, 1, 1]]).bool()
    kept = SinkWindow(sinks=2, window=3).kept_mask(make_call(6, 6))
    assert torch.equal(kept[0, 0], expected)
    window = SlidingWindow(window=2).kept_mask(make_call(4, 4))[0, 0]
    assert torch.equal(window, torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]).bool())


def test_window_counts_the_keys_a_query_may_see():
    # slots 3..6 hold nothing for this query (a cache slot mask): the window reaches further back
    call = make_call(1, 10, heads=2, kv_heads=2)
    call.mask = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1, 1, 1]).bool().view(1, 1, 1, 10)
    kept = SinkWindow(sinks=1, window=4).kept_mask(call)[0, 0, 0]
    assert kept.nonzero().flatten().tolist() == [0, 2, 7, 8, 9]


def test_hybrid_layers_and_strided_blocks():
    variant = Hybrid(every=3, offset=0, sinks=0, window=1, stride=2, block_size=16)
    assert [variant.full_layer(layer) for layer in range(7)] == [True, False, False, True, False, False, True]
    assert torch.equal(variant.kept_mask(make_call(64, 64, layer=3))[0, 0], causal(64, 64))
    kept = variant.kept_mask(make_call(1, 64, layer=1))[0, 0, 0]
    assert kept.nonzero().flatten().tolist() == list(range(16)) + list(range(32, 48)) + [63]


def test_block_topk_picks_the_tile_of_a_planted_key():
    call = make_call(16, 64, dim=16, seed=1)
    base = torch.randn(16, generator=torch.Generator().manual_seed(2))
    call.query = base + 0.1 * call.query
    call.key = 0.1 * call.key
    call.key[:, :, 5] = 8 * base
    kept = BlockSparse(pattern="block_topk", block_size=16, top_k=1).kept_mask(call)
    expected = causal(16, 64) & ((torch.arange(64) < 16) | (torch.arange(64) >= 48))
    assert torch.equal(kept[0], expected.expand(4, -1, -1))


def test_vertical_slash_finds_a_planted_column_and_diagonal():
    n, dim = 32, 64
    eye = torch.eye(dim)
    query = 5 * eye[:n] + eye[63]  # query p points at direction p (and a little at 63)
    key = 5 * eye[3:n + 3]  # key j points at direction j + 3: diagonal 3 (p - j = 3) scores 25
    key[7] += 25 * eye[63]  # key 7 scores 25 for every query: a vertical line
    call = make_call(n, n, heads=2, kv_heads=1, dim=dim, scaling=1.0)
    call.query, call.key = query.expand(1, 2, -1, -1).clone(), key.expand(1, 1, -1, -1).clone()
    kept = BlockSparse(vertical=1, slash=2, sink_columns=0, local_diagonals=1, last_q=8).kept_mask(call)
    p, j = torch.arange(n)[:, None], torch.arange(n)[None]
    expected = causal(n, n) & ((j == 7) | (p - j == 0) | (p - j == 3))
    assert torch.equal(kept[0], expected.expand(2, -1, -1))


def test_retrieval_selects_the_planted_key_and_its_page():
    call = make_call(1, 64, seed=3)
    call.key = 0.1 * call.key
    call.key[:, 0, 21] = 3 * call.query[0, 0, 0]
    call.key[:, 1, 21] = 3 * call.query[0, 2, 0]
    pages = TopKRetrieval(select="pages", top_k=8, page_size=8, min_pages=1, sinks=0, window=1,
                          dense_prefill=False, dense_layers=0).kept_mask(call)
    exact = TopKRetrieval(select="exact", top_k=1, sinks=0, window=1, dense_prefill=False).kept_mask(call)
    for head in (0, 2):  # the heads whose query the planted key matches
        assert pages[0, head, 0].nonzero().flatten().tolist() == list(range(16, 24)) + [63]
        assert exact[0, head, 0].nonzero().flatten().tolist() == [21, 63]


def test_pbs_permutation_stays_within_segments():
    call = make_call(40, 70)
    order = PBS(block_size=16, segment=32).permutation(call)
    for start in range(0, 70, 32):
        segment = order[..., start:start + 32]
        assert torch.equal(segment.sort(-1).values, torch.arange(start, min(start + 32, 70)).expand_as(segment))


def recall(variant, call):
    _, probs = dense(call, causal(call.query.shape[2], call.key.shape[2]))
    return (probs * variant.kept_mask(call)).sum(-1).mean().item()


def test_pbs_needs_fewer_tiles_than_block_topk_for_the_same_recall():
    # important keys one per tile of the first segment: block top-k needs all four tiles, PBS packs them in one
    call = make_call(128, 128, seed=4)
    base = torch.randn(16, generator=torch.Generator().manual_seed(5))
    call.query = base + 0.3 * call.query
    call.key = 0.3 * call.key
    call.key[:, :, [3, 19, 35, 51]] = 4 * base
    pbs = PBS(block_size=16, segment=64, top_k=1, last_q=16, keep_first=False)
    pbs_recall = recall(pbs, call)
    pbs_tiles = pbs.sparsity(call).block_mask.sum().item() / 4
    assert pbs_recall > 0.999
    needed = next(k for k in range(1, 9)
                  if recall(BlockSparse(pattern="block_topk", block_size=16, top_k=k), call) >= pbs_recall - 1e-4)
    topk_tiles = BlockSparse(pattern="block_topk", block_size=16, top_k=needed).sparsity(call).block_mask.sum()
    assert needed == 4 and pbs_tiles == 24 and topk_tiles.item() / 4 == 30
    assert recall(BlockSparse(pattern="block_topk", block_size=16, top_k=1), call) < 0.99


COVERING = {
    "sliding_window": SlidingWindow(window=70),
    "sink_window": SinkWindow(sinks=0, window=70),
    "hybrid": Hybrid(every=1),
    "hybrid_sparse_layer": Hybrid(every=2, offset=1, window=70, stride=1, block_size=16),
    "a_shape": BlockSparse(pattern="a_shape", sinks=0, window=70),
    "vertical_slash": BlockSparse(vertical=70, slash=1, last_q=4),
    "block_topk": BlockSparse(pattern="block_topk", block_size=16, top_k=5),
    "pbs": PBS(block_size=16, segment=32, top_k=5),
    "topk_exact": TopKRetrieval(top_k=70, sinks=0, window=0),
    "topk_pages": TopKRetrieval(select="pages", top_k=70, page_size=16, sinks=0, window=0),
}


@pytest.mark.parametrize("name", COVERING)
def test_a_pattern_covering_everything_is_full_causal_attention(name):
    call = make_call(30, 70)
    kept = COVERING[name].kept_mask(call)
    assert torch.equal(kept.expand(1, 4, -1, -1), causal(30, 70).expand(1, 4, -1, -1))
    output, _ = dense(call, causal(30, 70))
    torch.testing.assert_close(COVERING[name].attend(call, frozenset()).output.double(), output,
                               atol=1e-5, rtol=1e-5)


# -- softmax-free heads (MPCViT) ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["relu", "linear"])
@pytest.mark.parametrize("q_len", [12, 1])
def test_mpcvit_heads(kind, q_len):
    call = make_call(q_len, 12)
    result = MPCViT(kind=kind, heads="0,3", relu_norm="n").attend(call, ALL)  # the paper's sum: test_attention_fidelity
    keep = causal(q_len, 12)
    output, probs = dense(call, keep)
    for head in (1, 2):  # softmax heads are untouched
        torch.testing.assert_close(result.output[:, :, head].double(), output[:, :, head], atol=1e-5, rtol=1e-5)
    s = torch.einsum("bhqd,bhkd->bhqk", call.query.double(), call.key[:, [0, 0, 1, 1]].double()) * call.scaling
    s = s.clamp_min(0) if kind == "relu" else s
    weights = s.masked_fill(~keep, 0) / keep.sum(-1, keepdim=True)
    cheap = torch.einsum("bhqk,bhkd->bqhd", weights, call.value[:, [0, 0, 1, 1]].double())
    for head in (0, 3):
        torch.testing.assert_close(result.output[:, :, head].double(), cheap[:, :, head], atol=1e-5, rtol=1e-5)
        rows = (weights[:, head].abs() / weights[:, head].abs().sum(-1, keepdim=True)).nan_to_num(0.0)  # 0/0 rows
        torch.testing.assert_close(result.probs[:, head].double(), rows, atol=1e-5, rtol=1e-5)
    assert MPCViT(kind=kind).kept_mask(call) is None


def test_mpcvit_fraction_and_head_checks():
    assert MPCViT(fraction=0.5).cheap_heads(4) == [0, 1]
    assert MPCViT(fraction=0.0).cheap_heads(9) == []
    assert MPCViT(heads="3, 1").cheap_heads(4) == [1, 3]
    with pytest.raises(ParameterError, match="has 4 query heads"):
        MPCViT(heads="0,7").attend(make_call(3, 3), frozenset())
    for bad in ("a", "0;1", "-1"):
        with pytest.raises(ParameterError, match="heads"):
            MPCViT(heads=bad)


# -- entropy-guided temperatures -------------------------------------------------------------------------
def normalized_entropy(probs, keep):
    return torch.special.entr(probs).sum(-1) / keep.sum(-1).double().log()


def test_entropy_guided_keeps_rows_in_the_band():
    call = make_call(1, 40, seed=6)
    call.query[0, 0] *= 0.1  # near uniform: entropic overload
    call.query[0, 1] *= 100.0  # near one key: entropy collapse
    variant = EntropyGuided(max_entropy=0.8, min_entropy=0.3, max_temperature=100.0)
    result = variant.attend(call, ALL)
    keep = causal(1, 40)
    _, plain = dense(call, keep)
    before, after = normalized_entropy(plain, keep), normalized_entropy(result.probs.double(), keep)
    assert before[0, 0, 0] > 0.99 and before[0, 1, 0] < 0.2
    torch.testing.assert_close(after[0, 0, 0].item(), 0.8, atol=1e-4, rtol=0)
    torch.testing.assert_close(after[0, 1, 0].item(), 0.3, atol=1e-4, rtol=0)
    temperatures = variant.temperatures(call)[0, :, 0]
    assert temperatures[0] < 1 < temperatures[1]
    in_band = (before > 0.3) & (before < 0.8)
    assert torch.allclose(after[in_band], before[in_band], atol=1e-6)
    # the output is softmax attention at those temperatures
    index = [0, 0, 1, 1]
    beta = 1 / temperatures.double()
    s = torch.einsum("hd,hkd->hk", call.query[0, :, 0].double(), call.key[0, index].double()) * call.scaling
    expected = torch.einsum("hk,hkd->hd", (s * beta[:, None]).softmax(-1), call.value[0, index].double())
    torch.testing.assert_close(result.output[0, 0].double(), expected, atol=1e-5, rtol=1e-5)
    assert variant.kept_mask(call) is None


def test_entropy_guided_with_an_open_band_is_plain_attention():
    call = make_call(9, 9)
    result = EntropyGuided(max_entropy=1.0, min_entropy=0.0).attend(call, frozenset({"entropy"}))
    output, probs = dense(call, causal(9, 9))
    torch.testing.assert_close(result.output.double(), output, atol=1e-5, rtol=1e-5)
    diagnostics = EntropyGuided.normalized_entropy(call)
    assert diagnostics[..., 0].eq(0).all() and diagnostics.le(1 + 1e-6).all()


# -- parameters ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, message", [
    (lambda: SlidingWindow(window=0), "window"),
    (lambda: SinkWindow(sinks=5, window=3), "sinks"),
    (lambda: Hybrid(sinks=8, window=4), "sinks"),
    (lambda: Hybrid(block_size=24), "power of two"),
    (lambda: BlockSparse(block_size=48), "power of two"),
    (lambda: BlockSparse(block_size=8), "block_size"),
    (lambda: BlockSparse(pattern="diagonal"), "a_shape"),
    (lambda: BlockSparse(top_k=0), "top_k"),
    (lambda: PBS(segment=40, block_size=16), "multiple"),
    (lambda: PBS(threshold=1.5), "threshold"),
    (lambda: Hybrid(offset=2), "offset"),
    (lambda: Hybrid(every=3, full_fraction=0.5), "full_fraction"),
    (lambda: TopKRetrieval(top_k=0), "top_k"),
    (lambda: TopKRetrieval(select="ann"), "exact"),
    (lambda: MPCViT(kind="gelu"), "relu"),
    (lambda: EntropyGuided(min_entropy=0.5, max_entropy=0.4), "min_entropy"),
])
def test_bad_parameters_raise(build, message):
    with pytest.raises(ParameterError, match=message):
        build()


@pytest.mark.parametrize("variant", [*SPARSE.values(), MPCViT(), EntropyGuided()], ids=str)
def test_describe_shows_the_values_in_use(variant):
    """describe() reports this instance (the test's non-default parameters), not the class's defaults."""
    text = variant.describe()
    for spec in variant.parameters():
        assert f"{spec.name} = {getattr(variant, spec.name)!r}:" in text, spec.name
    assert variant.paper and (variant.departs is None or variant.departs in text)


# -- the fused kernel path ---------------------------------------------------------------------------------
def emulated_flash_attention(q, k, v, *, scaling, causal=True, window=0, sinks=0, block_mask=None, block_size=64,
                             mask=None, lse=False, entropy=False, key_mass=False):
    """Key j visible to query i iff causal (j <= K-Q+i), window (j > K-Q+i-window or j < sinks), its tile is
    True in block_mask, and mask allows it - the documented contract of workbench.kernels.flash_attention."""
    batch, heads, q_len, _ = q.shape
    k_len, groups = k.shape[2], heads // k.shape[1]
    slot = (k_len - q_len + torch.arange(q_len))[:, None]
    j = torch.arange(k_len)[None]
    seen = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        seen &= j <= slot
    if window > 0:
        seen &= (j > slot - window) | (j < sinks)
    seen = seen.expand(batch, heads, -1, -1)
    if block_mask is not None:
        tiles = block_mask[..., torch.arange(q_len) // block_size, :][..., torch.arange(k_len) // block_size]
        seen = seen & tiles
    if mask is not None:
        seen = seen & mask
    kk, vv = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    p = (torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * scaling).masked_fill(~seen, float("-inf")).softmax(-1)
    return SimpleNamespace(output=torch.einsum("bhqk,bhkd->bqhd", p, vv).to(q.dtype), lse=None,
                           entropy=torch.special.entr(p).sum(-1).float() if entropy else None,
                           key_mass=p.sum(2).unflatten(1, (-1, groups)).sum(2).float() if key_mass else None)


def kernels():
    found = [pytest.param(emulated_flash_attention, id="emulated")]
    if importlib.util.find_spec("workbench.kernels.flash_attention") is not None:  # the real one, when written
        found.append(pytest.param("real", id="real"))
    return found


def slot_masked(call):
    """The call with an evicting cache's slot mask: the second KV head's tokens end 6 slots early."""
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    mask = causal(q_len, k_len)[None, None].repeat(1, call.query.shape[1], 1, 1)
    mask[:, 2:] = torch.arange(k_len)[None] <= (k_len - 6 - q_len + torch.arange(q_len))[:, None]
    call.mask = mask
    return call


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("shape", ["prefill", "decode", "slot_mask"])
def test_fused_path_matches_the_reference_path(monkeypatch, kernel, name, shape):
    if kernel == "real":
        from workbench.kernels.flash_attention import flash_attention as kernel
    call = make_call(1 if shape == "decode" else 50, 70, batch=2)
    if shape == "slot_mask":
        call = slot_masked(make_call(10, 70))
    call.probs_heads = (1, 3)
    variant = SPARSE[name]
    reference = variant.attend(call, ALL)
    monkeypatch.setattr(sparsity, "_fused_kernel", lambda c: kernel)
    fused = variant.attend(call, ALL)
    torch.testing.assert_close(fused.output, reference.output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.entropy, reference.entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused.key_mass, reference.key_mass, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused.probs, reference.probs[:, [1, 3]], atol=1e-5, rtol=1e-5)


def test_native_window_reaches_the_kernel_as_window_and_sinks():
    args = sparsity.kernel_arguments(make_call(8, 8), SPARSE["sink_window"].sparsity(make_call(8, 8)))
    assert (args["window"], args["sinks"], args["mask"], args["block_mask"]) == (5, 2, None, None)


def test_pbs_hands_the_kernel_permuted_then_ordered_keys():
    call = make_call(40, 70)
    pattern = SPARSE["pbs"].sparsity(call)
    args = sparsity.kernel_arguments(call, pattern)
    padded = 80  # 70 keys in whole 16-slot tiles
    assert args["key"].shape[2] == padded + 70 and args["block_mask"].shape[-1] == 2 * 5
    per_head = call.key.repeat_interleave(2, dim=1)  # one key order per query head: keys copied per query head
    torch.testing.assert_close(args["key"][:, :, padded:], per_head)
    permuted = per_head.gather(2, pattern.order[..., None].expand(-1, -1, -1, 16))
    torch.testing.assert_close(args["key"][:, :, :70], permuted)
    assert args["causal"] and args["mask"] is None
