"""Each attention variant against its paper's own rule, written out here independently of the code under test:
MInference's vertical-slash index rule, PBS's permuted cumulative-mass block selection, Quest's page bound and
page count, MPCViT's ReLU normalisation, LongGen's layer placement, and learned attention sinks (`s_aux`)
against transformers' own eager GPT-OSS attention."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, eager_attention_forward

from workbench.attention import reference
from workbench.attention.base import AttentionCall
from workbench.attention.block_sparse import BlockSparse
from workbench.attention.eager import Eager
from workbench.attention.entropy_guided import EntropyGuided
from workbench.attention.fidelity import attention_fidelity
from workbench.attention.flash import Flash
from workbench.attention.heterogeneous import MPCViT
from workbench.attention.hybrid import Hybrid
from workbench.attention.pbs import PBS
from workbench.attention.sdpa import SDPA
from workbench.attention.topk_retrieval import TopKRetrieval
from workbench.attention.window import SinkWindow
from workbench.errors import ParameterError, UnsupportedError

ALL = frozenset({"entropy", "probs", "key_mass"})


def make_call(q_len, k_len, *, heads=2, kv_heads=1, dim=16, seed=0, layer=0, phase="prefill", module=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, dim, generator=g) for h, n in ((heads, q_len), (kv_heads, k_len),
                                                                      (kv_heads, k_len)))
    module = SimpleNamespace(layer_idx=layer) if module is None else module
    return AttentionCall(layer, q, k, v, None, dim ** -0.5, module, phase=phase, start=k_len - q_len)


def causal(q_len, k_len):
    return torch.ones(q_len, k_len).tril(k_len - q_len).bool()


def masked_softmax_output(call, keep):
    """Dense softmax attention under `keep` (float64, keys repeated per query head): (batch, q, heads, dim)."""
    groups = call.query.shape[1] // call.key.shape[1]
    k, v = (x.double().repeat_interleave(groups, 1) for x in (call.key, call.value))
    s = torch.einsum("bhqd,bhkd->bhqk", call.query.double(), k) * call.scaling
    return torch.einsum("bhqk,bhkd->bqhd", s.masked_fill(~keep, float("-inf")).softmax(-1), v)


def head_scores(call, head):
    """Scaled scores (Q, K) of one query head in float64."""
    kv = head // (call.query.shape[1] // call.key.shape[1])
    return call.query[0, head].double() @ call.key[0, kv].double().T * call.scaling


# -- MInference vertical-slash ---------------------------------------------------------------------------------
def minference_vertical_slash(call, head, vertical, slash, last_q=64, sink_columns=30, local_diagonals=100):
    """MInference's rule for one head of a prefill: the last queries' causal softmax; column sums with the first
    30 columns forced; diagonal sums with the 100 nearest forced; top max(size, forced) of each."""
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    last = min(last_q, q_len)
    p = head_scores(call, head)[-last:].masked_fill(~causal(q_len, k_len)[-last:], float("-inf")).softmax(-1)
    columns = p.sum(0)
    columns[:sink_columns] = float("inf")
    diagonals = torch.zeros(k_len, dtype=torch.float64)
    for r in range(last):
        for j in range(k_len):
            offset = (k_len - last + r) - j
            if offset >= 0:
                diagonals[offset] += p[r, j]
    diagonals[:local_diagonals] = float("inf")
    cols = set(columns.topk(min(k_len, max(vertical, sink_columns))).indices.tolist())
    diags = set(diagonals.topk(min(k_len, max(slash, local_diagonals))).indices.tolist())
    keep = torch.zeros(q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        for j in range(k_len - q_len + i + 1):
            keep[i, j] = j in cols or (k_len - q_len + i - j) in diags
    return keep


@pytest.mark.parametrize("forced", [(30, 100), (0, 1)], ids=["minference", "main_diagonal_only"])
def test_vertical_slash_matches_minference_rule(forced):
    call = make_call(160, 160)
    variant = BlockSparse(vertical=40, slash=110, sink_columns=forced[0], local_diagonals=forced[1])
    kept = variant.kept_mask(call)
    for head in range(2):
        expected = minference_vertical_slash(call, head, 40, 110, sink_columns=forced[0],
                                             local_diagonals=forced[1])
        assert torch.equal(kept[0, head], expected)
    assert (causal(160, 160) & ~kept[0]).any()  # the budgets leave keys out
    torch.testing.assert_close(variant.attend(call, frozenset()).output.double(),
                               masked_softmax_output(call, kept), atol=1e-5, rtol=1e-5)


def test_vertical_slash_defaults_are_minference():
    variant = BlockSparse()
    assert (variant.sink_columns, variant.local_diagonals, variant.last_q) == (30, 100, 64)
    kept = variant.kept_mask(make_call(200, 200))[0]
    i, j = torch.arange(200)[:, None], torch.arange(200)[None]
    assert kept[:, causal(200, 200) & ((j < 30) | (i - j < 100))].all()  # first columns, nearest diagonals
    assert (causal(200, 200) & ~kept).any()  # and still sparse


@pytest.mark.parametrize("variant", [BlockSparse(), BlockSparse(pattern="a_shape", sinks=2, window=4),
                                     BlockSparse(pattern="block_topk", block_size=16, top_k=1)], ids=str)
def test_minference_decode_runs_dense(variant):
    call = make_call(1, 300, phase="decode")
    assert variant.kept_mask(call).all()
    torch.testing.assert_close(variant.attend(call, frozenset()).output.double(),
                               masked_softmax_output(call, causal(1, 300)), atol=1e-5, rtol=1e-5)
    sparse = BlockSparse(**{**variant.params(), "sparse_decode": True})
    if variant.pattern != "block_topk":  # one query tile: block top-k with a single tile row may keep all
        assert not sparse.kept_mask(call).all()


# -- PBS -------------------------------------------------------------------------------------------------------
def pbs_reference(call, head, block, segment, threshold):
    """PBS-Attn's prefill rule for one query head (Q == K): keys sorted within segments by the mean attention of
    the last query block; per query block, softmax of pooled (mean q . mean permuted k) scores over the blocks of
    earlier segments, blocks kept in descending order until the cumulative share reaches the threshold, plus the
    block holding the first token; the query's own segment dense (causal). Returns the token mask (Q, K)."""
    n = call.query.shape[2]
    s = head_scores(call, head)
    p_last = s[-block:].masked_fill(~causal(n, n)[-block:], float("-inf")).softmax(-1).mean(0)
    order = torch.cat([torch.argsort(p_last[a:a + segment], descending=True) + a for a in range(0, n, segment)])
    q = call.query[0, head].double()
    k = call.key[0, head // (call.query.shape[1] // call.key.shape[1])].double()[order]
    n_blocks, per_segment = n // block, segment // block
    pooled = (q.view(n_blocks, block, -1).mean(1) @ k.view(n_blocks, block, -1).mean(1).T) * call.scaling
    keep = causal(n, n).clone()
    for qb in range(n_blocks):
        eligible = [kb for kb in range(n_blocks) if kb // per_segment < qb // per_segment]
        rows = slice(qb * block, (qb + 1) * block)
        same_segment = torch.arange(n) // segment == qb // per_segment
        token_keep = same_segment.clone()
        if eligible:
            probs = pooled[qb, eligible].softmax(-1)
            ranked = probs.argsort(descending=True)
            total, chosen = 0.0, []
            for r in ranked.tolist():
                chosen.append(eligible[r])
                total += probs[r].item()
                if total >= threshold:
                    break
            first_block = (order == 0).nonzero().item() // block
            if first_block in eligible:
                chosen.append(first_block)
            for kb in chosen:
                token_keep[order[kb * block:(kb + 1) * block]] = True
        keep[rows] &= token_keep
    return keep


def test_pbs_matches_the_paper_rule():
    call = make_call(128, 128, heads=2, kv_heads=1, seed=3)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 16, generator=g)  # each query head looks for its own direction...
    call.query = 3 * base[None, :, None] + 0.5 * call.query
    call.key = 0.5 * call.key
    call.key[0, 0, [5, 21, 40, 70]] += 2 * base[0]  # ...planted in scattered keys of the shared KV head
    call.key[0, 0, [12, 33, 50, 90]] += 2 * base[1]
    variant = PBS(block_size=16, segment=32)  # the paper's threshold 0.9, per-head order, first block kept
    kept = variant.kept_mask(call)
    for head in range(2):
        assert torch.equal(kept[0, head], pbs_reference(call, head, 16, 32, 0.9)), head
    assert not torch.equal(kept[0, 0], kept[0, 1])  # each query head has its own order and tiles
    assert kept.sum() < causal(128, 128).sum() * 2
    torch.testing.assert_close(variant.attend(call, frozenset()).output.double(),
                               masked_softmax_output(call, kept), atol=1e-5, rtol=1e-5)


def test_pbs_defaults_are_the_papers_and_decode_is_dense():
    variant = PBS()
    assert (variant.threshold, variant.block_size, variant.segment, variant.top_k) == (0.9, 128, 256, 0)
    assert variant.permute == "query_head" and variant.keep_first
    call = make_call(1, 600, phase="decode")
    assert variant.kept_mask(call).all()
    torch.testing.assert_close(variant.attend(call, frozenset()).output.double(),
                               masked_softmax_output(call, causal(1, 600)), atol=1e-5, rtol=1e-5)


# -- Quest -----------------------------------------------------------------------------------------------------
def quest_pages(call, head, budget, page=16):
    """Quest's decode selection for one query head: page bound sum_d max(q_d min_k, q_d max_k) over each page of
    16 keys, the best max(3, budget // 16) pages (at most all), their keys kept."""
    q = call.query[0, head, -1].double()
    k = call.key[0, head // (call.query.shape[1] // call.key.shape[1])].double()
    k_len = k.shape[0]
    bounds = []
    for start in range(0, k_len, page):
        kp = k[start:start + page]
        bounds.append(torch.maximum(q * kp.min(0).values, q * kp.max(0).values).sum())
    n_pages = min(max(3, min(budget, k_len) // page), len(bounds))
    keep = torch.zeros(k_len, dtype=torch.bool)
    for p in torch.stack(bounds).topk(n_pages).indices.tolist():
        keep[p * page:(p + 1) * page] = True
    return keep


@pytest.mark.parametrize("budget", [32, 80])
def test_quest_pages_match_the_paper(budget):
    call = make_call(1, 150, heads=4, kv_heads=2, layer=2, phase="decode", seed=5)
    kept = TopKRetrieval(select="pages", top_k=budget).kept_mask(call)
    for head in range(4):
        assert torch.equal(kept[0, head, 0], quest_pages(call, head, budget))


def test_quest_runs_prefill_and_first_two_layers_dense():
    variant = TopKRetrieval(select="pages", top_k=32)
    assert torch.equal(variant.kept_mask(make_call(100, 100, layer=5))[0, 0], causal(100, 100))
    for layer in (0, 1):
        assert variant.kept_mask(make_call(1, 150, layer=layer, phase="decode")).all()
    assert not variant.kept_mask(make_call(1, 150, layer=2, phase="decode")).all()
    keep_prompt = TopKRetrieval(select="pages", top_k=32, dense_prefill=False, dense_layers=0)
    assert not torch.equal(keep_prompt.kept_mask(make_call(100, 100, layer=0))[0, 0], causal(100, 100))
    assert TopKRetrieval().setting("dense_layers") == 0 and TopKRetrieval().setting("window") == 16


# -- MPCViT ----------------------------------------------------------------------------------------------------
def test_mpcvit_relu_heads_normalise_by_the_relu_sum():
    call = make_call(6, 6, heads=2, kv_heads=1, seed=7)
    call.query[0, 0, 2] = -call.key[0, 0, 0] * 3  # row 2 sees keys 0..2: make every score there negative
    call.key[0, 0, 1:3] = call.key[0, 0, 0]
    result = MPCViT(kind="relu", heads="0").attend(call, ALL)
    s = head_scores(call, 0).masked_fill(~causal(6, 6), 0.0).clamp_min(0)
    total = s.sum(-1, keepdim=True)
    weights = torch.where(total > 0, s / total.clamp_min(1e-300), 0.0)  # all-negative row: zero weights
    expected = weights @ call.value[0, 0].double()
    torch.testing.assert_close(result.output[0, :, 0].double(), expected, atol=1e-5, rtol=1e-5)
    assert result.output[0, 2, 0].abs().max() == 0 and torch.isfinite(result.output).all()
    torch.testing.assert_close(result.probs[0, 0, [0, 1, 3, 4, 5]].double(), weights[[0, 1, 3, 4, 5]],
                               atol=1e-5, rtol=1e-5)


# -- LongGen ---------------------------------------------------------------------------------------------------
def gpt_like(num_layers, layer):
    return SimpleNamespace(layer_idx=layer, config=SimpleNamespace(num_hidden_layers=num_layers))


@pytest.mark.parametrize("num_layers", [32, 30, 12])
def test_hybrid_places_a_third_of_the_layers_full_in_the_middle(num_layers):
    variant = Hybrid(sinks=1, window=4)
    kept = [variant.kept_mask(make_call(40, 40, layer=layer, module=gpt_like(num_layers, layer)))[0, 0]
            for layer in range(num_layers)]
    full = [layer for layer in range(num_layers) if torch.equal(kept[layer], causal(40, 40))]
    assert len(full) == round(num_layers / 3)
    assert full == list(range(full[0], full[0] + len(full)))  # one contiguous block
    below, above = full[0], num_layers - 1 - full[-1]
    assert abs(below - above) <= 1  # centred
    if num_layers == 32:
        assert full == list(range(10, 21))


def test_hybrid_states_it_is_training_free_and_needs_the_layer_count():
    assert "training-free" in Hybrid().describe() and "Training-free" in Hybrid.summary
    with pytest.raises(ParameterError, match="num_hidden_layers"):
        Hybrid().kept_mask(make_call(8, 8))
    assert Hybrid(every=3).full_layer(3) and not Hybrid(every=3).full_layer(4)


# -- learned attention sinks (s_aux, GPT-OSS) ------------------------------------------------------------------
@pytest.fixture
def gpt_oss_call():
    config = GptOssConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=64,  # flash: 64
                          num_hidden_layers=1, intermediate_size=32, num_local_experts=2, num_experts_per_tok=1,
                          vocab_size=10)
    module = GptOssAttention(config, layer_idx=0).eval()
    with torch.no_grad():
        module.sinks.copy_(torch.tensor([2.0, -1.0, 0.5, 4.0]))
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, heads, 9, 64, generator=g) for heads in (4, 2, 2))
    return AttentionCall(0, q, k, v, None, module.scaling, module, {"s_aux": module.sinks.detach()})


def transformers_eager(call, keep):
    """transformers' own GPT-OSS eager attention under a bool mask: (output (b, q, h, d), weights (b, h, q, k))."""
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        return eager_attention_forward(call.module, call.query, call.key, call.value, additive, call.scaling)


def with_sink_entropy(weights):
    return torch.special.entr(weights).sum(-1) + torch.special.entr(1 - weights.sum(-1))


@pytest.mark.parametrize("variant", [Flash(), Eager()], ids=str)
def test_dense_variants_honour_learned_sinks(gpt_oss_call, variant):
    output, weights = transformers_eager(gpt_oss_call, causal(9, 9))
    assert (weights.sum(-1) < 0.99).any()  # the sinks took mass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # flash: "running dense reference attention instead"
        result = variant.attend(gpt_oss_call, ALL)
    torch.testing.assert_close(result.output, output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.probs, weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.entropy, with_sink_entropy(weights), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.key_mass, weights.sum(2).unflatten(1, (2, 2)).sum(2), atol=1e-5, rtol=1e-5)


def test_sparse_variant_and_fidelity_honour_learned_sinks(gpt_oss_call):
    variant = SinkWindow(sinks=1, window=3)
    keep = variant.kept_mask(gpt_oss_call)[0, 0]
    output, weights = transformers_eager(gpt_oss_call, keep)
    result = variant.attend(gpt_oss_call, ALL)
    torch.testing.assert_close(result.output, output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.entropy, with_sink_entropy(weights), atol=1e-5, rtol=1e-5)
    dense_output, _ = transformers_eager(gpt_oss_call, causal(9, 9))
    recall, error = attention_fidelity(gpt_oss_call, dense_output, causal(9, 9)[None, None])
    torch.testing.assert_close(recall, torch.ones_like(recall))  # all keys and the sink kept
    assert error.max() < 1e-5
    rows = reference.head_rows(gpt_oss_call, (1, 3))
    torch.testing.assert_close(rows, transformers_eager(gpt_oss_call, causal(9, 9))[1][:, [1, 3]], atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("variant", [SDPA(), MPCViT(), EntropyGuided()], ids=str)
def test_variants_that_cannot_honour_sinks_refuse(gpt_oss_call, variant):
    with pytest.raises(UnsupportedError, match="s_aux"):
        variant.attend(gpt_oss_call, frozenset())
