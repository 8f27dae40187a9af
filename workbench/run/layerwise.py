"""Running a model's own decoder layers on chosen tokens over key/value tensors assembled outside a cache.

KV reuse beyond prefix sharing (CacheBlend, APE: workbench.run.blend, workbench.run.parallel_encoding) needs
passes a `Session` cannot express: recomputing a scattered subset of a sequence's tokens over keys and values put
together from chunks encoded elsewhere, or queries over contexts that share positions. Both run here, layer by
layer, through the model's own modules: its embeddings, rotary embedding, decoder layers (attention through
workbench's bridge, so any attention variant serves), final norm and LM head. The decoder layer calls
`AssembledKV.update` as it would a cache's: the fresh keys and values of the rows computed are written at their
slots (or appended) and the layer's whole key/value tensors come back for the attention.

Llama-like families only (`LLAMA_LIKE`: pre-norm decoder layers taking `position_embeddings`, a decoder with
`embed_tokens`, `rotary_emb`, `layers` and `norm`), with a clear error otherwise.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from workbench import attention as attention_family
from workbench.cache.kvcache import ForwardPass
from workbench.errors import UnsupportedError
from workbench.run import bridge

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class Stack:
    """The modules a layer-by-layer pass runs."""

    embed: torch.nn.Module
    rotary: torch.nn.Module
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    head: torch.nn.Module
    cache_keyword: str  # the decoder layer's keyword for the cache (`cache`, or `past_key_values` before 5.2x)


def stack(model, what: str = "this") -> Stack:
    """The model's decoder stack; an UnsupportedError naming the supported families otherwise."""
    hf = model.hf
    family = getattr(hf.config, "model_type", None)
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else None
    parts = [getattr(decoder, name, None) for name in ("embed_tokens", "rotary_emb", "layers", "norm")]
    head = hf.get_output_embeddings()
    if family not in LLAMA_LIKE or any(part is None for part in parts) or head is None:
        raise UnsupportedError(f"{what} runs the decoder layers one by one and supports Llama-like models "
                               f"({', '.join(LLAMA_LIKE)}); {model.name} is {family!r}")
    layer_forward = inspect.signature(type(parts[2][0]).forward).parameters
    keyword = "cache" if "cache" in layer_forward else "past_key_values"
    return Stack(parts[0], parts[1], parts[2], parts[3], head, keyword)


class AssembledKV:
    """Per layer keys and values (1, kv_heads, slots, head_dim) of a whole sequence, what decoder layers update.

    `rows` -- slots (long) that the pass's tokens write their fresh keys and values to; None: appended at the end.
    `choose(layer, keys, values)` -- optional: which of the pass's rows (indices into them) write their fresh KV at
    this layer (CacheBlend's check layer); None from it, or no `choose`: all of them."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.rows: torch.Tensor | None = None
        self.choose: Callable | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keep = self.choose(layer_idx, key_states, value_states) if self.choose is not None else None
        if keep is not None:
            key_states, value_states = key_states[:, :, keep], value_states[:, :, keep]
        if self.rows is None:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=2)
        else:
            rows = self.rows if keep is None else self.rows[keep]
            self.keys[layer_idx][:, :, rows] = key_states
            self.values[layer_idx][:, :, rows] = value_states
        return self.keys[layer_idx], self.values[layer_idx]

    @property
    def slots(self) -> int:
        return self.keys[0].shape[2]


def embed(parts: Stack, ids: torch.Tensor) -> torch.Tensor:
    """(1, n, hidden) input embeddings of ids (n,)."""
    return parts.embed(ids[None])


def run_layer(model, parts: Stack, index: int, hidden: torch.Tensor, positions: torch.Tensor, kv: AssembledKV,
              mask: torch.Tensor | None, attention: Any = "sdpa", **extra) -> torch.Tensor:
    """Decoder layer `index` on hidden (1, n, hidden) at positions (n,) over `kv`, the attention going to the
    variant `attention` (`mask`: bool (1, 1, n, slots), True = may attend); `extra` reaches the variant's
    `call.kwargs`. Call inside `torch.inference_mode()` and `bridge.routed(model.hf)`."""
    variant = attention_family.get(attention)
    position_embeddings = parts.rotary(hidden, positions[None])
    bound = bridge.BoundPass(bridge.Binding(variant), ForwardPass("prefill", 0, hidden.shape[1]))
    out = parts.layers[index](hidden, attention_mask=mask, position_ids=positions[None], use_cache=True,
                              position_embeddings=position_embeddings, **{parts.cache_keyword: kv},
                              **{bridge.PASS_KEYWORD: bound}, **extra)
    return out[0] if isinstance(out, tuple) else out


def logits(parts: Stack, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 (n, vocab) from the last layer's output (1, n, hidden)."""
    return parts.head(parts.norm(hidden))[0].float()


def causal_mask(query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Bool (1, 1, queries, keys): each query sees the keys at its position or before."""
    return (key_positions[None, :] <= query_positions[:, None])[None, None]
