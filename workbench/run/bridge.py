"""The bridge between transformers and workbench components: run glue (attention variant + observer + cache).

workbench registers one implementation, "workbench", in transformers' `AttentionInterface` (with SDPA's mask
builder, so transformers' masks arrive as booleans over positions). A session binds its own variant, observer and
cache to every forward pass it runs: the binding travels in the forward's keyword arguments (transformers hands
them down to every attention call), never in shared state, so two sessions on one model (a draft and a target, the
panel's thread and a notebook cell) cannot see each other's components.

While any session's forward (or a `use_attention` block) runs on a model, the model's attention implementation is
"workbench" (reference-counted, restored when the last one ends). A forward without a binding, e.g. the user
calling the model directly in the meantime, runs the implementation the model had before.

Per layer, `Binding.attend` builds the `AttentionCall` (phase and positions from the pass), asks the cache for its
slot mask (transformers' mask read at the positions the slots hold), runs the variant, hands the statistics to
the observer and then the attention to the cache, which may evict. A provisional pass the cache acts on runs one
query row at a time, so each row sees what it would have seen had the tokens come one by one.
"""

from __future__ import annotations

import sys
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import AttentionInterface, PreTrainedConfig
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from workbench.attention.base import AttentionCall, AttentionResult, AttentionVariant
from workbench.attention.fidelity import attention_fidelity, kept_keys
from workbench.cache.kvcache import ForwardPass
from workbench.errors import WorkbenchError
from workbench.kernels.packed_decode import MAX_ROWS

IMPLEMENTATION = "workbench"
PASS_KEYWORD = "workbench_pass"  # the forward keyword argument carrying a BoundPass
FIDELITY = "fidelity"  # an observer asking for this gets recall and output error against dense attention


class AttentionObserver(Protocol):
    def wants(self, layer: int) -> frozenset[str]:
        """Which statistics ("entropy", "probs", "key_mass") to compute for this layer, and "fidelity" for a
        comparison with dense attention; empty for none."""

    def observe(self, call: AttentionCall, result: AttentionResult) -> None:
        """Receive a layer's result (called only when `wants(layer)` was not empty)."""

    def observe_fidelity(self, call: AttentionCall, recall, output_error) -> None:
        """Receive a layer's fidelity against dense attention (called when `wants(layer)` has "fidelity")."""


@dataclass
class Binding:
    """What one session binds to its forward passes."""

    variant: AttentionVariant
    observer: AttentionObserver | None = None
    cache: Any = None  # a workbench KVCache, or None for a forward without one

    def attend(self, module, query, key, value, hf_mask, scaling, kwargs, forward: ForwardPass) -> torch.Tensor:
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise WorkbenchError(f"{type(module).__name__} has no layer_idx: workbench cannot tell which layer's "
                                 "cache and statistics its attention belongs to")
        call = AttentionCall(layer, query, key, value, hf_mask, scaling if scaling is not None else
                             query.shape[-1] ** -0.5, module, kwargs, phase=forward.phase, start=forward.start)
        observer, cache = self.observer, self.cache
        tree = forward.tree is not None  # a tree verify pass: its rows see their ancestors only
        want = observer.wants(layer) if observer is not None else frozenset()
        packed = cache.take_packed(layer) if cache is not None and forward.packed_attention else None
        if packed is not None:  # the cache handed transformers a stand-in: the attention reads the packed codes
            if not self.variant.serves_packed(call):  # this layer's options (soft-capping, a window): for good
                cache.read_view(layer)
            elif _plain_decoding(call, packed, want, tree):
                result = self.variant.attend_packed(call, packed, want)
                if observer is not None and want:
                    observer.observe(call, result)
                if want or cache.policy.needs_bridge:  # as the dense path below does
                    cache.after_attention(call, result)
                return result.output
            call.key, call.value = packed.dense()  # what the variant reads otherwise: the dequantized view
        if not want and not tree and (cache is None or not cache.policy.needs_bridge):  # nothing to do
            return self.variant.attend(call, frozenset()).output
        fidelity, want = FIDELITY in want, want - {FIDELITY}
        if "probs" in want and hasattr(observer, "probs_heads"):
            call.probs_heads = observer.probs_heads(layer)
        if cache is not None:
            cache_wants = cache.wants(layer, forward.phase)
            if "probs" in cache_wants:
                call.probs_heads = None  # the cache needs every head's rows
            want = want | cache_wants
            if "probs" in want:
                call.slot_positions = cache.slot_positions(layer)
        row_by_row = cache is not None and cache.sequential(call)
        rows = [call.row(i) for i in range(call.num_queries)] if row_by_row else [call]
        results, fidelities = [], []
        for row in rows:  # row.mask is transformers' mask (of that row): the cache narrows it to its slots
            if cache is not None:
                mask = cache.attention_mask(row, row.mask)
                row.mask = _per_query_head(cache.tree_mask(row, mask, forward) if tree else mask, row.groups)
                row.key, row.value = cache.attended(row)
            result = self.variant.attend(row, want)
            if fidelity:  # a dense recomputation of the same call: what the variant changed
                fidelities.append(attention_fidelity(row, result.output, kept_keys(self.variant, row)))
            if row_by_row:  # a provisional row: the cache observes it (tentatively) before the next row runs
                cache.after_attention(row, result)
            results.append(result)
        result = results[0] if len(results) == 1 else _concatenate(results)
        if observer is not None and want:
            observer.observe(call, result)
        if fidelity:
            observer.observe_fidelity(call, *(torch.cat(parts, dim=2) for parts in zip(*fidelities)))
        if cache is not None and not row_by_row:  # after the observer: evicting rewrites the slots it read
            cache.after_attention(rows[0], result)
        return result.output


