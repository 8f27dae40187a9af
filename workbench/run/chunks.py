"""`ChunkCache`: the keys and values of text chunks, each prefilled on its own after a shared prefix, kept for reuse.

    chunks = wb.ChunkCache()
    encoded = chunks.encode(model, "A passage...", prefix="You answer from the passages.\n")
    encoded.keys[layer]        # (1, kv_heads, len(chunk), head_dim), RoPE applied at positions len(prefix)...

What CacheBlend and APE reuse across requests (workbench.run.blend, workbench.run.parallel_encoding): a
chunk retrieved for many requests is prefilled once. Each chunk is fed through a `Session` (a full cache, the
configured attention variant) as an append after the shared prefix (empty: the chunk is the prefill, at
positions from 0); the prefix's own prefill is shared through a `PrefixCache` (the prefix sharing this builds
on), so each further chunk forks it and feeds only its own tokens. Entries are per configuration (model and
attention variant, `PrefixCache.key`), the least recently used going beyond `capacity`. Like PrefixCache, each
entry is a copy (no paged memory).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from workbench.errors import ParameterError, PromptError
from workbench.run.prefix import PrefixCache
from workbench.run.session import Session


@dataclass
class EncodedChunk:
    """One chunk's KV as its own prefill (after `prefix`) left it: positions start .. start + len(ids) - 1."""

    ids: list[int]
    start: int  # the position of its first token when encoded: len(prefix)
    keys: list[torch.Tensor]  # per layer (1, kv_heads, len(ids), head_dim)
    values: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.ids)


def token_ids(model, text) -> list[int]:
    """A chunk as token ids: a string is tokenized without special tokens (it goes inside a longer prompt)."""
    if isinstance(text, str):
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    elif isinstance(text, torch.Tensor):
        ids = text.reshape(-1).tolist()
    else:
        ids = [int(t) for t in text]
    return ids


class ChunkCache:
    """Encoded chunks by (configuration, prefix, chunk) (see the module docstring)."""

    def __init__(self, capacity: int = 64):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ParameterError(f"ChunkCache capacity is the number of chunks kept, an integer >= 1; got {capacity!r}")
        self.capacity = capacity
        self.prefixes = PrefixCache(capacity=8)
        self._chunks: OrderedDict[tuple, EncodedChunk] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._chunks)

    def __repr__(self) -> str:
        return f"ChunkCache({len(self)} chunks of {self.capacity}, {self.hits} hits, {self.misses} misses)"

    def encode(self, model, chunk, prefix=(), attention="sdpa") -> EncodedChunk:
        """The chunk's KV after `prefix` (text or ids), computed once per configuration."""
        ids, prefix_ids = token_ids(model, chunk), token_ids(model, prefix)
        if not ids:
            raise PromptError("a chunk must hold at least one token")
        fresh = Session(model, "full", attention)
        key = (PrefixCache.key(fresh), tuple(prefix_ids), tuple(ids))
        if key in self._chunks:
            self.hits += 1
            self._chunks.move_to_end(key)
            return self._chunks[key]
        self.misses += 1
        session = self._after_prefix(fresh, prefix_ids)
        session.feed(ids, "append" if prefix_ids else "prefill", logits="none")
        start = len(prefix_ids)
        views = [layer.store.view() for layer in session.cache.layers]
        encoded = EncodedChunk(ids, start, [k[:, :, start:].clone() for k, _ in views],
                               [v[:, :, start:].clone() for _, v in views])
        self._chunks[key] = encoded
        while len(self._chunks) > self.capacity:
            self._chunks.popitem(last=False)
        return encoded

    def prefix(self, model, prefix, attention="sdpa") -> EncodedChunk:
        """The shared prefix's own KV (positions from 0), through the same prefix snapshots."""
        prefix_ids = token_ids(model, prefix)
        if not prefix_ids:
            return EncodedChunk([], 0, [None] * model.num_layers, [None] * model.num_layers)
        session = self._after_prefix(Session(model, "full", attention), prefix_ids)
        views = [layer.store.view() for layer in session.cache.layers]
        return EncodedChunk(prefix_ids, 0, [k.clone() for k, _ in views], [v.clone() for _, v in views])

    def _after_prefix(self, session: Session, prefix_ids: list[int]) -> Session:
        """A session that has fed exactly `prefix_ids` (a fork of the stored snapshot when there is one)."""
        if not prefix_ids:
            return session
        reuse = self.prefixes.reuse(session, prefix_ids + [0])  # the whole prefix may be reused
        if reuse is not None:
            session = reuse.session
        done = reuse.tokens if reuse is not None else 0
        if done < len(prefix_ids):
            session.feed(prefix_ids[done:], "append" if done else "prefill", logits="none")
            self.prefixes.store(session, prefix_ids)  # keeps a fork: this session goes on alone
        return session
