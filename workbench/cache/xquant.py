"""`xquant`: cache the quantized layer input X (or, for GQA models, an SVD latent of it) instead of keys and values,
and rematerialize K = RoPE(W_k X) and V = W_v X from it whenever attention reads the cache.

XQuant (Tomar et al., 2025, "XQuant: Breaking the Memory Wall for LLM Inference with KV Cache Rematerialization"):
  X        the post-norm input of each layer's attention (what q_proj/k_proj/v_proj read), captured by a forward
           pre-hook on the attention module (installed once per model, idle for every other cache).
  MHA      (2 * kv_heads * head_dim >= hidden) X itself is cached: one tensor instead of two, 2x fewer elements
           than K and V at equal bits ("x" form).
  GQA      (X wider than K and V together, e.g. SmolLM2-135M: hidden 576 > 2 * 3 * 64) the paper's GQA form: an
           offline SVD of each projection, W_k^T = U_k S_k B_k^T, and the cache holds the latents X U_k and X U_v
           (r = kv_heads * head_dim each: as many elements as K and V, but easier to quantize), rematerialized as
           K = RoPE((X U_k) S_k B_k^T), V = (X U_v) S_v B_v^T ("svd" form).
  codes    asymmetric uniform min/max (the workbench's one quantizer): the key-like stream (X, X U_k) per channel
           over groups of G tokens, the value-like one (X U_v) per token over groups of G channels, scales and zeros
           in float16; the newest tokens (fewer than R; flushed R at a time) in full precision.
Storage: workbench.cache.xquant_store.XQuantStore (no key or value buffer: the streams only).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from workbench.cache.base import CachePolicy
from workbench.cache.kvcache import KVCache
from workbench.cache.mixed_precision_store import head_dim
from workbench.cache.quantized import check_packing
from workbench.cache.rope import attention_scaling, inverse_frequencies
from workbench.cache.xquant_store import Rematerializer, XQuantStore
from workbench.errors import ParameterError, UnsupportedError, WorkbenchError
from workbench.registry import param

FORMS = ("auto", "x", "svd")
_FACTORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model.hf -> {form: [Rematerializer]}
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")  # transformers 5.2x, older releases


def attention_modules(hf_model) -> list:
    """The decoder's attention modules in layer order; a clear refusal for families XQuant here cannot rebuild."""
    found = {}
    for module in hf_model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "o_proj") and (
                hasattr(module, "k_proj") or hasattr(module, "qkv_proj")):
            found[module.layer_idx] = module
    text = hf_model.config.get_text_config(decoder=True)
    if len(found) != text.num_hidden_layers or any(not hasattr(m, "k_proj") for m in found.values()):
        raise UnsupportedError(f"cache 'xquant' rematerializes keys and values with each layer's own k_proj and "
                               f"v_proj; {type(hf_model).__name__} has no such attention module in every layer "
                               "(supported: Llama-like families with separate q/k/v projections)")
    if getattr(text, "num_kv_shared_layers", 0):
        raise UnsupportedError("cache 'xquant' does not support models whose layers share keys and values")
    return [found[i] for i in range(text.num_hidden_layers)]


def _capture(module, args, kwargs):
    """Forward pre-hook of an attention module: hand its input X to its layer's XQuant store, if its cache is one."""
    cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
    if isinstance(cache, KVCache):
        store = cache.layers[module.layer_idx].store
        if isinstance(store, XQuantStore):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            store.stage(x[0])


def install_capture(hf_model) -> None:
    """Put the capturing pre-hook on every attention module once (idempotent)."""
    for module in attention_modules(hf_model):
        if not getattr(module, "_xquant_capture", False):
            module.register_forward_pre_hook(_capture, with_kwargs=True)
            module._xquant_capture = True


def rematerializers(model, form: str) -> list[Rematerializer]:
    """Per layer, the matrices that take X to the stored streams and back to keys and values (computed once per
    model and form: the SVDs are offline work)."""
    fitted = _FACTORS.setdefault(model.hf, {})
    if form in fitted:
        return fitted[form]
    text = model.text_config
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    try:
        inv_freq, scaling = inverse_frequencies(model.hf).to(model.device), attention_scaling(model.hf)
    except WorkbenchError as error:
        raise UnsupportedError(f"cache 'xquant' re-applies RoPE to rematerialized keys and needs one rotary "
                               f"embedding: {error}") from None
    layers = []
    for module in attention_modules(model.hf):
        w_k, w_v = module.k_proj.weight.detach().double(), module.v_proj.weight.detach().double()
        head_dim = w_k.shape[0] // kv_heads
        if form == "x":
            ups, downs = [w_k.T, w_v.T], [None, None]
        else:  # W^T (hidden, kv) = U S B^T, r = min(hidden, kv): X W^T = (X U)(S B^T) exactly
            ups, downs = [], []
            for w in (w_k, w_v):
                u, s, vh = torch.linalg.svd(w.T, full_matrices=False)
                ups.append(s[:, None] * vh)
                downs.append(u)
        bias = [None if p.bias is None else p.bias.detach().float() for p in (module.k_proj, module.v_proj)]
        layers.append(Rematerializer(form, *(t.float().to(model.device) for t in ups),
                                     *(None if t is None else t.float().to(model.device) for t in downs),
                                     *bias, getattr(module, "k_norm", None), kv_heads, head_dim, inv_freq, scaling))
    fitted[form] = layers
    return layers


