"""The generation loop against the unmodified Hugging Face model: same greedy tokens, same logits, and the
statistics it records against independent computations from HF's own outputs."""

import time
from contextlib import contextmanager

import pytest
import torch

import workbench as wb

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
RAW = "The quick brown fox jumps over the lazy dog. Then the fox"


def hf_greedy(model, prompt, n, attn="sdpa"):
    ids = model.encode(prompt)
    with hf_attention(model, attn), torch.inference_mode():
        out = model.hf.generate(ids, max_new_tokens=n, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=model.config.pad_token_id)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack(out.logits)[:, 0].float()


@contextmanager
def hf_attention(model, implementation):
    previous = model.hf.config._attn_implementation
    model.hf.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.hf.set_attn_implementation(previous)


@pytest.mark.embedded
@pytest.mark.parametrize("prompt", [CHAT, RAW], ids=["chat", "raw"])
def test_embedded_greedy_parity_with_hf_generate(embedded, prompt):
    tokens, logits = hf_greedy(embedded, prompt, 16)
    run = wb.generate(embedded, prompt, max_new_tokens=16, record=["logits"])
    assert run.token_ids == tokens
    torch.testing.assert_close(torch.from_numpy(run.steps["logits"].values), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.embedded
def test_embedded_eager_parity_with_hf_eager(embedded):
    tokens, logits = hf_greedy(embedded, CHAT, 8, attn="eager")
    run = wb.generate(embedded, CHAT, attention="eager", max_new_tokens=8, record=["logits"])
    assert run.token_ids == tokens
    torch.testing.assert_close(torch.from_numpy(run.steps["logits"].values), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", wb.models.TINY_FAMILIES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_tiny_parity_every_family(tiny_models, family, attention):
    model = tiny_models[family]
    reference = attention if model.hf._supports_sdpa else "eager"  # Gemma 2: transformers runs it eager only
    tokens, logits = hf_greedy(model, RAW, 12, attn=reference)
    run = wb.generate(model, RAW, attention=attention, max_new_tokens=12, record=["logits"])
    assert run.token_ids == tokens
    torch.testing.assert_close(torch.from_numpy(run.steps["logits"].values[:, :logits.shape[1]]), logits,
                               atol=1e-4, rtol=1e-4)


def test_workbench_cache_works_inside_hf_generate(tiny_llama):
    ids = tiny_llama.encode(RAW)
    cache = wb.cache.get("full").build(tiny_llama)
    out = tiny_llama.hf.generate(ids, max_new_tokens=6, do_sample=False, cache=cache)
    assert out[0, ids.shape[1]:].tolist() == wb.generate(tiny_llama, RAW, max_new_tokens=6).token_ids
    allocated = sum(t.untyped_storage().nbytes() for layer in cache.layers
                    for t in (layer.store.keys, layer.store.values))  # what torch really allocated
    assert cache.nbytes() == allocated


def hf_attention_rows(model, prompt, n_steps):
    """Attention probabilities from HF's eager path (output_attentions) for the prompt and the generated tokens."""
    run = wb.generate(model, prompt, max_new_tokens=n_steps)
    ids = torch.tensor([run.prompt_ids + run.token_ids[:-1]])
    with hf_attention(model, "eager"), torch.inference_mode():
        attentions = model.hf(ids, output_attentions=True).attentions  # per layer (1, heads, n, n)
    return torch.stack([a[0] for a in attentions]).float()  # (layers, heads, queries, keys)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_recorded_attention_matches_hf_output_attentions(tiny_llama, attention):
    rows = hf_attention_rows(tiny_llama, RAW, 5)
    n_prompt = len(tiny_llama.encode(RAW)[0])
    run = wb.generate(tiny_llama, RAW, attention=attention, max_new_tokens=5, record=["attention", "entropy"])
    trace = run.steps
    torch.testing.assert_close(torch.from_numpy(trace["prompt_attention"].values[:, :, :, :n_prompt]),
                               rows[:, :, :n_prompt, :n_prompt], atol=1e-5, rtol=1e-4)
    for step in range(5):  # the query that chose token `step` sits at position n_prompt + step - 1
        query = n_prompt + step - 1
        recorded = torch.from_numpy(trace["attention"].isel(step=step).values)
        torch.testing.assert_close(recorded[:, :, :query + 1], rows[:, :, query, :query + 1], atol=1e-5, rtol=1e-4)
        assert torch.isnan(recorded[:, :, query + 1:]).all()  # keys it could not see yet
    entropy = torch.special.entr(rows).sum(-1)  # (layers, heads, queries), independent of workbench
    torch.testing.assert_close(torch.from_numpy(trace["prompt_attention_entropy"].values),
                               entropy[:, :, :n_prompt], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(trace["attention_entropy"].values),
                               entropy[:, :, n_prompt - 1:n_prompt + 4].permute(2, 0, 1), atol=1e-4, rtol=1e-4)


@pytest.mark.embedded
def test_embedded_entropies_match_hf(embedded):
    tokens, logits = hf_greedy(embedded, CHAT, 6)
    run = wb.generate(embedded, CHAT, max_new_tokens=6, record=["entropy"])
    expected = torch.distributions.Categorical(logits=logits.double()).entropy().float()
    torch.testing.assert_close(torch.from_numpy(run.steps["entropy"].values), expected, atol=1e-4, rtol=1e-4)
    # the embedded model's attention entropy (SDPA path, recomputed densely) against HF eager attention rows
    rows = hf_attention_rows(embedded, CHAT, 6)
    n_prompt = len(run.prompt_ids)
    entropy = torch.special.entr(rows).sum(-1)
    torch.testing.assert_close(torch.from_numpy(run.steps["attention_entropy"].values),
                               entropy[:, :, n_prompt - 1:n_prompt + 5].permute(2, 0, 1), atol=1e-3, rtol=1e-3)


def test_stream_delivers_every_token_as_it_happens(tiny_llama):
    events = []
    run = wb.generate(tiny_llama, RAW, max_new_tokens=8, record=["entropy", "cache"], stream=events.append,
                      ignore_eos=True)
    assert [e.step for e in events] == list(range(8))
    assert [e.token_id for e in events] == run.token_ids
    assert "".join(e.text for e in events) == run.text
    assert [e.finished for e in events] == [False] * 7 + [True]
    assert [e.records["entropy"] for e in events] == pytest.approx(run.steps["entropy"].values.tolist())
    assert events[0].records["attention_entropy"].shape == (tiny_llama.num_layers, tiny_llama.num_heads)
    assert [e.records["cache_bytes"] for e in events] == run.steps["cache_bytes"].values.tolist()


@pytest.mark.embedded
def test_generation_stops_at_eos(embedded):
    run = wb.generate(embedded, CHAT, max_new_tokens=40)
    assert run.finish_reason == "eos" and run.token_ids[-1] in embedded.eos_token_ids
    assert len(run.token_ids) < 40 and run.text.strip() and "<|im_end|>" not in run.text


def test_zero_new_tokens_returns_an_empty_run(tiny_llama):
    run = wb.generate(tiny_llama, RAW, max_new_tokens=0, record=["entropy", "cache"])
    assert (run.text, run.token_ids, run.finish_reason, run.tokens_per_s) == ("", [], "empty", 0.0)
    assert run.trace.sizes["step"] == 0 and run.trace.sizes["position"] == len(run.prompt_ids)


def test_bad_prompts_and_lengths_fail_clearly(tiny_llama):
    with pytest.raises(wb.PromptError, match="the prompt is empty"):
        wb.generate(tiny_llama, "")
    with pytest.raises(wb.PromptError, match="the chat has no messages"):
        wb.generate(tiny_llama, [])
    with pytest.raises(wb.PromptError, match="must be a string or a list of chat messages"):
        wb.generate(tiny_llama, 42)
    with pytest.raises(wb.PromptError, match="need 'role' and 'content'"):
        wb.generate(tiny_llama, [{"text": "hi"}])
    with pytest.raises(wb.ParameterError, match="max_new_tokens must be an integer >= 0"):
        wb.generate(tiny_llama, RAW, max_new_tokens=-1)
    context = tiny_llama.max_positions
    with pytest.raises(wb.PromptError, match=f"longer than the model's context of {context} tokens"):
        wb.generate(tiny_llama, "x" * (context + 5))
    with pytest.raises(wb.PromptError, match=f"use max_new_tokens <= {context - 100}"):
        wb.generate(tiny_llama, "x" * 100, max_new_tokens=context)
    with pytest.raises(wb.WorkbenchError, match="needs a workbench Model"):
        wb.generate(tiny_llama.hf, RAW)


def test_sampling_is_seeded(tiny_llama):
    def sample(seed):
        decoder = wb.decode.get("sample", temperature=1.5, seed=seed)
        return wb.generate(tiny_llama, RAW, decoder=decoder, max_new_tokens=12, ignore_eos=True).token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_model_attention_is_restored_after_a_run(tiny_llama):
    before = tiny_llama.hf.config._attn_implementation
    wb.generate(tiny_llama, RAW, attention="eager", max_new_tokens=2)
    assert tiny_llama.hf.config._attn_implementation == before
    with pytest.raises(wb.UnknownComponentError):
        wb.generate(tiny_llama, RAW, attention="nope")
    assert tiny_llama.hf.config._attn_implementation == before


def test_run_summary_and_timings(tiny_llama):
    started = time.perf_counter()
    run = wb.generate(tiny_llama, RAW, max_new_tokens=6, record=["entropy"], ignore_eos=True)
    wall = time.perf_counter() - started
    summary = run.summary()
    assert summary["new_tokens"] == 6 and len(run.decode_seconds) == 5
    assert run.tokens_per_s == pytest.approx(6 / (run.prefill_seconds + sum(run.decode_seconds)))
    assert 0 < run.prefill_seconds < wall and 0 < sum(run.decode_seconds) < wall
    assert summary["config"]["decoder"] == "greedy" and summary["config"]["record"] == ["entropy"]
    assert len(summary["entropy"]["attention_mean_by_layer"]) == tiny_llama.num_layers


def test_transformers_crop_drops_the_newest_tokens_of_a_full_cache(tiny_llama):
    """transformers' Cache.crop (what assisted decoding calls on rejected draft tokens) on a workbench cache:
    the full cache forgets them (and then decodes as if they were never fed); an evicting cache only rolls back
    provisional tokens."""
    ids = tiny_llama.encode(RAW)
    with wb.Session(tiny_llama, "full") as session, wb.Session(tiny_llama, "full") as reference:
        session.feed(ids, "prefill")
        reference.feed(ids, "prefill")
        session.feed([5, 6, 7], "decode")
        session.cache.crop(-3)
        assert session.position == session.committed == ids.shape[1]
        torch.testing.assert_close(session.feed([9], "decode"), reference.feed([9], "decode"))
    with wb.Session(tiny_llama, wb.cache.get("h2o", budget=24, window=4)) as session:
        session.feed(ids, "prefill")
        session.feed([5], "decode")
        with pytest.raises(wb.WorkbenchError, match="only the provisional tokens"):
            session.cache.crop(-1)


def test_the_cache_slot_mask_combines_with_transformers_own_mask():
    """A sliding-window model (window 8) under StreamingLLM at budget 24: every position a query's window can see
    is still held, so the run equals the unmodified model exactly, although the cache evicted (its slot mask is
    transformers' sliding mask read at the held positions; replacing that mask would let queries see 24 keys)."""
    model = wb.tiny("qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    prompt = "The quick brown fox jumps over the lazy dog. " * 2
    tokens, logits = hf_greedy(model, prompt, 8)
    run = wb.generate(model, prompt, cache=wb.cache.get("streaming_llm", budget=24, sinks=0), max_new_tokens=8,
                      record=["logits", "cache"])
    assert (run.steps["cache_evicted_at"] >= 0).any()  # it did evict
    assert run.token_ids == tokens
    torch.testing.assert_close(torch.from_numpy(run.steps["logits"].values[:, :logits.shape[1]]), logits,
                               atol=1e-4, rtol=1e-4)


def test_attention_modules_without_a_layer_index_are_refused(tiny_llama):
    from types import SimpleNamespace

    from workbench.cache.kvcache import ForwardPass
    from workbench.run.bridge import Binding

    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(wb.WorkbenchError, match="has no layer_idx"):
        Binding(wb.attention.get("sdpa")).attend(SimpleNamespace(), q, q[:, :2], q[:, :2], None, None, {},
                                                 ForwardPass("prefill", 0, 1))
