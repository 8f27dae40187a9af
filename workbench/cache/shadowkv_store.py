"""The store of `shadowkv` (workbench.cache.shadowkv): a prefill's keys as low-rank factors, its values in a second
store, chunk landmarks and outlier chunks; the recent window and every later token dense.

Until `compress()` (which the policy calls once the prefill's attention ran, so that the prefill attends densely
as in the reference) this is a plain `DenseStore`. `compress()` then splits the prefill of n tokens as the
reference's `ShadowKVCache.prefill_kv_cache` does (ByteDance-Seed/ShadowKV, models/kv_cache.py):

    [ chunks * C tokens: the context, in chunks of C ][ n - chunks * C: the local window ]   chunks = n // C - local

  keys (pre-RoPE, all KV heads side by side: n x kv_heads * D) -> truncated SVD U S V^T: U's rows of the context
        (u: context x rank) and S V^T per KV head (sv: kv_heads x rank x D) are kept, the keys themselves are not
  landmarks    per KV head, the mean of each context chunk's post-RoPE keys
  outliers     per KV head, the `outliers` chunks whose keys are least like their landmark (the lowest minimum
               cosine similarity): their post-RoPE keys and values stay dense, and they have no landmark
  values       of the other chunks, per KV head in landmark order (the reference's `v_cache_cpu`, offloaded there)
  dense        the local window, the outlier chunks and every token appended after the prefill (DenseStore slots)

`rebuild(landmark)` gives the post-RoPE keys (U rows @ S V^T, rotated to their positions) and the values of chosen
landmarks' chunks. The compressed part never changes afterwards: provisional tails, rollback and commit touch the
dense slots only, so they stay exact. Bytes are the tensors' sizes, by component.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.rope import rotate
from workbench.cache.storage import DenseStore, slack


@dataclass
class Shadow:
    """The compressed prefill of one layer."""

    u: torch.Tensor  # (context, rank): the context tokens' rows of U (shared by the KV heads)
    sv: torch.Tensor  # (kv_heads, rank, D): S V^T, per KV head
    values: torch.Tensor  # (kv_heads, landmarks * C, D): values of the non-outlier chunks, in landmark order
    landmarks: torch.Tensor  # (kv_heads, landmarks, D): mean post-RoPE key of each non-outlier chunk
    chunks: torch.Tensor  # (kv_heads, landmarks) long: the chunk index of each landmark (ascending)
    outliers: torch.Tensor  # (kv_heads, outliers) long: the outlier chunks (ascending); bookkeeping, not stored

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"low_rank_u": self.u, "low_rank_sv": self.sv, "shadow_values": self.values,
                "landmarks": self.landmarks, "landmark_chunks": self.chunks}


class ShadowKVStore(DenseStore):
    """A dense store whose prefill `compress()` turns into low-rank keys, landmarks, outlier chunks and values."""

    def __init__(self, rank: int, chunk_size: int, outliers: int, local_chunks: int, inv_freq: torch.Tensor,
                 rope_scaling: float = 1.0):
        super().__init__()
        self.rank, self.chunk_size, self.outliers, self.local_chunks = rank, chunk_size, outliers, local_chunks
        self.inv_freq, self.rope_scaling = inv_freq, rope_scaling
        self.shadow: Shadow | None = None
        self.compressed = False  # compress() ran (a prefill too short to chunk stays dense: shadow None)

    # -- the prefill ----------------------------------------------------------------------------------------------
    def context_chunks(self, n: int) -> int:
        """Chunks of a prefill of n tokens that are compressed (the reference's `self.chunks`)."""
        return n // self.chunk_size - self.local_chunks

    def compress(self) -> None:
        """Compress the prefill held now (every head holds positions 0..n-1 in order). Once; a prefill with no
        more context chunks than outlier chunks stays dense."""
        if self.compressed:
            return
        self.compressed = True
        n, size = self.lengths[0], self.chunk_size
        chunks = self.context_chunks(n)
        if chunks - self.outliers <= 0:
            return
        heads, dim, context = self.num_heads, self.keys.shape[-1], chunks * size
        keys, values = self.keys[:, :n], self.values[:, :n]
        # truncated SVD of the pre-RoPE keys, every KV head side by side (the reference's get_svd)
        pre = rotate(keys.double(), -torch.arange(n, device=keys.device), self.inv_freq.double()) / self.rope_scaling
        u, s, vh = torch.linalg.svd(pre.transpose(0, 1).reshape(n, heads * dim), full_matrices=False)
        rank = min(self.rank, s.shape[0])
        sv = (s[:rank, None] * vh[:rank]).view(rank, heads, dim).transpose(0, 1)
        # landmarks and outlier chunks from the post-RoPE keys (the reference's prefill_kv_cache)
        blocks = keys[:, :context].float().view(heads, chunks, size, dim)
        means = blocks.mean(2)
        similarity = torch.nn.functional.cosine_similarity(means[:, :, None], blocks, dim=-1)  # (heads, chunks, C)
        outliers = similarity.amin(-1).topk(self.outliers, largest=False).indices.sort(-1).values
        rest = torch.ones(heads, chunks, dtype=torch.bool, device=keys.device).scatter_(1, outliers, False)
        landmark_chunks = torch.arange(chunks, device=keys.device).expand(heads, -1)[rest].view(heads, -1)
        kept_values = values[:, :context].reshape(heads, chunks, size, dim).gather(
            1, landmark_chunks[..., None, None].expand(-1, -1, size, dim)).reshape(heads, -1, dim)
        self.shadow = Shadow(u[:context, :rank].to(keys.dtype).contiguous(), sv.to(keys.dtype).contiguous(),
                             kept_values.clone(), means.gather(1, landmark_chunks[..., None].expand(-1, -1, dim))
                             .to(keys.dtype), landmark_chunks.clone(), outliers)
        # the dense slots left: the outlier chunks' tokens and the local window, in position order
        offsets = torch.arange(size, device=keys.device)
        slots = torch.cat([(outliers[..., None] * size + offsets).reshape(heads, -1),
                           torch.arange(context, n, device=keys.device).expand(heads, -1)], dim=1)
        self._keep_fresh(slots)

    def _keep_fresh(self, slots: torch.Tensor) -> None:
        """Keep the slots (kv_heads, width) per head, in new buffers: the prefill's attention may still hold a view
        of the old ones, and the memory of the rest is given back."""
        width = slots.shape[1]
        old = (self.keys, self.values, self.positions, dict(self.extras))
        self.extras = {}
        self._allocate(old[0], old[1], width + slack(width), copy=False)
        for buffer, previous in zip((self.keys, self.values, self.positions), old[:3]):
            index = slots if previous.dim() == 2 else slots[..., None].expand(-1, -1, previous.shape[-1])
            buffer[:, :width] = previous.gather(1, index)
        for name, tensor in old[3].items():
            self.extras[name] = tensor.new_full((self.num_heads, self.capacity, *tensor.shape[2:]), self._fills[name])
            self.extras[name][:, :width] = tensor[torch.arange(self.num_heads, device=slots.device)[:, None], slots]
        self.lengths = [width] * self.num_heads
        self.identity = False
        self._offsets_for = None

    # -- reading the compressed prefill ---------------------------------------------------------------------------
    def rebuild(self, landmark: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chunks of landmarks `landmark` (kv_heads, k) (indices into each head's landmarks): their post-RoPE
        keys rebuilt from the low-rank factors and rotated to their positions, their values and positions, each
        (kv_heads, k * C, ...) in the order given."""
        shadow, size = self.shadow, self.chunk_size
        offsets = torch.arange(size, device=landmark.device)
        positions = (shadow.chunks.gather(1, landmark)[..., None] * size + offsets).flatten(1)  # (kv_heads, k * C)
        rows = (landmark[..., None] * size + offsets).flatten(1)
        pre = torch.bmm(shadow.u[positions].float(), shadow.sv.float())  # (kv_heads, k * C, D)
        keys = (rotate(pre, positions, self.inv_freq) * self.rope_scaling).to(shadow.sv.dtype)
        values = shadow.values.gather(1, rows[..., None].expand(-1, -1, shadow.values.shape[-1]))
        return keys, values, positions

    # -- accounting -----------------------------------------------------------------------------------------------
    def tokens_off_slots(self) -> list[int]:
        """Per KV head, the prefill tokens kept compressed (the landmarks' chunks): still held, in another form."""
        landmarks = 0 if self.shadow is None else self.shadow.chunks.shape[1]
        return [landmarks * self.chunk_size] * self.num_heads

    def nbytes_by_component(self) -> dict[str, int]:
        parts = {"dense": super().nbytes()}
        if self.shadow is not None:
            parts.update({name: t.numel() * t.element_size() for name, t in self.shadow.tensors().items()})
        return parts

    def nbytes(self) -> int:
        return sum(self.nbytes_by_component().values())
