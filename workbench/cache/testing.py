"""Driving a cache policy by hand, without a model: give a layer chosen keys, then run the bridge's own per-layer
step (slot mask -> attention -> statistics -> policy) on chosen queries. Used by the policy tests and handy in
notebooks to watch a policy decide.

    cache = wb.cache.get("h2o", budget=4, sinks=0, window=1).build(model)
    fill(cache, 0, keys)                     # a prefill pass: layer 0 gets keys (kv_heads, n, head_dim)
    attend(cache, 0, queries)                # layer 0's attention over them; returns the kept positions per head
    fill(cache, 0, new_key)                  # the next fill of a layer starts the next pass (a decode pass)
    attend(cache, 0, query, AttentionResult(out, key_mass=mass))   # or hand the policy chosen statistics

And an independent oracle for a whole run: `masked_dense_logits(model, run)` rebuilds, from the run's eviction
log alone, which positions each layer and KV head could see at each step, and recomputes the logits with one
plain forward of the unmodified model (no cache, no workbench attention) under exactly those masks.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from workbench.attention import reference
from workbench.attention.base import AttentionResult, AttentionVariant
from workbench.cache.kvcache import ForwardPass, KVCache
from workbench.cache.storage import slack


def fill(cache: KVCache, layer: int, keys: torch.Tensor, values: torch.Tensor | None = None,
         phase: str | None = None, token_ids: list[int] | None = None) -> None:
    """Give `layer` the keys (kv_heads, n, head_dim) (and values) of a pass. The first fill of a layer joins the
    pass under way; filling a layer again ends it and starts the next one (`phase`: default prefill for the first
    pass, decode after)."""
    cache.record_events = True  # so drain_events() tells what went
    filled = cache.state.setdefault("_testing_filled", set())
    if cache.current is not None and layer in filled:
        cache.end_pass()
    if cache.current is None:
        filled.clear()
        ids = None if token_ids is None else torch.tensor(token_ids)
        cache.begin_pass(ForwardPass(phase or ("prefill" if cache.position == 0 else "decode"), cache.position,
                                     keys.shape[1], ids))
    filled.add(layer)
    values = torch.randn_like(keys) if values is None else values
    cache.update(keys[None], values[None], layer)


def call_for(cache: KVCache, layer: int, query: torch.Tensor):
    """The AttentionCall the bridge builds for `query` (heads, q, head_dim) at `layer` in the pass under way, with
    the cache's slot mask (per KV head) in `mask`."""
    from workbench.attention.base import AttentionCall

    keys, values = cache.layers[layer].store.view()
    forward = cache.current
    start = forward.start + forward.count - query.shape[1]
    call = AttentionCall(layer, query[None], keys, values, None, keys.shape[-1] ** -0.5,
                         fake_module(layer, groups=query.shape[0] // keys.shape[1]), phase=forward.phase,
                         start=start)
    call.mask = cache.attention_mask(call, None)
    return call


def attend(cache: KVCache, layer: int, query: torch.Tensor, result: AttentionResult | None = None) -> list[list[int]]:
    """Run `layer`'s attention step of the pass under way for `query` (heads, q, head_dim) over what it holds, as
    the bridge does (dense reference attention, or `result` handed to the policy as it is); returns the positions
    each KV head keeps afterwards."""
    from workbench.run.bridge import Binding  # the run's own per-layer step (imported late: run imports cache)

    keys, values = cache.layers[layer].store.view()
    module = fake_module(layer, groups=query.shape[0] // keys.shape[1])
    variant = _Reference() if result is None else _Given(result)
    Binding(variant, None, cache).attend(module, query[None], keys, values, None, keys.shape[-1] ** -0.5, {},
                                         cache.current)
    return [p.tolist() for p in cache.positions(layer)]


def assert_bytes_are_real(model, trace) -> None:
    """A trace's cache_bytes is what the key/value buffers occupy: at least every held token, at most each layer's
    longest head plus the slack a buffer keeps (so a cache that holds fewer tokens really holds fewer bytes); and
    the eviction log agrees with the token counts. `trace`: one sequence (run.steps)."""
    from workbench.trace import cache_alive

    held = trace["cache_tokens"].values  # (step, layer, kv_head)
    text = model.text_config
    per_slot = 2 * text.num_key_value_heads * text.head_dim * model.dtype.itemsize  # K and V of every KV head
    longest = held.max(axis=2)  # (step, layer)
    spare = torch.tensor(longest).apply_(slack).numpy()
    low, high = (longest * per_slot).sum(1), ((longest + 2 * spare + 1) * per_slot).sum(1)
    cache_bytes = trace["cache_bytes"].values
    assert ((cache_bytes >= low) & (cache_bytes <= high)).all(), (cache_bytes, low, high)
    assert (cache_alive(trace).sum("position").values == held).all()


ORACLE = "workbench_oracle"  # the attention implementation masked_dense_logits registers in transformers
ORACLE_KEYWORD = "workbench_oracle_visible"  # the forward keyword carrying its per-layer masks


def visibility_from_log(evicted_at: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Bool (layers, kv_heads, T, T) from `cache_evicted_at` (layers, kv_heads, T): which key position each query
    position could see. Prompt queries (step 0) see their causal past; the query fed at step s >= 1 (position
    n_prompt + s - 1) sees the positions not evicted before step s (a policy evicts after a layer's attention, so
    a token evicted during step s was still seen at step s)."""
    total = evicted_at.shape[-1]
    step = (torch.arange(total) - n_prompt + 1).clamp_min(0)  # the step each query position was fed in
    kept = (evicted_at[..., None, :] < 0) | (evicted_at[..., None, :] >= step[:, None])
    return kept & torch.ones(total, total, dtype=torch.bool).tril()


def masked_dense_logits(model, run) -> torch.Tensor:
    """Float32 (steps, vocab): the logits the run's model would give with a dense forward over the prompt and the
    generated tokens in which each layer and KV head attends only to what the run's cache held (its
    `cache_evicted_at`, so record "cache" in the run). Compare with `run.steps["logits"]`.

    The attention here is written out (scores, mask, softmax, values) independently of workbench's attention
    variants, its cache and its bridge; transformers' own mask (sliding windows) is applied on top. Policies that
    merge entries or select per query are outside what an eviction log describes."""
    evicted_at = torch.from_numpy(run.steps["cache_evicted_at"].values.astype("int64"))
    ids = run.prompt_ids + run.token_ids[:-1]
    visible = visibility_from_log(evicted_at[..., :len(ids)], len(run.prompt_ids))
    return dense_logits_under(model, ids, visible)[len(run.prompt_ids) - 1:]


def dense_logits_under(model, ids: list[int], visible: torch.Tensor) -> torch.Tensor:
    """Float32 (len(ids), vocab): one plain forward of the unmodified model over `ids` in which each layer and KV
    head's queries see only the key positions `visible` (bool (layers, kv_heads, T, T)) allows."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ORACLE, _oracle_attention)
    AttentionMaskInterface.register(ORACLE, sdpa_mask)
    previous = model.hf.config._attn_implementation
    model.hf.set_attn_implementation(ORACLE)
    try:
        with torch.inference_mode():
            logits = model.hf(torch.tensor([ids], device=model.device), use_cache=False,
                              **{ORACLE_KEYWORD: visible.to(model.device)}).logits
    finally:
        model.hf.set_attn_implementation(previous)
    return logits[0].float().cpu()


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                      **kwargs):
    """Eager attention under the oracle's per-layer, per-KV-head mask (and transformers' own boolean mask)."""
    groups = query.shape[1] // key.shape[1]
    visible = kwargs[ORACLE_KEYWORD][module.layer_idx].repeat_interleave(groups, dim=0)[None]  # (1, heads, T, T)
    key, value = key.repeat_interleave(groups, dim=1).float(), value.repeat_interleave(groups, dim=1).float()
    scores = query.float() @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        visible = visible & attention_mask.bool()
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (probs @ value).to(query.dtype).transpose(1, 2).contiguous(), probs


def fake_module(layer: int = 0, groups: int = 1) -> SimpleNamespace:
    """What an attention call's `module` must offer: its layer index and GQA group size."""
    return SimpleNamespace(layer_idx=layer, num_key_value_groups=groups)


class _Reference(AttentionVariant):
    name = "reference"

    def attend(self, call, want):
        output, statistics = reference.dense_attention(call, want | {"key_mass"})
        return AttentionResult(output, **statistics)


class _Given(AttentionVariant):
    name = "given"

    def __init__(self, result: AttentionResult):
        self.result = result

    def attend(self, call, want):
        return self.result
