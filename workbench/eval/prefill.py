"""Prefill once, hand the same prefill to many cache policies: an exact shortcut for sweeps.

Eviction policies compress a prompt *after* each layer's attention has run over all of it, so within the prefill
pass every layer's queries, keys, values and attention output are the same whatever the policy: only what the
cache keeps afterwards differs. `PrefillRecord.capture` runs the prompt once through a session with the full
cache and keeps, per layer, what the attention function was called with (query, new keys and values,
transformers' mask) and its output, plus the last token's logits. `replay` then announces a prefill pass to a
fresh cache of any policy and drives each layer through the bridge's own per-layer step (workbench.run.bridge:
update -> slot mask -> statistics -> observer -> policy), with an attention "variant" that returns the recorded
output instead of computing it: a sweep pays for one prefill per prompt instead of one per configuration, and the
statistics policies ask for at the prefill (per-key mass for H2O-style policies) are computed once too.

The shortcut holds only while the cache behaves like the full cache inside the prefill pass; replay checks that at
every layer and refuses (the session then restarts with a fresh cache and prefills for real) when `update`
returns other keys/values than it was given (a quantizing cache, say). tests/test_eval.py checks, for every
registered policy, that replay and a real prefill leave identical caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.attention import reference
from workbench.attention.base import AttentionCall, AttentionResult, AttentionVariant
from workbench.cache.kvcache import ForwardPass
from workbench.run import Session
from workbench.run.bridge import Binding


@dataclass
class _Layer:
    module: object
    query: torch.Tensor
    key: torch.Tensor  # the pass's new keys (what the cache's update is given)
    value: torch.Tensor
    hf_mask: torch.Tensor | None
    scaling: float
    kwargs: dict
    output: torch.Tensor


@dataclass
class PrefillRecord:
    ids: list[int]
    layers: list[_Layer]  # in the order the model ran them
    logits: torch.Tensor  # float32 (1, vocab): the last prompt token's logits
    _kept: dict = field(default_factory=dict, repr=False)  # (layer, statistic) -> tensor, shared by replays

    @classmethod
    def capture(cls, model, ids, attention) -> PrefillRecord:
        """Run the prompt `ids` once with the full cache and keep every layer's attention call."""
        ids = [int(i) for i in ids]
        recording = _Recording(attention)
        with Session(model, "full", recording) as session:
            logits = session.feed(ids, "prefill")
        return cls(ids, recording.layers, logits)

    def replay(self, session: Session) -> bool:
        """Put the session's fresh cache into the state a real prefill of `ids` would leave. True on success;
        False when the cache does not behave like the full cache during the prefill (the cache is then dirty)."""
        cache = session.cache
        forward = ForwardPass("prefill", 0, len(self.ids), torch.tensor(self.ids, device=self.logits.device))
        cache.begin_pass(forward)
        try:
            for index, layer in enumerate(self.layers):
                key, value = cache.update(layer.key, layer.value, layer.module.layer_idx)
                if not (key.shape == layer.key.shape and torch.equal(key, layer.key)
                        and torch.equal(value, layer.value)):
                    return False
                binding = Binding(_Replayed(self, index), session.binding.observer, cache)
                binding.attend(layer.module, layer.query, key, value, layer.hf_mask, layer.scaling, layer.kwargs,
                               forward)
        finally:
            cache.end_pass()
        session.note_bytes()
        return True

    def statistics(self, call: AttentionCall, want) -> dict[str, torch.Tensor]:
        """The statistics `want` names for a layer of this prefill, as a variant would compute them (a dense
        recomputation under the same mask). Per-key mass and entropy are the same for every policy, so they are
        computed once and handed out as copies; attention rows are too big to keep and are computed each time."""
        missing = {name for name in want if name == "probs" or (call.layer, name) not in self._kept}
        fresh = reference.dense_attention(call, frozenset(missing), with_output=False)[1] if missing else {}
        for name, value in fresh.items():
            if name != "probs":
                self._kept[(call.layer, name)] = value
        return {name: fresh[name] if name == "probs" else self._kept[(call.layer, name)].clone() for name in want}


def prefill(session: Session, ids, record: PrefillRecord | None = None) -> tuple[torch.Tensor, bool]:
    """The session's prefill of `ids`: replayed from `record` when it holds the same ids and the cache allows it,
    else a real forward pass. Returns (logits (1, vocab), replayed)."""
    ids = [int(i) for i in torch.as_tensor(ids).reshape(-1).tolist()]
    if record is not None and record.ids == ids:
        if record.replay(session):
            return record.logits, True
        session.restart()  # the cache is half-filled: start again with a fresh one
    return session.feed(ids, "prefill"), False


class _Recording(AttentionVariant):
    """Wraps an attention variant and keeps each layer's call and output (the bridge only calls `attend`)."""

    name = "recording"

    def __init__(self, variant):
        from workbench import attention as attention_family

        self.variant = attention_family.get(variant)
        self.layers: list[_Layer] = []

    def attend(self, call, want):
        result = self.variant.attend(call, want)
        self.layers.append(_Layer(call.module, call.query, call.key, call.value, call.mask, call.scaling,
                                  dict(call.kwargs), result.output))
        return result


class _Replayed(AttentionVariant):
    """Answers a layer's attention from the record: the recorded output, statistics computed once and shared."""

    name = "replayed"

    def __init__(self, record: PrefillRecord, index: int):
        self.record, self.index = record, index

    def attend(self, call, want) -> AttentionResult:
        return AttentionResult(self.record.layers[self.index].output, **self.record.statistics(call, want))
