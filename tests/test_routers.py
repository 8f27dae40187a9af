"""Routing policies against independent references: transformers' own MoE models at another top-k, and the
choices worked out in the test from the recorded router logits."""

import math

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.errors import ParameterError, WorkbenchError
from workbench.models.tiny import build_tiny

PROMPT = "routing policies, one token at a time"


def _tokens(model, router, n=8, record=None):
    return wb.generate(model, PROMPT, router=router, max_new_tokens=n, ignore_eos=True, record=record)


def _hf_greedy(hf, model, n=8):
    ids = model.encode(PROMPT)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_equals_transformers_model_built_with_that_k(family, k):
    """The same weights in a transformers model whose config says num_experts_per_tok=k: its own routing at k."""
    model = wb.models.tiny(family)
    reference = build_tiny(family, num_experts_per_tok=k)
    assert all(torch.equal(a, b) for a, b in zip(model.hf.parameters(), reference.parameters()))
    assert _tokens(model, wb.routers.get("top_k", k=k)).token_ids == _hf_greedy(reference, model)


def test_top_k_more_than_the_experts_is_refused():
    with pytest.raises(ParameterError, match="more than the 4 experts"):
        _tokens(wb.models.tiny("mixtral"), wb.routers.get("top_k", k=5), n=1)


def test_top_p_chooses_the_smallest_prefix_reaching_p():
    model = wb.models.tiny("mixtral")
    run = _tokens(model, wb.routers.get("top_p", p=0.6, max_k=4), record=["routing", "router_logits"])
    logits = run.trace.router_logits.values[0]  # (step, layer, expert)
    ids = run.trace.expert_ids.values[0]
    weights = run.trace.expert_weights.values[0]
    sizes = set()
    for step in range(logits.shape[0]):
        for layer in range(logits.shape[1]):
            probs = np.exp(logits[step, layer] - logits[step, layer].max())
            probs /= probs.sum()
            order = np.argsort(-probs)
            n = next(i + 1 for i in range(len(order)) if probs[order[:i + 1]].sum() >= 0.6)
            chosen = ids[step, layer][ids[step, layer] >= 0]
            assert chosen.tolist() == order[:n].tolist()
            assert np.allclose(weights[step, layer][:n], probs[order[:n]] / probs[order[:n]].sum(), atol=1e-5)
            sizes.add(n)
    assert len(sizes) > 1  # the number of experts really varies


def test_top_p_extremes_are_top_1_and_all_experts():
    model = wb.models.tiny("mixtral")
    assert _tokens(model, wb.routers.get("top_p", p=0.0)).token_ids == _hf_greedy(
        build_tiny("mixtral", num_experts_per_tok=1), model)
    assert _tokens(model, wb.routers.get("top_p", p=1.0, max_k=4)).token_ids == _hf_greedy(
        build_tiny("mixtral", num_experts_per_tok=4), model)


def test_drop_takes_the_best_remaining_experts():
    model = wb.models.tiny("mixtral")
    run = _tokens(model, wb.routers.get("drop", experts="1,2", layers="1"), record=["routing",
                                                                                                "router_logits"])
    logits, ids = run.trace.router_logits.values[0], run.trace.expert_ids.values[0]
    assert not np.isin(ids[:, 1], [1, 2]).any()
    masked = logits[:, 1].copy()
    masked[:, [1, 2]] = -np.inf
    assert (np.sort(ids[:, 1], -1) == np.sort(np.argsort(-masked, -1)[:, :2], -1)).all()
    native = _tokens(model, "native", record=["routing"]).trace.expert_ids.values[0]
    assert np.isin(native[:, 1], [1, 2]).any()  # the dropped experts were used before
    with pytest.raises(ParameterError, match="leaves 1 experts"):
        _tokens(model, wb.routers.get("drop", experts="0,1,2"), n=1)


def test_random_routing_is_seeded_and_distinct():
    model = wb.models.tiny("mixtral")
    runs = [_tokens(model, wb.routers.get("random", seed=s), record=["routing"]) for s in (0, 0, 1)]
    ids = [r.trace.expert_ids.values[0] for r in runs]
    assert (ids[0] == ids[1]).all() and not (ids[0] == ids[2]).all()
    assert all(len(set(row)) == len(row) for row in ids[0].reshape(-1, ids[0].shape[-1]).tolist())


def test_capacity_drops_overflow_in_the_prefill():
    model = wb.models.tiny("mixtral")
    tokens = model.encode(PROMPT).shape[1]
    factor = 0.5
    run = _tokens(model, wb.routers.get("capacity", capacity_factor=factor), n=2, record=["routing"])
    prompt = run.trace.prompt_expert_ids.values[0]  # (query, layer, rank)
    capacity = math.ceil(factor * tokens * 2 / 4)
    for layer in range(model.num_layers):
        counts = np.bincount(prompt[:, layer][prompt[:, layer] >= 0], minlength=4)
        assert counts.max() <= capacity
        assert (prompt[:, layer] < 0).any()  # something overflowed
    roomy = _tokens(model, wb.routers.get("capacity", capacity_factor=4.0))
    assert roomy.token_ids == _tokens(model, "native").token_ids


def _lru_hits(ids: np.ndarray, capacity: int) -> int:
    """Hits of a per-layer LRU cache over a (tokens, layer, rank) trace: the test's own reference."""
    hits = 0
    for layer in range(ids.shape[1]):
        cache: list[int] = []
        for row in ids[:, layer]:
            for expert in row[row >= 0].tolist():
                hits += expert in cache
                if expert in cache:
                    cache.remove(expert)
                cache.append(expert)
            del cache[:-capacity]
    return hits


def test_cache_aware_routing_raises_hits_and_at_max_rank_k_is_native():
    model = wb.models.tiny("mixtral", num_local_experts=8)
    native = _tokens(model, "native", n=24, record=["routing"])
    same = _tokens(model, wb.routers.get("cache_aware", capacity=2, max_rank=2), n=24)
    assert same.token_ids == native.token_ids
    aware = _tokens(model, wb.routers.get("cache_aware", capacity=2, max_rank=4), n=24,
                    record=["routing"])
    hits = [_lru_hits(np.concatenate([r.trace.prompt_expert_ids.values[0], r.trace.expert_ids.values[0, 1:]]), 2)
            for r in (native, aware)]
    assert hits[1] > hits[0]
    with pytest.raises(ParameterError, match="capacity and max_rank"):
        _tokens(model, wb.routers.get("cache_aware", capacity=1), n=1)


def test_fidelity_measures_what_a_router_costs_against_native_routing():
    model = wb.models.tiny("mixtral")
    native = _tokens(model, "native", n=4, record=["fidelity"])
    top1 = _tokens(model, wb.routers.get("top_k", k=1), n=4, record=["fidelity"])
    assert np.allclose(native.trace.kl_vs_dense.values, 0, atol=1e-5)
    assert (top1.trace.kl_vs_dense.values > 1e-4).all()


def test_routers_refuse_a_dense_model():
    with pytest.raises(WorkbenchError, match="no MoE routers"):
        _tokens(wb.models.tiny("llama"), "top_k", n=1)
