"""CacheBlend: reuse the KV of chunks prefilled on their own, wherever they sit in a request, recomputing a few tokens.

    chunks = wb.ChunkCache()
    blended = wb.cacheblend(model, [passage_a, passage_b], prefix=system, store=chunks)   # reused KV, ~15% redone
    logits = blended.session.feed(question_ids, "append")[-1]     # then an ordinary session: decode, score, fork
    blended.recomputed                                             # positions recomputed after the check layer

Yao et al., "CacheBlend: Fast Large Language Model Serving for RAG with Cached Knowledge Fusion" (EuroSys 2025);
reference code LMCache/LMCache (lmcache/v1/compute/blend/blender.py) and YaoJiayi/CacheBlend. A request is
prefix + chunk_1 + ... + chunk_m (+ the question, fed afterwards). Each chunk's KV comes from a `ChunkCache`: its
own prefill after the shared prefix, positions from len(prefix). The chunks' KV are concatenated after the prefix's,
each chunk's keys re-rotated by the RoPE delta to its position in the request (workbench.cache.rope.rotate). Then
the blend pass runs the model's decoder layers over the chunk tokens (workbench.run.layerwise):
  - layers before `check_layer` recompute every chunk token, whose fresh KV replaces the reused one;
  - at `check_layer` (the reference's: 1) every chunk token's fresh KV is computed and compared with the reused
    KV; the `recompute_ratio` (the reference's 0.15) share with the highest deviation, at least one token, is kept:
    their fresh KV replaces the reused one, the others keep the reused KV;
  - from the next layer on only those tokens are computed (their queries attend to the blended cache: prefix,
    reused and recomputed KV), their fresh KV replacing the reused one at every layer.
The result is installed in a fresh full-cache `Session` as its prefill, so the question is an ordinary append and
decoding, scoring and forking work as always. recompute_ratio=1 is a full prefill of prefix + chunks (exactly, up
to float rounding); one chunk with no prefix needs no re-positioning and its reused KV is the full prefill's.

Deviation: `deviation="key"` (LMCache's rule: squared L2 distance of the keys at the check layer, summed over KV
heads and head dims, fresh keys at the request's positions vs the re-rotated reused keys; RoPE is a rotation, so
the distance is the same in either frame) or "value" (YaoJiayi/CacheBlend's original rule, on the values).

Where it departs from the references:
  - the ratio is a share of the chunk tokens (the original's rule); LMCache counts the question too, which here
    is always fully computed as an append after the blend (the original also always recomputes the suffix);
  - the check layer runs attention and MLP for every chunk token and keeps the selected rows' outputs; the
    references slice the queries before attention. The selected rows get the same values; the cost is one layer
    run over all chunk tokens instead of over the selected share;
  - one check layer and one ratio (LMCache takes lists, and uses only their first entry);
  - no pipelining of KV loading with the recompute (the KV is in memory); the recompute pass runs the decoder
    layers outside a Session (its only pass that does), because a Session cannot feed scattered positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from workbench.cache import rope
from workbench.errors import ParameterError, PromptError
from workbench.cache.kvcache import ForwardPass
from workbench.run import bridge, layerwise
from workbench.run.chunks import ChunkCache, EncodedChunk
from workbench.run.session import Session

DEVIATIONS = ("key", "value")


@dataclass
class Blended:
    """A blended request: a session holding prefix + chunks (the question goes next, as an append)."""

    session: Session
    ids: list[int]  # prefix + chunks, as the session holds them
    prefix_tokens: int
    chunk_starts: list[int]  # each chunk's first position in the request
    recomputed: list[int]  # positions whose KV was recomputed from the check layer on (sorted)
    deviation: torch.Tensor | None  # float32 (chunk tokens,): each chunk token's deviation at the check layer
    seconds: float  # the blend: re-positioning, the recompute pass and the installation


def reposition(chunk: EncodedChunk, start: int, inv_freq: torch.Tensor) -> list[torch.Tensor]:
    """The chunk's keys per layer moved from its encoded positions to `start`... (one more RoPE rotation)."""
    delta = torch.full((len(chunk),), start - chunk.start, device=chunk.keys[0].device)
    return [keys if start == chunk.start else rope.rotate(keys, delta, inv_freq) for keys in chunk.keys]