@dataclass
class BoundPass:
    """What a session passes to the forward for its attention calls: its binding and the pass, and a watcher
    of every decoder layer's input and output (workbench.run.layers), or None."""

    binding: Binding
    forward: ForwardPass
    watch: Any = None  # watch(layer, hidden_in, hidden_out, skipped)


def _plain_decoding(call: AttentionCall, packed, want: frozenset[str], tree: bool) -> bool:
    """Whether this call is one the packed decode kernel computes: causal attention over exactly the packed
    tokens (transformers' mask None or causal: no padding), no tree, no attention rows or dense comparison
    wanted, the query in the residual's dtype, and its rows within one kernel tile."""
    if tree or want - {"entropy", "key_mass"} or call.query.dtype != packed.residual_keys.dtype:
        return False
    if call.num_queries * call.groups > MAX_ROWS:
        return False
    if call.mask is None:
        return True
    q, k = call.mask.shape[-2:]
    if call.mask.dtype != torch.bool or call.mask.shape[:2] != (1, 1) or \
            k != packed.keys.tokens + packed.residual_keys.shape[1]:
        return False
    return torch.equal(call.mask[0, 0], torch.ones(q, k, dtype=torch.bool, device=call.mask.device).tril(k - q))


def _per_query_head(mask: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """A mask per KV head (1, kv_heads, q, k) -> per query head; transformers' own (1, 1, q, k) stays as it is."""
    if mask is None or mask.shape[1] == 1:
        return mask
    return mask.repeat_interleave(groups, dim=1)


def _concatenate(results: list[AttentionResult]) -> AttentionResult:
    """One result from the results of consecutive query rows."""
    def cat(name, dim):
        parts = [getattr(r, name) for r in results]
        return None if parts[0] is None else torch.cat(parts, dim=dim)

    key_mass = None if results[0].key_mass is None else torch.stack([r.key_mass for r in results]).sum(0)
    return AttentionResult(cat("output", 1), entropy=cat("entropy", 2), probs=cat("probs", 2), key_mass=key_mass)


# -- the implementation transformers calls ---------------------------------------------------------------------
_previous: dict[int, str] = {}  # id(config) -> the implementation it had before workbench's was enabled
_users: dict[int, int] = {}  # id(hf model) -> open sessions and use_attention blocks
_lock = threading.Lock()


def workbench_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    bound = kwargs.pop(PASS_KEYWORD, None)
    if bound is None:  # a forward workbench did not bind: the model's own implementation
        previous = _previous.get(id(module.config), "sdpa")
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        function = ALL_ATTENTION_FUNCTIONS.get_interface(previous, eager)
        return function(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    output = bound.binding.attend(module, query, key, value, attention_mask, scaling, kwargs, bound.forward)
    return output, None


AttentionInterface.register(IMPLEMENTATION, workbench_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


_routed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # hf model -> the configs its modules read


def _configs(hf_model) -> list:
    """The configs whose `_attn_implementation` the model's modules read; the first call per model also checks
    that the model routes attention through transformers' AttentionInterface at all."""
    if hf_model not in _routed:
        seen: dict[int, Any] = {id(hf_model.config): hf_model.config}
        for module in hf_model.modules():
            config = getattr(module, "config", None)
            if isinstance(config, PreTrainedConfig):
                seen.setdefault(id(config), config)
        previous = hf_model.config._attn_implementation
        hf_model.set_attn_implementation(IMPLEMENTATION)
        routed = hf_model.config._attn_implementation == IMPLEMENTATION  # transformers only warns; we refuse
        hf_model.set_attn_implementation(previous or "sdpa")
        if not routed:
            raise WorkbenchError(f"{type(hf_model).__name__} does not route attention through transformers' "
                                 "AttentionInterface, so workbench attention variants cannot plug into it")
        _routed[hf_model] = list(seen.values())
    return _routed[hf_model]


def enable(hf_model) -> None:
    """Route the model's attention through workbench (until the matching `disable`; calls nest)."""
    configs = _configs(hf_model)
    with _lock:
        count = _users.get(id(hf_model), 0)
        if count == 0:
            for config in configs:
                _previous[id(config)] = config._attn_implementation or "sdpa"
                config._attn_implementation = IMPLEMENTATION
        _users[id(hf_model)] = count + 1


def disable(hf_model) -> None:
    with _lock:
        count = _users.get(id(hf_model), 0) - 1
        if count > 0:
            _users[id(hf_model)] = count
            return
        _users.pop(id(hf_model), None)
        for config in _configs(hf_model):
            config._attn_implementation = _previous.pop(id(config), "sdpa")


@contextmanager
def routed(hf_model):
    """The model's attention goes through workbench inside the block (for a session's forward)."""
    enable(hf_model)
    try:
        yield
    finally:
        disable(hf_model)


@contextmanager
def use_attention(model, variant: AttentionVariant | str = "sdpa", observer: AttentionObserver | None = None,
                  cache=None):
    """Run `model.hf.generate(...)` (or any forward of the model) with workbench components, for the block.

    Inside, every forward the model runs is bound to `variant`, `observer` and `cache`, as a session would bind
    it. transformers drives the passes, so the phase follows its contract: the first pass over an empty cache is
    the prefill, every later one a decoding pass (assisted generation's multi-token checks included)."""
    from workbench.attention import get as get_variant

    hf_model = getattr(model, "hf", model)
    binding = Binding(get_variant(variant), observer, cache)

    def before(module, args, kwargs):
        if PASS_KEYWORD in kwargs:  # a session's own forward
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        count = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        hf_cache = kwargs.get("cache", kwargs.get("past_key_values"))
        start = hf_cache.get_seq_length() if hf_cache is not None else 0
        forward = ForwardPass("prefill" if start == 0 else "decode", start, count,
                              None if ids is None else ids[0], packed_attention=binding.variant.reads_packed)
        if cache is not None:
            cache.begin_pass(forward)
        return args, {**kwargs, PASS_KEYWORD: BoundPass(binding, forward)}

    def after(module, args, kwargs, output):
        if cache is not None and cache.current is not None:
            cache.end_pass()

    enable(hf_model)
    hooks = [hf_model.register_forward_pre_hook(before, with_kwargs=True),
             hf_model.register_forward_hook(after, with_kwargs=True)]
    try:
        yield binding
    finally:
        for hook in hooks:
            hook.remove()
        if cache is not None and cache.current is not None:
            cache.end_pass()
        disable(hf_model)

