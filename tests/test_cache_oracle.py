"""The independent oracle for every eviction policy: from a run's eviction log alone, rebuild which positions each
layer and KV head could see at each step, recompute the logits with one dense forward of the unmodified model
under exactly those masks (workbench.cache.testing.masked_dense_logits: its own eager attention, no cache, no
workbench attention), and compare with the logits the run produced."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import workbench as wb
from workbench.cache.base import CachePolicy
from workbench.cache.eviction import EvictionPolicy
from workbench.cache.testing import masked_dense_logits, visibility_from_log

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 byte tokens on the tiny models
EMBEDDED_PROMPT = ("Remember the number 4721. " + "The grass is green and the sky is blue. " * 20
                   + "What number did I ask you to remember?")


def eviction_only() -> list[str]:
    """Registered policies whose effect an eviction log describes fully: they drop entries, and neither merge them
    nor narrow what each query sees (d2o is run with merging off, below)."""
    names = []
    for name in wb.cache.available():
        cls = wb.cache.registry.component_class(name)
        if issubclass(cls, EvictionPolicy) and not cls.merges and cls.visible is CachePolicy.visible:
            names.append(name)
    return names


def policy(name, budget, **extra):
    params = {"budget": budget, **extra}
    if name == "streaming_llm":
        params.setdefault("positions", "original")  # the log says what was kept, not where it was placed (below)
    if name == "d2o":
        params["threshold"] = 1.0  # merges only identical directions: none here (checked), so it only evicts
    return wb.cache.get(name, **params)


def run_and_oracle(model, cache, steps=20, prompt=PROMPT, **kwargs):
    run = wb.generate(model, prompt, cache=cache, max_new_tokens=steps, ignore_eos=True,
                      record=["logits", "cache"], **kwargs)
    return run, masked_dense_logits(model, run), torch.from_numpy(run.steps["logits"].values)


def test_the_oracle_of_a_full_cache_is_the_plain_model(tiny_llama):
    run, oracle, logits = run_and_oracle(tiny_llama, "full", steps=6)
    ids = torch.tensor([run.prompt_ids + run.token_ids[:-1]])
    with torch.inference_mode():
        plain = tiny_llama.hf(ids).logits[0, len(run.prompt_ids) - 1:].float()
    torch.testing.assert_close(oracle, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)


def test_every_eviction_policy_is_covered():
    assert {"streaming_llm", "h2o", "snapkv", "tova", "knorm", "pyramidkv", "cake", "lazy_eviction"} <= set(
        eviction_only())


@pytest.mark.parametrize("budget", [40, 80])
@pytest.mark.parametrize("name", eviction_only() + ["d2o"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: a sliding-window layer, logit softcapping
def test_a_run_computes_what_its_eviction_log_says(tiny_models, family, name, budget):
    model = tiny_models[family]
    cache = policy(name, budget, **({"full_layers": ""} if name in ("knorm", "d2o") else {}))
    run, oracle, logits = run_and_oracle(model, cache)
    assert (run.steps["cache_evicted_at"] >= 0).any(), "nothing was evicted: the test would prove nothing"
    assert (run.steps["cache_merged_into"] < 0).all()
    torch.testing.assert_close(logits, oracle, atol=2e-4, rtol=1e-4)


@pytest.mark.embedded
@pytest.mark.parametrize("name", eviction_only() + ["d2o"])
def test_the_embedded_model_computes_what_its_eviction_log_says(embedded, name):
    for budget in (48, 96):
        run, oracle, logits = run_and_oracle(embedded, policy(name, budget), steps=12, prompt=EMBEDDED_PROMPT)
        assert len(run.prompt_ids) > 2 * budget
        assert (run.steps["cache_evicted_at"] >= 0).any(), (name, budget)
        assert (run.steps["cache_merged_into"] < 0).all()
        torch.testing.assert_close(logits, oracle, atol=2e-3, rtol=1e-3, msg=f"{name} at budget {budget}")


def cache_position_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Eager attention in which each query sees its visible keys at their places inside the cache (StreamingLLM):
    for each query row, key k is re-rotated (with transformers' own RoPE) so that query and key are as far apart as
    their places among the row's visible positions."""
    visible, rotary = kwargs["oracle_visible"][module.layer_idx], kwargs["oracle_rotary"]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1)[0], value.repeat_interleave(groups, 1)[0]  # (heads, T, d)
    visible = visible.repeat_interleave(groups, 0)  # (heads, T, T)
    out = torch.empty_like(query[0])
    for q in range(query.shape[2]):
        seen = visible[:, q]  # (heads, T)
        place = seen.long().cumsum(-1) - 1  # each visible key's place; the query itself is last
        delta = (q - (place[:, q:q + 1] - place)) - torch.arange(key.shape[1])  # new position - original
        cos, sin = rotary(key, delta.flatten()[None])
        moved, _ = apply_rotary_pos_emb(key.flatten(0, 1)[None, None], key.flatten(0, 1)[None, None],
                                        cos[:, None], sin[:, None])
        scores = (moved.view_as(key) @ query[0, :, q, :, None])[..., 0] * scaling  # (heads, T)
        probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), -1)
        out[:, q] = (probs[..., None] * value).sum(1)
    return out.transpose(0, 1)[None].contiguous(), None


def test_streaming_llm_attends_with_positions_inside_the_cache(tiny_llama):
    run = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get("streaming_llm", budget=40), max_new_tokens=30,
                      ignore_eos=True, record=["logits", "cache"])
    ids = torch.tensor([run.prompt_ids + run.token_ids[:-1]])
    evicted_at = torch.from_numpy(run.steps["cache_evicted_at"].values.astype("int64"))[..., :ids.shape[1]]
    visible = visibility_from_log(evicted_at, len(run.prompt_ids))
    AttentionInterface.register("cache_positions", cache_position_attention)
    AttentionMaskInterface.register("cache_positions", sdpa_mask)
    model = tiny_llama.hf
    previous = model.config._attn_implementation
    model.set_attn_implementation("cache_positions")
    try:
        with torch.inference_mode():
            expected = model(ids, use_cache=False, oracle_visible=visible,
                             oracle_rotary=model.model.rotary_emb).logits[0, len(run.prompt_ids) - 1:].float()
    finally:
        model.set_attn_implementation(previous)
    logits = torch.from_numpy(run.steps["logits"].values)
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    original = masked_dense_logits(tiny_llama, run)  # the same tokens kept at their original positions
    assert (original - expected)[1:].abs().max() > 1e-3  # so the check above tells the two apart