def chosen_form(model, form: str) -> str:
    """'auto': the paper's choice, X itself unless it is wider than keys and values together (GQA: the latents)."""
    if form != "auto":
        return form
    text = model.text_config
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return "svd" if text.hidden_size > 2 * kv_heads * head_dim else "x"


@dataclass
class XQuant(CachePolicy):
    name = "xquant"
    summary = ("Keep every token as the quantized layer input X (GQA models: its SVD latents X U_k, X U_v) and "
               "rematerialize keys and values from it with the layer's own projections and RoPE at every step.")
    paper = ("XQuant: Breaking the Memory Wall for LLM Inference with KV Cache Rematerialization (Tomar et al., "
             "2025)")
    departs = ("XQuant-CL (cross-layer deltas) is not implemented; the one shared uniform quantizer offers 2, 4 and "
               "8 bits (the paper also evaluates 3); the default group is G = 64 (the paper's 128 does not divide "
               "SmolLM2-135M's 192-wide latents), quantization groups and the full-precision residual follow "
               "KIVI's layout (key-like stream per channel over G tokens, value-like per token over G channels, "
               "the newest tokens, fewer than R, kept in the model's dtype, flushed R at a time); the X stream "
               "of the MHA form is quantized per channel (we could not confirm the paper's axis for it); a pass's "
               "attention reads its own new tokens from unquantized X (they are quantized after it, at settle), "
               "so a verify/rollout tail stays in full precision until commit; rematerialization is plain torch "
               "(dequantize, matmul, RoPE) into a full-precision view every step, not the paper's fused kernels; "
               "the first layers are not kept at higher precision; a replayed prefill (no X seen) recovers the "
               "streams from its keys and values (exact up to rounding; refused for families with k_norm)")

    bits: int = param(4, "bits per code (the paper: 2 to 4; 8 is offered for checks)", choices=(2, 4, 8))
    group: int = param(64, "G: tokens per group of the key-like stream, channels per group of the value-like one",
                       min=1)
    residual: int = param(64, "R: newest tokens kept in full precision, flushed R at a time (a multiple of G)",
                          min=1)
    form: str = param("auto", "what is cached: 'x' the layer input, 'svd' the GQA latents X U_k and X U_v, 'auto' "
                              "the paper's choice (svd when X is wider than keys and values together)",
                      choices=FORMS)

    needs_bridge = False  # nothing to evict: works in any forward that runs the model's attention modules

    def validate(self) -> None:
        if self.residual % self.group:
            below, above = self.residual // self.group * self.group, -(-self.residual // self.group) * self.group
            raise ParameterError(f"cache 'xquant' residual R={self.residual} is not a multiple of the group "
                                 f"G={self.group} (the key-like stream is flushed R tokens at a time in groups of "
                                 f"G); e.g. {below or self.group} or {above}")

    def build(self, model, forward=None) -> KVCache:
        form = chosen_form(model, self.form)
        hidden = model.text_config.hidden_size
        if form == "svd":  # the SVD's rank: the latent width
            check_packing(self, min(hidden, model.num_kv_heads * head_dim(model)), "the latent width",
                          "channels of kv_heads x head_dim")
        elif hidden * self.bits % 8:
            raise ParameterError(f"cache 'xquant': {self.bits}-bit codes of a {hidden}-wide stream do not fill whole "
                                 "bytes")
        layers = rematerializers(model, form)
        install_capture(model.hf)
        stores = iter(layers)  # the cache builds its stores layer by layer, in order
        return KVCache(model.config, self, lambda: self.new_store(next(stores)))

    def new_store(self, remat: Rematerializer | None = None) -> XQuantStore:
        if remat is None:
            raise WorkbenchError("cache 'xquant' stores need the model's projections: build the cache with "
                                 "policy.build(model)")
        return XQuantStore(remat, self.bits, self.group, self.residual)
