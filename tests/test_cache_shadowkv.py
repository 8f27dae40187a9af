"""`shadowkv`: the low-rank keys are the truncated SVD of transformers' own pre-RoPE keys, rebuilt keys are what
transformers' RoPE makes of them, outliers and landmarks are the reference's rule recomputed here, each decoding
query reads exactly the chunks a top-k over its landmark scores picks (plus outliers, window and new tokens), and
the bytes are the stored tensors'. References are computed in the tests, never by the code under test."""

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import workbench as wb
from workbench.cache.kvcache import ForwardPass
from workbench.cache.testing import attend, call_for, fill

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 byte tokens on the tiny models


def pre_rope_keys(model, ids):
    """Per layer, transformers' own keys before RoPE (kv_heads, n, D) (k_proj's output) and after it (its cache)."""
    captured, hooks = {}, []
    text = model.text_config
    for i, layer in enumerate(model.hf.model.layers):
        hooks.append(layer.self_attn.k_proj.register_forward_hook(
            lambda module, args, out, i=i: captured.__setitem__(i, out[0].view(-1, text.num_key_value_heads,
                                                                               text.head_dim).transpose(0, 1))))
    try:
        with torch.inference_mode():
            cache = DynamicCache(config=model.hf.config)
            model.hf(torch.tensor([ids]), use_cache=True, **{model.cache_keyword: cache})
    finally:
        for hook in hooks:
            hook.remove()
    return [captured[i].clone() for i in range(len(captured))], [layer.keys[0].clone() for layer in cache.layers]


def prefilled(model, policy, ids):
    session = wb.Session(model, policy)
    session.feed(ids, "prefill")
    return session


