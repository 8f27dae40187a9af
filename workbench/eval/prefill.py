"""Prefill once, hand the same prefill to many cache policies: an exact shortcut for sweeps.

Eviction policies compress a prompt *after* each layer's attention has run over all of it, so within the prefill
forward pass every layer's queries, keys, values and attention output are the same whatever the policy: only what
the cache keeps afterwards differs. `PrefillRecord.capture` runs the prompt once with the full cache and keeps,
per layer, the attention call (query, key, value, mask) and its output, plus the last token's logits. `replay`
then drives a fresh cache of any policy through the same hooks, in the same order, as workbench's attention
bridge does during a real prefill (update -> attention_mask -> statistics the cache wants -> after_attention),
without running the model: a sweep pays for one prefill per prompt instead of one per configuration, and the
attention statistics policies ask for at the prefill (per-key mass for H2O-style policies) are computed once too.

The shortcut holds only while the cache behaves like the full cache inside the prefill pass; replay checks that
at every layer and refuses (returns False, leaving the cache dirty: build a fresh one and prefill for real) when
  - `update` returns other keys/values than it was given (a quantizing cache, one that evicts inside update), or
  - the cache asks to mask slots during the prefill (the attention output would differ).
tests/test_eval.py checks, for every registered policy, that replay and a real prefill leave identical caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.attention import reference, use_attention
from workbench.attention.base import AttentionCall, AttentionResult


@dataclass
class PrefillRecord:
    ids: list[int]
    calls: list[AttentionCall]  # per layer, in the order the model ran them
    outputs: list[torch.Tensor]  # per layer, the attention output
    logits: torch.Tensor  # float32 (vocab,): the last prompt token's logits
    _kept: dict = field(default_factory=dict, repr=False)  # (layer, statistic) -> tensor, shared by replays

    @classmethod
    def capture(cls, model, ids, attention) -> PrefillRecord:
        """Run the prompt `ids` once with the full cache and keep every layer's attention call."""
        from workbench import cache as cache_family

        ids = [int(i) for i in ids]
        recording = _Recording(attention)
        kv = cache_family.get("full").build(model)
        tensor = torch.tensor([ids], device=model.device)
        with torch.inference_mode(), use_attention(model.hf, recording, None, kv):
            kv.see_tokens(tensor)
            out = model.hf(input_ids=tensor, **{model.cache_keyword: kv}, use_cache=True,
                           position_ids=torch.arange(len(ids), device=model.device)[None], **model.keep_logits(1))
        return cls(ids, recording.calls, recording.outputs, out.logits[0, -1].float())

    def replay(self, kv) -> bool:
        """Put a fresh cache (bridged, i.e. inside use_attention) into the state a real prefill of `ids` would
        leave. True on success; False when the cache does not behave like the full cache during the prefill."""
        kv.see_tokens(torch.tensor([self.ids], device=self.logits.device))
        for call, output in zip(self.calls, self.outputs):
            key, value = kv.update(call.key, call.value, call.layer)
            if not (key.shape == call.key.shape and torch.equal(key, call.key) and torch.equal(value, call.value)):
                return False
            layer_call = AttentionCall(call.layer, call.query, key, value, call.mask, call.scaling, call.module,
                                       call.kwargs)
            if kv.attention_mask(call.layer, layer_call) is not None:
                return False
            kv.after_attention(layer_call, AttentionResult(output, **self.statistics(layer_call,
                                                                                     kv.wants(call.layer))))
        return True

    def statistics(self, call: AttentionCall, want) -> dict[str, torch.Tensor]:
        """The statistics `want` names for a layer of this prefill, as the bridge would compute them (a dense
        recomputation under the same mask). Per-key mass and entropy are the same for every policy, so they are
        computed once and handed out as copies; attention rows are too big to keep and are computed each time."""
        missing = {name for name in want if name == "probs" or (call.layer, name) not in self._kept}
        if missing:
            _, fresh = reference.dense_attention(call, frozenset(missing), with_output=False)
            for name, value in fresh.items():
                if name != "probs":
                    self._kept[(call.layer, name)] = value
        else:
            fresh = {}
        return {name: fresh[name] if name == "probs" else self._kept[(call.layer, name)].clone() for name in want}


class _Recording:
    """Wraps an attention variant and keeps each layer's call and output (the bridge only calls `attend`)."""

    def __init__(self, variant):
        self.variant = variant
        self.name = getattr(variant, "name", "recording")
        self.calls: list[AttentionCall] = []
        self.outputs: list[torch.Tensor] = []

    def attend(self, call, want):
        result = self.variant.attend(call, want)
        self.calls.append(AttentionCall(call.layer, call.query, call.key, call.value, call.mask, call.scaling,
                                        call.module, dict(call.kwargs)))
        self.outputs.append(result.output)
        return result
