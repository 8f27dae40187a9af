"""Fidelity records: attention recall / output error against dense attention, and KL against a dense replay.
References are computed here independently: a plain softmax over the full scores, and the unmodified HF model."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import xarray as xr

import workbench as wb
from workbench.attention import AttentionCall, AttentionResult, AttentionVariant
from workbench.attention.fidelity import attention_fidelity

PROMPT = "Fidelity says what a sparse variant changed"


@dataclass
class LastKeys(AttentionVariant):
    """A test variant: each query sees only its last `keep` keys (causal)."""

    name = "last_keys"
    keep: int = 3

    def kept_mask(self, call: AttentionCall) -> torch.Tensor:
        q_len, k_len = call.query.shape[2], call.key.shape[2]
        query_at = torch.arange(q_len)[:, None] + k_len - q_len
        keys = torch.arange(k_len)[None, :]
        return ((keys <= query_at) & (keys > query_at - self.keep))[None, None]

    def attend(self, call, want):
        key = call.key.repeat_interleave(call.groups, 1)
        value = call.value.repeat_interleave(call.groups, 1)
        scores = (call.query @ key.transpose(-1, -2)) * call.scaling
        probs = torch.softmax(scores.masked_fill(~self.kept_mask(call), float("-inf")), -1)
        return AttentionResult((probs @ value).transpose(1, 2))


def test_recall_and_error_against_a_plain_softmax():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    call = AttentionCall(0, query, key, value, None, 8 ** -0.5, None)
    kept = torch.rand(1, 4, 5, 9) > 0.5
    output = torch.randn(1, 5, 4, 8)
    recall, error = attention_fidelity(call, output, kept)

    full = (query @ key.repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5
    causal = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=4)
    probs = torch.softmax(full.masked_fill(~causal, float("-inf")), -1)
    dense = (probs @ value.repeat_interleave(2, 1)).transpose(1, 2)
    torch.testing.assert_close(recall, (probs * kept).sum(-1))
    expected_error = (output - dense).norm(dim=-1) / dense.norm(dim=-1)
    torch.testing.assert_close(error, expected_error.transpose(1, 2))


def test_dense_run_has_full_recall_no_error_and_no_kl(tiny_llama):
    run = wb.generate(tiny_llama, PROMPT, record="fidelity", max_new_tokens=5, ignore_eos=True)
    trace = run.steps
    assert trace["attention_recall"].dims == ("step", "layer", "head")
    np.testing.assert_allclose(trace["attention_recall"].values, 1.0, atol=1e-5)
    np.testing.assert_allclose(trace["prompt_attention_recall"].values, 1.0, atol=1e-5)
    assert trace["attention_output_error"].values.max() < 1e-4
    assert trace["kl_vs_dense"].shape == (5,) and trace["kl_vs_dense"].values.max() < 1e-5


def test_sparse_variant_recall_matches_its_mask_and_kl_matches_hf(tiny_llama):
    model = tiny_llama
    run = wb.generate(model, PROMPT, attention=LastKeys(keep=3), record=["fidelity", "logits"], max_new_tokens=4,
                      ignore_eos=True)
    trace = run.steps
    recall = trace["attention_recall"].values
    assert (recall < 1.0 - 1e-3).any() and (recall > 0).all() and (recall <= 1 + 1e-6).all()
    assert trace["attention_output_error"].values.max() > 1e-3
    # an early prompt row sees fewer than 3 keys: nothing skipped, recall 1
    np.testing.assert_allclose(trace["prompt_attention_recall"].values[..., :3], 1.0, atol=1e-5)

    # independent KL: the unmodified HF model over prompt + generated tokens, against the run's own logits
    ids = torch.tensor([run.prompt_ids + run.token_ids[:-1]])
    with torch.no_grad():
        dense = torch.log_softmax(model.hf(input_ids=ids).logits[0, -4:].double(), -1)
    mine = torch.log_softmax(torch.from_numpy(trace["logits"].values).double(), -1)
    expected = torch.nn.functional.kl_div(mine, dense, log_target=True, reduction="none").sum(-1)
    np.testing.assert_allclose(trace["kl_vs_dense"].values, expected.numpy(), rtol=1e-3, atol=1e-6)
    assert expected.max() > 1e-4  # the variant really changed the predictions


def test_evicting_cache_kl_and_dropped_mass_match_hf_eager_attention(tiny_llama, tmp_path):
    model = tiny_llama
    run = wb.generate(model, PROMPT, cache=wb.cache.get("streaming_llm", budget=8, sinks=2),
                      record=["fidelity", "cache"], max_new_tokens=6, ignore_eos=True)
    trace = run.steps
    assert trace["kl_vs_dense"].values[-1] > 1e-5  # later steps lost context: predictions differ

    # independent: HF's own eager attention weights over the whole history, summed over evicted positions
    ids = torch.tensor([run.prompt_ids + run.token_ids[:-1]])
    previous = model.hf.config._attn_implementation
    model.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            weights = torch.stack([a[0] for a in model.hf(ids, output_attentions=True).attentions])
    finally:
        model.hf.set_attn_implementation(previous)
    n_prompt = len(run.prompt_ids)
    evicted_at = torch.from_numpy(trace["cache_evicted_at"].values)  # (layer, kv_head, position)
    kv_of = torch.from_numpy(trace["kv_head_of"].values)
    for step in range(6):
        rows = weights[:, :, n_prompt - 1 + step, :]  # (layer, head, key): the query that chose token `step`
        gone = (evicted_at >= 0) & (evicted_at < step)
        expected = (rows * gone[:, kv_of, :ids.shape[1]]).sum(-1)
        np.testing.assert_allclose(trace["cache_dropped_mass"].values[step], expected.numpy(), atol=1e-5)
    assert trace["cache_dropped_mass"].values[0].max() == 0  # the prefill attends before any eviction
    assert trace["cache_dropped_mass"].values[-1].max() > 0.01

    loaded = wb.load_trace(run.save(tmp_path / "fidelity.nc"))
    xr.testing.assert_identical(loaded, run.trace)


def test_full_cache_drops_nothing(tiny_llama):
    run = wb.generate(tiny_llama, PROMPT, record="fidelity", max_new_tokens=3)
    assert run.steps["cache_dropped_mass"].dims == ("step", "layer", "head")
    assert (run.steps["cache_dropped_mass"].values == 0).all()


@pytest.mark.parametrize("name", ["sliding_window", "sink_window", "hybrid", "block_sparse", "pbs", "topk_retrieval",
                                  "mpcvit", "entropy_guided"])
def test_every_registered_variant_records_fidelity(tiny_llama, name):
    params = {"sliding_window": {"window": 16}, "sink_window": {"sinks": 2, "window": 16},
              "hybrid": {"window": 16, "sinks": 2}, "block_sparse": {"pattern": "block_topk", "block_size": 16, "top_k": 1},
              "pbs": {"block_size": 16, "segment": 16, "top_k": 1}, "topk_retrieval": {"top_k": 4}}.get(name, {})
    run = wb.generate(tiny_llama, PROMPT * 2, attention=wb.attention.get(name, **params), record="fidelity",
                      max_new_tokens=3, ignore_eos=True)
    recall = run.steps["attention_recall"].values
    if name in ("mpcvit", "entropy_guided"):  # they change the attention function, not the kept keys
        assert np.isnan(recall).all()
    else:
        assert ((recall > 0) & (recall <= 1 + 1e-5)).all() and recall.min() < 0.9999  # some mass was skipped
    assert run.steps["attention_output_error"].values.max() > 1e-4
    assert (run.steps["kl_vs_dense"].values >= -1e-6).all() and run.steps["kl_vs_dense"].values.max() > 0


def test_fidelity_is_listed_as_recordable():
    with pytest.raises(wb.errors.ParameterError, match="fidelity"):
        wb.trace.RecordSpec.parse("fidelty")
