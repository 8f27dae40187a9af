"""APE: contexts encoded in parallel after a shared prefix, queried through APE's attention (workbench.attention.ape).

    chunks = wb.ChunkCache()
    request = wb.ape(model, [passage_a, passage_b], prefix=system, store=chunks)     # T = S = 0.9 by default
    logits = request.feed(question_ids)[-1]                       # the query prefill: its last row's logits
    logits = request.feed([token])[-1]                            # decoding, one token at a time

Yang et al., "APE: Faster and Longer Context-Augmented Generation via Adaptive Parallel Encoding" (ICLR 2025;
reference code Infini-AI-Lab/APE). Each context's KV is its own prefill after the shared prefix (a `ChunkCache`
entry: the same encodings CacheBlend reuses), so every context sits at positions len(prefix) ... and none sees
another. The request's keys are [prefix, context_1, ..., context_m]; the query's tokens take the positions after
the longest context (the reference's `past_position.max() + 1`) and attend to everything, the context block with
APE's temperature and scaling (see workbench.attention.ape). Nothing of the contexts is recomputed: the query
prefill is the only work at request time.

It runs the model's decoder layers itself (workbench.run.layerwise), over key/value tensors it extends with each
fed token, not through a Session: a session's cache gives slot i position i, and here the contexts share
positions. Departures: the reference's defaults (T = S = 0.9) unless given; no fused kernel; decoding is exact
attention with APE's combination at every step, as in the reference, and feeding is one sequence (no batch).
"""

from __future__ import annotations

import time

import torch

from workbench import attention as attention_family
from workbench.attention.ape import CONTEXT_KEYWORD
from workbench.errors import PromptError
from workbench.run import bridge, layerwise
from workbench.run.chunks import ChunkCache, token_ids


class ParallelContexts:
    """A request whose contexts were encoded in parallel: feed the query, then the tokens chosen, through it."""

    def __init__(self, model, prefix, contexts, *, temperature: float = 0.9, scale: float = 0.9):
        self.model = model
        self.parts = layerwise.stack(model, "ape")
        self.variant = attention_family.get("ape", temperature=temperature, scale=scale)
        p = len(prefix)
        keys = [torch.cat(([prefix.keys[i]] if p else []) + [c.keys[i] for c in contexts], dim=2)
                for i in range(model.num_layers)]
        values = [torch.cat(([prefix.values[i]] if p else []) + [c.values[i] for c in contexts], dim=2)
                  for i in range(model.num_layers)]
        self.kv = layerwise.AssembledKV(keys, values)  # rows None: each pass appends its tokens
        self.context = (p, keys[0].shape[2])  # the context block's slots
        self.prefix_tokens = p
        self.position = p + max(len(c) for c in contexts)  # the next query token's position
        self.tokens = 0  # query tokens fed

    def feed(self, ids, logits: str = "last") -> torch.Tensor | None:
        """Run `ids` (query or chosen tokens) after what was fed: float32 logits (1 or n, vocab), or None."""
        ids = torch.as_tensor(token_ids(self.model, ids) if isinstance(ids, str) else ids, dtype=torch.long,
                              device=self.model.device).reshape(-1)
        if ids.numel() == 0:
            raise PromptError("feed needs at least one token")
        positions = torch.arange(self.position, self.position + ids.numel(), device=ids.device)
        with torch.inference_mode(), bridge.routed(self.model.hf):
            hidden = layerwise.embed(self.parts, ids)
            self.kv.rows = None
            for index in range(self.model.num_layers):  # mask None: causal by slot, the query's slots being last
                hidden = layerwise.run_layer(self.model, self.parts, index, hidden, positions, self.kv, None,
                                             self.variant, **{CONTEXT_KEYWORD: self.context})
            out = None if logits == "none" else layerwise.logits(
                self.parts, hidden[:, -1:] if logits == "last" else hidden)
        self.position += ids.numel()
        self.tokens += ids.numel()
        return out


def ape(model, contexts, *, prefix=(), store: ChunkCache | None = None, temperature: float = 0.9,
        scale: float = 0.9, attention="sdpa") -> ParallelContexts:
    """The parallel encoding of `contexts` (texts or id lists) after `prefix`, ready for the query; contexts not in
    `store` are encoded into it first (with the attention variant `attention`)."""
    if not contexts:
        raise PromptError("ape needs at least one context")
    store = store if store is not None else ChunkCache()
    encoded = [store.encode(model, context, prefix, attention) for context in contexts]
    return ParallelContexts(model, store.prefix(model, prefix, attention), encoded, temperature=temperature,
                            scale=scale)


def greedy(feed, first_ids, max_new_tokens: int, stop_ids=frozenset()) -> tuple[list[int], float]:
    """Greedy tokens after feeding `first_ids` through `feed(ids) -> logits` (a ParallelContexts' or a session's),
    and the seconds to the first token."""
    started = time.perf_counter()
    token = int(feed(first_ids)[-1].argmax())
    first = time.perf_counter() - started
    tokens = [token]
    while len(tokens) < max_new_tokens and token not in stop_ids:
        token = int(feed([token])[-1].argmax())
        tokens.append(token)
    return tokens, first
