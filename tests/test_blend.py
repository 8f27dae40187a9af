"""KV reuse beyond prefix sharing (issue 12, item 5): CacheBlend (workbench.run.blend) and APE
(workbench.run.parallel_encoding, workbench.attention.ape). References are independent of the code under test: the
unmodified Hugging Face model run on the concatenated ids (its own causal mask, or a 4-D mask and position ids
written here), transformers' apply_rotary_pos_emb, a deviation top-k and a dense attention computed here."""

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import workbench as wb
from workbench.attention.base import AttentionCall
from workbench.errors import ParameterError, UnsupportedError
from workbench.run.blend import reposition
from workbench.cache.rope import inverse_frequencies

PREFIX = "You answer questions from the passages below.\n"
CHUNKS = ["The harbor town wakes early. Fishermen mend their nets by the quay while gulls circle overhead.",
          "A lighthouse stands on the rocks north of the town; its keeper, Mara, climbs the stairs every dusk.",
          "On market days the square fills with stalls of bread, smoked fish and apples from the hills."]
QUESTION = "\nQuestion: Who keeps the lighthouse?\nAnswer:"


def ids(model, text) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def hf_logits(model, token_ids, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return model.hf(input_ids=torch.tensor([token_ids]), **kwargs).logits[0].float()


def hf_greedy(model, token_ids, n) -> list[int]:
    with torch.inference_mode():
        out = model.hf.generate(torch.tensor([token_ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(token_ids):].tolist()


def session_greedy(session, question, n) -> list[int]:
    tokens = [int(session.feed(question, "append")[-1].argmax())]
    while len(tokens) < n:
        tokens.append(int(session.feed([tokens[-1]], "decode")[-1].argmax()))
    return tokens


def hf_keys(model, token_ids, positions=None) -> list[torch.Tensor]:
    cache = DynamicCache(config=model.hf.config)
    with torch.inference_mode():
        model.hf(input_ids=torch.tensor([token_ids]), cache=cache, use_cache=True,
                 **({} if positions is None else {"position_ids": torch.tensor([positions])}))
    return [layer.keys for layer in cache.layers]


@pytest.fixture(scope="module")
def store():
    return wb.ChunkCache()


# -- CacheBlend ------------------------------------------------------------------------------------------------
def test_recomputing_every_token_is_the_full_prefill_of_the_request(embedded, store):
    blended = wb.cacheblend(embedded, CHUNKS[:2], prefix=PREFIX, store=store, recompute_ratio=1.0)
    request = ids(embedded, PREFIX) + ids(embedded, CHUNKS[0]) + ids(embedded, CHUNKS[1])
    assert blended.ids == request and len(blended.recomputed) == len(request) - blended.prefix_tokens
    question = ids(embedded, QUESTION)
    logits = blended.session.fork().feed(question, "append", logits="all")
    torch.testing.assert_close(logits, hf_logits(embedded, request + question)[-len(question):], atol=2e-3, rtol=0)
    assert session_greedy(blended.session, question, 6) == hf_greedy(embedded, request + question, 6)


def test_one_chunk_without_a_prefix_needs_no_repositioning_and_is_the_full_prefill(embedded, store):
    blended = wb.cacheblend(embedded, [CHUNKS[1]], store=store)  # the default 15% recomputed
    question = ids(embedded, QUESTION)
    assert len(blended.recomputed) == int(0.15 * len(ids(embedded, CHUNKS[1])))
    assert float(blended.deviation.max()) < 1e-8  # the reused KV is the full prefill's
    logits = blended.session.feed(question, "append", logits="all")
    torch.testing.assert_close(logits, hf_logits(embedded, blended.ids + question)[-len(question):], atol=2e-3,
                               rtol=0)


def test_repositioned_keys_equal_the_models_keys_at_the_shifted_positions(embedded, store):
    chunk = ids(embedded, CHUNKS[2])
    encoded = store.encode(embedded, chunk)  # positions 0..n-1
    delta = 37
    moved = reposition(encoded, delta, inverse_frequencies(embedded.hf))
    expected = hf_keys(embedded, chunk, list(range(delta, delta + len(chunk))))
    for got, want in zip(moved, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_recomputed_tokens_are_the_top_key_deviations_at_the_check_layer(embedded, store):
    blended = wb.cacheblend(embedded, CHUNKS, prefix=PREFIX, store=store)
    prefix, chunks = ids(embedded, PREFIX), [ids(embedded, c) for c in CHUNKS]
    p, check = len(prefix), 1
    fresh = hf_keys(embedded, blended.ids)[check][0, :, p:]  # layers before the check layer: the full prefill's
    rotary = embedded.hf.model.rotary_emb
    old, offset = [], 0
    for chunk in chunks:  # each chunk's own prefill after the prefix, turned by the RoPE delta with transformers'
        keys = hf_keys(embedded, prefix + chunk)[check][:, :, p:]
        cos, sin = rotary(keys, torch.full((1, len(chunk)), offset))
        old.append(apply_rotary_pos_emb(keys, keys, cos, sin)[1][0])
        offset += len(chunk)
    deviation = ((fresh - torch.cat(old, dim=1)) ** 2).sum(dim=(0, 2))
    k = int(0.15 * deviation.numel())
    expected = sorted((deviation.topk(k).indices + p).tolist())
    assert blended.recomputed == expected
    assert all(position >= p + len(chunks[0]) for position in expected)  # the first chunk is exact: never chosen


def test_after_the_check_layer_only_the_chosen_tokens_are_computed(embedded, store):
    seen = []
    hook = embedded.hf.model.layers[5].mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        blended = wb.cacheblend(embedded, CHUNKS[:2], prefix=PREFIX, store=store, recompute_ratio=0.2)
    finally:
        hook.remove()
    assert seen == [len(blended.recomputed)] and len(blended.recomputed) == int(0.2 * (len(blended.ids) -
                                                                                       blended.prefix_tokens))


def test_bad_parameters_and_unsupported_families_get_clear_errors(embedded, tiny_models, store):
    with pytest.raises(ParameterError, match="recompute_ratio"):
        wb.cacheblend(embedded, CHUNKS[:1], recompute_ratio=0, store=store)
    with pytest.raises(ParameterError, match="check_layer"):
        wb.cacheblend(embedded, CHUNKS[:1], check_layer=30, store=store)
    with pytest.raises(UnsupportedError, match="Llama-like"):
        wb.cacheblend(tiny_models["gemma2"], [[5, 6, 7]])


# -- APE -------------------------------------------------------------------------------------------------------
def test_ape_without_temperature_or_scaling_on_one_context_is_the_ordinary_prefill(embedded, store):
    request = wb.ape(embedded, [CHUNKS[0]], prefix=PREFIX, store=store, temperature=1.0, scale=1.0)
    question = ids(embedded, QUESTION)
    whole = ids(embedded, PREFIX) + ids(embedded, CHUNKS[0]) + question
    torch.testing.assert_close(request.feed(question, logits="all"), hf_logits(embedded, whole)[-len(question):],
                               atol=2e-3, rtol=0)
    tokens = [int(hf_logits(embedded, whole)[-1].argmax())]
    for _ in range(4):
        tokens.append(int(request.feed([tokens[-1]])[-1].argmax()))
    assert tokens == hf_greedy(embedded, whole, 5)


def test_ape_without_temperature_or_scaling_is_the_model_under_a_parallel_mask(embedded, store):
    """Several contexts, T = S = 1: the model with each context at positions after the prefix, seeing the prefix
    and itself, and the query seeing everything (a 4-D mask and position ids written here)."""
    prefix, chunks, question = ids(embedded, PREFIX), [ids(embedded, c) for c in CHUNKS[:2]], ids(embedded, QUESTION)
    p = len(prefix)
    request = wb.ape(embedded, CHUNKS[:2], prefix=PREFIX, store=store, temperature=1.0, scale=1.0)
    logits = request.feed(question, logits="all")
    positions = list(range(p)) + [p + i for c in chunks for i in range(len(c))]
    positions += [p + max(map(len, chunks)) + i for i in range(len(question))]
    n = len(positions)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    a, b = p, p + len(chunks[0])
    mask[b:b + len(chunks[1]), a:b] = False  # the second context does not see the first
    reference = hf_logits(embedded, prefix + chunks[0] + chunks[1] + question, attention_mask=mask[None, None],
                          position_ids=torch.tensor([positions]))
    torch.testing.assert_close(logits, reference[-len(question):], atol=2e-3, rtol=0)


@pytest.mark.parametrize("queries", [1, 3])
def test_ape_attention_equals_a_dense_softmax_with_the_temperature_and_scaling_by_hand(queries):
    torch.manual_seed(0)
    heads, kv_heads, d, keys, (a, b) = 4, 2, 16, 20, (5, 14)
    q, k, v = torch.randn(1, heads, queries, d), torch.randn(1, kv_heads, keys, d), torch.randn(1, kv_heads, keys, d)
    T, S = 0.7, 0.8
    variant = wb.attention.get("ape", temperature=T, scale=S)
    call = AttentionCall(0, q, k, v, None, d ** -0.5, None, {"ape_context": (a, b)})
    out = variant.attend(call, frozenset({"probs"}))
    expected = torch.zeros(1, queries, heads, d)
    for h in range(heads):
        kh, vh = k[0, h // 2], v[0, h // 2]
        for i in range(queries):
            slot = keys - queries + i  # the query rows are the newest slots
            s = (q[0, h, i] @ kh.T) * d ** -0.5
            rest = [j for j in range(slot + 1) if not a <= j < b]
            context_mass = torch.exp(s[a:b] / T).sum() ** (S * T)
            total = context_mass + torch.exp(s[rest]).sum()
            weights = torch.zeros(keys)
            weights[a:b] = context_mass * torch.softmax(s[a:b] / T, 0) / total
            weights[rest] = torch.exp(s[rest]) / total
            expected[0, i, h] = weights @ vh
            torch.testing.assert_close(out.probs[0, h, i], weights, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.output, expected, atol=1e-5, rtol=1e-4)


def test_ape_defaults_are_the_references_and_ordinary_calls_are_dense(embedded):
    variant = wb.attention.get("ape")
    assert (variant.temperature, variant.scale) == (0.9, 0.9)
    reference = wb.generate(embedded, "The harbor at dawn", max_new_tokens=4)
    assert wb.generate(embedded, "The harbor at dawn", attention="ape", max_new_tokens=4).token_ids == \
        reference.token_ids