def test_low_rank_keys_are_the_truncated_svd_and_rebuilt_keys_are_transformers_rope(tiny_llama):
    ids = tiny_llama.encode(PROMPT)[0].tolist()
    n, rank, size = len(ids), 12, 8
    pre, post = pre_rope_keys(tiny_llama, ids)
    with prefilled(tiny_llama, wb.cache.get("shadowkv", rank=rank), ids) as session:
        for index, layer in enumerate(session.cache.layers):
            store = layer.store
            heads, _, dim = pre[index].shape
            u, s, vh = torch.linalg.svd(pre[index].double().transpose(0, 1).reshape(n, heads * dim),
                                        full_matrices=False)
            truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]  # (n, heads * dim)
            truncated = truncated.view(n, heads, dim).transpose(0, 1)  # (heads, n, dim)
            context = (n // size - 4) * size
            mine = torch.einsum("tr,hrd->htd", store.shadow.u.double(), store.shadow.sv.double())
            scale = truncated.abs().max()
            torch.testing.assert_close(mine / scale, truncated[:, :context] / scale, atol=1e-5, rtol=0)
            # every landmark's chunk rebuilt, rotated: transformers' RoPE of the truncated keys at those positions
            landmarks = torch.arange(store.shadow.chunks.shape[1]).expand(heads, -1)
            keys, values, positions = store.rebuild(landmarks)
            cos, sin = tiny_llama.hf.model.rotary_emb(post[index][None], torch.arange(n)[None])
            rotated = apply_rotary_pos_emb(truncated[None].float(), truncated[None].float(), cos, sin)[1][0]
            expected = rotated.gather(1, positions[..., None].expand(-1, -1, dim))
            torch.testing.assert_close(keys / scale, expected / scale, atol=1e-5, rtol=0)


def test_outliers_and_landmarks_follow_the_reference_rule_on_transformers_keys(tiny_llama):
    ids = tiny_llama.encode(PROMPT)[0].tolist()
    n, size, outliers, local = len(ids), 8, 3, 2
    _, post = pre_rope_keys(tiny_llama, ids)
    policy = wb.cache.get("shadowkv", outlier_chunks=outliers, local_chunks=local)
    with prefilled(tiny_llama, policy, ids) as session:
        for index, layer in enumerate(session.cache.layers):
            chunks = n // size - local
            blocks = post[index][:, :chunks * size].view(post[index].shape[0], chunks, size, -1)
            means = blocks.mean(2)
            worst = torch.stack([torch.stack([torch.nn.functional.cosine_similarity(
                means[h, c][None], blocks[h, c], dim=-1).min() for c in range(chunks)])
                for h in range(blocks.shape[0])])
            expected = worst.argsort(dim=1)[:, :outliers].sort(dim=1).values  # the least similar chunks
            shadow = layer.store.shadow
            assert torch.equal(shadow.outliers, expected)
            for h in range(blocks.shape[0]):
                rest = [c for c in range(chunks) if c not in expected[h].tolist()]
                assert shadow.chunks[h].tolist() == rest
                torch.testing.assert_close(shadow.landmarks[h], means[h, rest], atol=1e-6, rtol=1e-6)
                # the dense slots: the outlier chunks' tokens, then the local window, with their exact keys
                slots = [c * size + j for c in expected[h].tolist() for j in range(size)] + \
                    list(range(chunks * size, n))
                assert layer.positions()[h].tolist() == slots
                torch.testing.assert_close(layer.held_keys()[h], post[index][h, slots])


def test_each_decoding_query_reads_the_top_chunks_by_landmark_and_nothing_else(tiny_llama):
    torch.manual_seed(0)
    heads, groups, dim, size, n, budget = 2, 2, 64, 8, 100, 24
    policy = wb.cache.get("shadowkv", rank=4096, budget=budget, outlier_chunks=2, local_chunks=3)
    cache = policy.build(tiny_llama)
    keys, values = torch.randn(heads, n, dim), torch.randn(heads, n, dim)
    fill(cache, 0, keys, values)
    attend(cache, 0, torch.randn(heads * groups, n, dim))  # the prefill's attention: then it compresses
    new_key, new_value = torch.randn(heads, 2, dim), torch.randn(heads, 2, dim)
    cache.end_pass()
    cache.begin_pass(ForwardPass("verify", n, 2))  # two decoding queries at once: each picks its own chunks
    cache.update(new_key[None], new_value[None], 0)
    query = torch.randn(heads * groups, 2, dim)
    call = call_for(cache, 0, query)
    if call.mask is not None:  # per query head, as the bridge hands it to the policy
        call.mask = call.mask.repeat_interleave(groups, dim=1)
    layer = cache.layers[0]
    call.slot_positions = layer.positions()
    read_keys, read_values = policy.attended(layer, call)
    # the test's own selection: landmarks = chunk means of the context keys minus outliers; softmax of q . L over
    # the landmarks, max over the KV head's query heads, top budget / size
    chunks = n // size - 3
    blocks = keys[:, :chunks * size].view(heads, chunks, size, dim)
    means = blocks.mean(2)
    worst = torch.nn.functional.cosine_similarity(means[:, :, None], blocks, dim=-1).amin(-1)
    outliers = worst.argsort(dim=1)[:, :2]
    for h in range(heads):
        rest = [c for c in range(chunks) if c not in outliers[h].tolist()]
        for row in range(2):
            q = query[h * groups:(h + 1) * groups, row]  # the KV head's query heads
            scores = torch.softmax(q @ means[h, rest].T / dim ** 0.5, dim=-1).amax(0)
            chosen = [rest[i] for i in scores.topk(budget // size).indices.tolist()]
            seen = set(call.slot_positions[h][call.mask[0, h * groups, row]].tolist())
            expected = ({c * size + j for c in chosen + outliers[h].tolist() for j in range(size)}
                        | set(range(chunks * size, n)) | set(range(n, n + row + 1)))
            assert seen == expected
            for group in range(groups):  # every query head of the group sees the same
                assert torch.equal(call.mask[0, h * groups + group, row], call.mask[0, h * groups, row])
        # the columns read hold the right keys (full rank: rebuilt exactly) and values
        held = call.slot_positions[h]
        everything_keys = torch.cat([keys[h], new_key[h]])
        everything_values = torch.cat([values[h], new_value[h]])
        torch.testing.assert_close(read_keys[0, h], everything_keys[held], atol=1e-4, rtol=1e-4)
        assert torch.equal(read_values[0, h], everything_values[held])
    cache.rollback(n)


def test_bytes_are_the_stored_tensors(tiny_llama):
    ids = tiny_llama.encode(PROMPT)[0].tolist()
    n, size, rank = len(ids), 8, 10
    text = tiny_llama.text_config
    heads, dim, item = text.num_key_value_heads, text.head_dim, 4  # float32
    full = wb.generate(tiny_llama, PROMPT, max_new_tokens=1, record=["cache"])
    with prefilled(tiny_llama, wb.cache.get("shadowkv", rank=rank), ids) as session:
        cache = session.cache
        chunks, outliers = n // size - 4, 2
        landmarks, dense = chunks - outliers, outliers * size + n - chunks * size
        capacity = cache.layers[0].store.capacity
        per_layer = {"dense": 2 * heads * capacity * dim * item, "low_rank_u": chunks * size * rank * item,
                     "low_rank_sv": heads * rank * dim * item, "shadow_values": heads * landmarks * size * dim * item,
                     "landmarks": heads * landmarks * dim * item, "landmark_chunks": heads * landmarks * 8}
        assert capacity >= dense and cache.layers[0].held == [dense] * heads
        assert cache.nbytes_by_component() == {k: v * tiny_llama.num_layers for k, v in per_layer.items()}
        assert cache.nbytes() == sum(per_layer.values()) * tiny_llama.num_layers
        assert cache.nbytes() < full.held_cache_bytes


def test_bad_parameters_fail_clearly():
    with pytest.raises(wb.ParameterError, match="budget=60 is not a multiple of chunk_size=8.*56 or 64"):
        wb.cache.get("shadowkv", budget=60)
    with pytest.raises(wb.ParameterError, match="rank"):
        wb.cache.get("shadowkv", rank=0)


def test_a_short_prompt_stays_dense(tiny_llama):
    run = wb.generate(tiny_llama, "Hi there, fox.", cache="shadowkv", max_new_tokens=3, ignore_eos=True)
    full = wb.generate(tiny_llama, "Hi there, fox.", max_new_tokens=3, ignore_eos=True)
    assert run.token_ids == full.token_ids


@pytest.mark.embedded
def test_full_rank_covering_budget_decodes_as_the_full_cache(embedded):
    prompt = "The harbor town wakes early: boats go out, nets are mended, and the market opens by the pier. " * 3
    full = wb.generate(embedded, prompt, max_new_tokens=8, ignore_eos=True)
    width = embedded.num_kv_heads * embedded.text_config.head_dim  # 192: no truncation
    cache = wb.cache.get("shadowkv", rank=width, budget=64, outlier_chunks=1, local_chunks=1)
    run = wb.generate(embedded, prompt, cache=cache, max_new_tokens=8, ignore_eos=True)
    assert len(run.prompt_ids) // 8 - 1 - 1 > 1  # context chunks beyond the outlier one: compressed, then read
    assert run.token_ids == full.token_ids


def test_the_trace_counts_compressed_tokens_as_held(tiny_llama):
    """Nothing is dropped: after every step each layer and KV head holds every token fed so far, dense or compressed,
    and the eviction log agrees."""
    run = wb.generate(tiny_llama, PROMPT, cache="shadowkv", max_new_tokens=4, ignore_eos=True, record=["cache"])
    held = run.steps["cache_tokens"].values  # (step, layer, kv_head)
    fed = len(run.prompt_ids) + torch.arange(held.shape[0])  # the prompt, then one token per decoding step
    assert (held == fed.numpy()[:, None, None]).all()
    assert (wb.trace.cache_alive(run.steps).sum("position").values == held).all()
