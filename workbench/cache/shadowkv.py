"""`shadowkv`: the prefill's keys as a truncated SVD of their pre-RoPE form, values in a second store; each decoding
step reads only the chunks its query picks by landmark, with their keys rebuilt, plus outliers and a dense window.

ShadowKV (Sun et al., 2024), following its code (ByteDance-Seed/ShadowKV, models/kv_cache.py `ShadowKVCache`, the
accuracy path, and models/base.py):
  prefill   attends densely over its own keys; then (workbench.cache.shadowkv_store.ShadowKVStore.compress) the
            pre-RoPE keys of all KV heads side by side get a truncated SVD (rank `rank`); the context (all but the
            last `local_chunks` chunks and the remainder) is cut into chunks of `chunk_size` tokens; per KV head
            each chunk's landmark is the mean of its post-RoPE keys, and the `outlier_chunks` chunks whose keys
            have the lowest minimum cosine similarity to their landmark stay dense (keys and values); the other
            chunks keep only their rows of U and their values.
  decoding  per query and KV head: scores softmax(q . landmarks * scaling) over the landmarks, the maximum over the
            KV head's query heads (the reference's grouping), and the top `budget / chunk_size` chunks are read:
            their keys rebuilt as U[tokens] @ (S V^T)[head] and rotated with RoPE at their positions, their values
            gathered. Attention reads those, the outlier chunks, the local window and every token decoded so far
            (kept dense, as in the reference), never the rest of the prefill.
Defaults: chunk_size 8 and local_chunks 4 are the reference's; its rank 160 is for Llama-3-8B's 8 x 128 = 1024-wide
keys, so rank None keeps that fraction of the model's key width (30 of SmolLM2-135M's 3 x 64 = 192); its sparse
budget 2048 tokens and 48 outlier chunks are set for 128k-token prompts (1.6% and 0.3% of them) and here are
scaled down to prompts of hundreds of tokens: 64 tokens (8 chunks) and 2 outlier chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.base import CachePolicy
from workbench.cache.kvcache import KVCache
from workbench.cache.mixed_precision_store import head_dim
from workbench.cache.rope import attention_scaling, inverse_frequencies
from workbench.cache.shadowkv_store import ShadowKVStore
from workbench.errors import ParameterError, WorkbenchError
from workbench.registry import param

REFERENCE_RANK = (160, 1024)  # the reference's rank over Llama-3-8B's key width (8 KV heads x 128)


@dataclass
class ShadowKV(CachePolicy):
    name = "shadowkv"
    summary = ("Keep the prefill's keys as a truncated SVD (pre-RoPE) and its values apart; each decoding step reads "
               "only the chunks its query picks by landmark (keys rebuilt and re-rotated), the outlier chunks, the "
               "recent window and the decoded tokens.")
    paper = ("ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference (Sun et al., 2024; "
             "ICML 2025)")
    departs = ("the values' second store is on the model's device (the reference offloads it to the CPU: the same "
               "bytes, no transfer to overlap) and nothing is fused: keys are rebuilt and rotated with plain torch "
               "ops (reference: CUDA gather-GEMM-RoPE kernels); the sparse budget (64 tokens) and the outlier chunks "
               "(2) are scaled down from the reference's 2048 and 48, set for 128k-token prompts, and rank None "
               "keeps the reference's 160/1024 of the key width; landmark scores use the model's attention scaling "
               "(the reference divides by sqrt(128) whatever the head size); a pass of several decoding queries "
               "(verify, rollout) picks chunks per query, as one-by-one decoding would (the reference sums the "
               "softmax over a pass's queries); an append pass (a later chat turn) reads every chunk, keys rebuilt "
               "(the reference has no later turns); U keeps only the context's rows (the reference also keeps the "
               "local window's, which are dense anyway); a prompt with no more context chunks than outlier chunks "
               "stays dense (the reference asserts a longer prompt)")

    rank: int | None = param(None, "rank of the keys' truncated SVD (None: the reference's 160 of 1024 as a "
                                   "fraction of the key width kv_heads x head_dim; at or above min(tokens, width) "
                                   "the keys are kept exactly)", min=1)
    budget: int = param(64, "sparse budget: prefill tokens each decoding query reads by landmark (a multiple of "
                            "chunk_size; the reference: 2048)", min=1)
    chunk_size: int = param(8, "tokens per chunk (one landmark each)", min=1)
    outlier_chunks: int = param(2, "chunks per KV head kept dense for their spread keys (the reference: 48)", min=0)
    local_chunks: int = param(4, "last chunks of the prefill kept dense (the local window), with the remainder",
                              min=0)

    def validate(self) -> None:
        if self.budget % self.chunk_size:
            below = self.budget // self.chunk_size * self.chunk_size
            allowed = f"{below} or {below + self.chunk_size}" if below else f"{self.chunk_size}"
            raise ParameterError(f"cache 'shadowkv' budget={self.budget} is not a multiple of chunk_size="
                                 f"{self.chunk_size} (whole chunks are read); e.g. {allowed}")

    def key_rank(self, model) -> int:
        """The SVD rank for `model`: `rank`, or the reference's fraction of its key width."""
        if self.rank is not None:
            return self.rank
        width = model.num_kv_heads * head_dim(model)
        return max(1, round(width * REFERENCE_RANK[0] / REFERENCE_RANK[1]))

    def build(self, model, forward=None) -> KVCache:
        try:
            inv_freq, scaling = inverse_frequencies(model.hf).to(model.device), attention_scaling(model.hf)
        except WorkbenchError as error:
            raise ParameterError(f"cache 'shadowkv' keeps keys before RoPE and rotates them back: {error}") from None
        rank = self.key_rank(model)
        return KVCache(model.config, self, lambda: ShadowKVStore(rank, self.chunk_size, self.outlier_chunks,
                                                                 self.local_chunks, inv_freq, scaling))

    # -- the hooks --------------------------------------------------------------------------------------------
    def evict(self, layer, call, result) -> None:
        if call.phase == "prefill":  # its attention ran densely: compress it now (nothing is dropped)
            layer.store.compress()

    def visible(self, layer, call):
        call.memo["shadowkv_mask"] = call.mask  # transformers' mask over positions, for the rebuilt chunks
        return None

    def select(self, layer, call) -> torch.Tensor:
        """Long (kv_heads, q, k): per KV head and query, the landmarks (indices into the store's) of the chunks it
        reads: top k = budget / chunk_size of softmax(q . landmarks * scaling), the maximum over the KV head's
        query heads."""
        landmarks = layer.store.shadow.landmarks.float()  # (kv_heads, L, D)
        heads, count = landmarks.shape[:2]
        query = call.query[0].float().view(heads, -1, call.num_queries, landmarks.shape[-1])  # (kv, g, q, D)
        scores = torch.softmax(torch.einsum("hgqd,hld->hgql", query, landmarks) * call.scaling, dim=-1)
        return scores.amax(1).topk(min(self.budget // self.chunk_size, count), dim=-1).indices

    def attended(self, layer, call):
        store = layer.store
        if store.shadow is None or call.phase == "prefill":
            return call.key, call.value
        heads, queries = store.num_heads, call.num_queries
        if call.decoding:  # each query reads its own chunks: one block of columns per query
            chosen = self.select(layer, call)  # (kv, q, k)
            per_query = chosen.shape[-1] * self.chunk_size
            keys, values, positions = store.rebuild(chosen.flatten(1))
            block = torch.arange(queries, device=keys.device).repeat_interleave(per_query)
            extra = block[None, None, :] == torch.arange(queries, device=keys.device)[None, :, None]
            extra = extra.expand(heads, -1, -1)
        else:  # an append pass reads every chunk
            landmarks = store.shadow.chunks.shape[1]
            keys, values, positions = store.rebuild(torch.arange(landmarks, device=call.key.device).expand(heads, -1))
            extra = torch.ones(heads, queries, positions.shape[1], dtype=torch.bool, device=keys.device)
        hf_mask = call.memo.get("shadowkv_mask")
        if hf_mask is not None:  # what transformers' mask says of those positions (a sliding window, say)
            extra = extra & hf_mask[0, 0][:, positions].transpose(0, 1).bool()
        mask = call.mask
        groups = call.groups
        if mask is None:  # plain causal over the dense slots: write it out before widening it
            held = store.all_positions()
            mask = ((held >= 0)[:, None] & (held[:, None] <= call.positions()[None, :, None]))
            mask = mask.repeat_interleave(groups, 0)[None]
        elif mask.shape[1] == 1:
            mask = mask.expand(-1, call.query.shape[1], -1, -1)
        call.mask = torch.cat([mask, extra.repeat_interleave(groups, 0)[None]], dim=-1)
        if call.slot_positions is not None:
            call.slot_positions = torch.cat([call.slot_positions, positions], dim=1)
        return torch.cat([call.key, keys[None]], dim=2), torch.cat([call.value, values[None]], dim=2)