def cacheblend(model, chunks, *, prefix=(), store: ChunkCache | None = None, recompute_ratio: float = 0.15,
               check_layer: int = 1, deviation: str = "key", attention="sdpa") -> Blended:
    """Blend the stored KV of `chunks` (texts or id lists, in request order) after `prefix` (see the module
    docstring); chunks not in `store` are encoded into it first (not counted in `seconds`)."""
    if not isinstance(recompute_ratio, (int, float)) or isinstance(recompute_ratio, bool) or \
            not 0 < recompute_ratio <= 1:
        raise ParameterError(f"recompute_ratio is the share of chunk tokens recomputed, in (0, 1]; got "
                             f"{recompute_ratio!r}")
    if isinstance(check_layer, bool) or not isinstance(check_layer, int) or not 0 <= check_layer < model.num_layers:
        raise ParameterError(f"check_layer must be a layer index 0..{model.num_layers - 1}; got {check_layer!r}")
    if deviation not in DEVIATIONS:
        raise ParameterError(f"deviation must be one of {', '.join(DEVIATIONS)}; got {deviation!r}")
    if not chunks:
        raise PromptError("cacheblend needs at least one chunk")
    parts = layerwise.stack(model, "cacheblend")
    store = store if store is not None else ChunkCache()
    encoded = [store.encode(model, chunk, prefix, attention) for chunk in chunks]
    head = store.prefix(model, prefix, attention)
    inv_freq = rope.inverse_frequencies(model.hf)

    started = time.perf_counter()
    with torch.inference_mode():
        p = len(head)
        starts, at = [], p
        for chunk in encoded:
            starts.append(at)
            at += len(chunk)
        total = at
        moved = [reposition(chunk, start, inv_freq) for chunk, start in zip(encoded, starts)]
        keys = [torch.cat(([head.keys[i]] if p else []) + [m[i] for m in moved], dim=2)
                for i in range(model.num_layers)]
        values = [torch.cat(([head.values[i]] if p else []) + [c.values[i] for c in encoded], dim=2)
                  for i in range(model.num_layers)]
        ids = head.ids + [t for chunk in encoded for t in chunk.ids]
        device = model.device
        rows = torch.arange(p, total, device=device)
        n = total - p
        keep = n if recompute_ratio >= 1 else max(1, int(n * recompute_ratio))
        kv = layerwise.AssembledKV(keys, values)
        found: dict = {}

        def choose(layer, fresh_keys, fresh_values):
            if layer != check_layer:
                return None
            fresh, old = (fresh_keys, keys) if deviation == "key" else (fresh_values, values)
            reused = old[layer][:, :, p:total]  # not written yet: `update` writes after choosing
            found["deviation"] = ((fresh.float() - reused.float()) ** 2).sum(dim=(0, 1, 3))
            found["picked"] = found["deviation"].topk(keep).indices.sort().values
            return found["picked"]

        kv.choose = choose
        key_positions = torch.arange(total, device=device)
        hidden = layerwise.embed(parts, torch.tensor(ids[p:], device=device))
        positions = rows
        with bridge.routed(model.hf):
            for index in range(model.num_layers):
                kv.rows = positions
                mask = layerwise.causal_mask(positions, key_positions)
                hidden = layerwise.run_layer(model, parts, index, hidden, positions, kv, mask, attention)
                if index == check_layer:
                    picked = found["picked"]
                    hidden, positions = hidden[:, picked], positions[picked]
        session = install(model, ids, kv.keys, kv.values, attention)
    return Blended(session, ids, p, starts, positions.tolist(), found.get("deviation"),
                   time.perf_counter() - started)


def install(model, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor], attention="sdpa") -> Session:
    """A fresh full-cache session whose cache holds `keys`/`values` (per layer (1, kv_heads, len(ids), head_dim))
    as the prefill of `ids`."""
    session = Session(model, "full", attention)
    cache = session.cache
    with torch.inference_mode():
        cache.begin_pass(ForwardPass("prefill", 0, len(ids), torch.tensor(ids, device=model.device)))
        try:
            for layer, k, v in zip(cache.layers, keys, values):
                layer.update(k, v)
        finally:
            cache.end_pass()
    session.note_bytes()
    return session
