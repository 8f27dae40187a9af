"""`kvquant`: non-uniform 2/3/4-bit codes, keys per channel before RoPE, sparse outliers, the first token exact.

KVQuant (Hooper et al., NeurIPS 2024), following its code (SqueezeAILab/KVQuant, quant/llama_simquant.py and
quant/kvquant/simquant_module_quantizer.py with --nuq --include_sparse --sparsity-threshold 0.99
--first_few_fp16 1):
  calibration  the model reads a calibration text once (the last `calibration_tokens` tokens of the repository's
               datasets/harbor_town.txt, title dropped; evaluations read its start). Per layer: keys (un-rotated
               to before RoPE) get per-channel thresholds at the 0.5 and 99.5 percentiles over the tokens, values
               per-token ones; both are normalized to [-1, 1] by them and a 1-D k-means on the normalized entries
               inside [-1, 1] (the first token left out) fits one codebook of 2**bits levels per layer and side
               (the reference fits one per layer: `SimQuant.quantize` flattens every channel into one k-means).
               Fitted once per model and configuration, then reused (a second build is instant).
  keys         normalized per channel by the calibrated thresholds; entries outside them are sparse outliers.
  values       normalized per token online; the top and bottom 0.5% of a token's entries are sparse outliers.
  sink         the first token is kept in full precision (attention-sink aware quantization).
Storage: workbench.cache.kvquant_store.KVQuantStore (packed uint8 codes, float16 zeros/ranges/codebooks, int32 COO
outlier indices with values in the model's dtype).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.cache.kvcache import KVCache
from workbench.cache.kvquant_store import KVQuantStore, LayerCalibration, SCALE_DTYPE
from workbench.cache.quantized import QuantizedPolicy, head_dim
from workbench.cache.rope import attention_scaling, inverse_frequencies, rotate
from workbench.errors import ParameterError, WorkbenchError
from workbench.registry import param

CALIBRATION_TEXT = Path(__file__).resolve().parents[2] / "datasets" / "harbor_town.txt"
_FITTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model.hf -> {configuration: calibrations}


# -- calibration ------------------------------------------------------------------------------------------------
def kmeans_1d(x: torch.Tensor, clusters: int, iterations: int = 50) -> torch.Tensor:
    """Ascending float32 (clusters,): Lloyd's k-means on the 1-D points x, started at the points' quantiles
    ((i + 0.5) / clusters; the reference's sklearn KMeans starts with k-means++), at most `iterations` rounds as the
    reference's max_iter=50. In 1-D each cluster is an interval of the sorted points, so a round is a search of the
    midpoints and prefix sums. A cluster that empties keeps its level."""
    points = x.double().flatten().sort().values
    if points.numel() < clusters:
        raise WorkbenchError(f"k-means of {clusters} levels needs at least as many calibration entries; got "
                             f"{points.numel()}")
    prefix = torch.cat([points.new_zeros(1), points.cumsum(0)])
    levels = torch.quantile(points, (torch.arange(clusters, dtype=torch.float64) + 0.5) / clusters)
    for _ in range(iterations):
        # a point at a midpoint goes to the lower level, as nearest_level rounds
        cuts = torch.searchsorted(points, (levels[1:] + levels[:-1]) / 2, right=True)
        bounds = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), points.numel())])
        counts = bounds.diff()
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        fitted = torch.where(counts > 0, sums / counts.clamp(min=1), levels)
        if torch.equal(fitted, levels):
            break
        levels = fitted
    return levels.float()


def fit_layer(keys: torch.Tensor, values: torch.Tensor, bits: int, outliers: float, first_token: bool,
              inv_freq: torch.Tensor | None, rope_scaling: float = 1.0) -> LayerCalibration:
    """One layer's calibration from its post-RoPE keys and values (kv_heads, T, D) at positions 0..T-1."""
    heads, tokens, dim = keys.shape
    keys = keys.float()
    if inv_freq is not None:  # before RoPE
        keys = rotate(keys, -torch.arange(tokens), inv_freq) / rope_scaling
    skip = 1 if first_token else 0  # the sink is not quantized, so it is not fitted (the reference's first_few_fp16)
    k = keys[:, skip:].transpose(0, 1).reshape(-1, heads * dim)  # tokens x channels
    v = values.float()[:, skip:].transpose(0, 1).reshape(-1, heads * dim)
    top = 1 - outliers / 2
    key_upper, key_lower = torch.quantile(k, top, dim=0), torch.quantile(k, 1 - top, dim=0)
    key_zero = ((key_upper + key_lower) / 2).to(SCALE_DTYPE).float()  # what the store keeps
    key_range = ((key_upper - key_lower) / 2).to(SCALE_DTYPE).float()
    value_upper, value_lower = torch.quantile(v, top, dim=1), torch.quantile(v, 1 - top, dim=1)
    value_zero, value_range = (value_upper + value_lower)[:, None] / 2, (value_upper - value_lower)[:, None] / 2
    levels = []
    for normalized in ((k - key_zero) / key_range, (v - value_zero) / value_range):
        normalized = torch.nan_to_num(normalized, 0.0, 0.0, 0.0)
        levels.append(kmeans_1d(normalized[normalized.abs() <= 1], 2 ** bits))  # outliers masked out
    return LayerCalibration(key_zero.view(heads, dim), key_range.view(heads, dim), *levels)


def calibration_ids(model, tokens: int) -> torch.Tensor:
    """(1, n) the last `tokens` tokens (at most the model's positions) of datasets/harbor_town.txt's body."""
    text = CALIBRATION_TEXT.read_text(encoding="utf-8").strip().split("\n", 1)[1].strip()
    ids = model.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    limit = min(tokens, model.max_positions or tokens)
    return ids[:, -limit:].to(model.device)


class _KVCollector:
    """An attention observer keeping each layer's keys and values (what the full cache holds after a prefill)."""

    def __init__(self):
        self.keys, self.values = {}, {}

    def wants(self, layer: int) -> frozenset[str]:
        return frozenset({"entropy"})  # the cheapest statistic: observe() is called only when something is wanted

    def observe(self, call, result) -> None:
        self.keys[call.layer], self.values[call.layer] = call.key[0].detach().clone(), call.value[0].detach().clone()


def collect_keys_values(model, ids: torch.Tensor, forward=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, post-RoPE keys and values (kv_heads, T, D) of one prefill of `ids`: through a workbench session
    (`forward`, as workbench.run.build_cache hands it), or without one through model.hf and a DynamicCache."""
    if forward is not None:
        collector = _KVCollector()
        with torch.inference_mode():
            forward(ids, collector, "sdpa")
        return [(collector.keys[i], collector.values[i]) for i in range(model.num_layers)]
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.hf.config)
        model.hf(ids, use_cache=True, **{model.cache_keyword: cache})
    return [(layer.keys[0].clone(), layer.values[0].clone()) for layer in cache.layers]


def calibrate(model, bits: int, outliers: float, first_token: bool, pre_rope: bool, tokens: int,
              forward=None) -> list[LayerCalibration]:
    """Every layer's calibration, fitted once per model and configuration (then served from memory)."""
    fitted = _FITTED.setdefault(model.hf, {})
    key = (bits, outliers, first_token, pre_rope, tokens)
    if key not in fitted:
        inv_freq, scaling = rope(model) if pre_rope else (None, 1.0)
        layers = collect_keys_values(model, calibration_ids(model, tokens), forward)
        fitted[key] = [fit_layer(k.cpu(), v.cpu(), bits, outliers, first_token, inv_freq, scaling)
                       for k, v in layers]
    return fitted[key]


def rope(model) -> tuple[torch.Tensor, float]:
    try:
        return inverse_frequencies(model.hf), attention_scaling(model.hf)
    except WorkbenchError as error:
        raise WorkbenchError(f"cache 'kvquant' un-rotates keys to before RoPE and needs one rotary embedding: "
                             f"{error}. Use pre_rope=False to quantize the keys as they are cached") from None


# -- the policy ---------------------------------------------------------------------------------------------------
@dataclass
class KVQuant(QuantizedPolicy):
    name = "kvquant"
    summary = ("Keep every token, quantized to non-uniform levels fitted by k-means on a calibration text: keys per "
               "channel before RoPE (calibrated thresholds), values per token, the top 1% outliers and the first "
               "token kept in full precision.")
    paper = ("KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache Quantization (Hooper et al., "
             "NeurIPS 2024)")
    departs = ("the non-uniform datatype is fitted without sensitivity (Fisher) weights: plain k-means, started at "
               "quantiles (reference: sklearn k-means++ weighted by squared gradients); calibration reads the last "
               "1024 tokens of the repository's own text (reference: 16 x 2048 tokens of Wikitext-2); a pass's "
               "attention reads its own new tokens unquantized and later passes read them quantized (the reference "
               "quantizes inside the pass), so a verify/rollout tail stays in full precision until commit; Q-Norm "
               "and the custom kernels are not used: the whole cache is dequantized and re-rotated into a "
               "full-precision view every step (memory saved, not bandwidth); outliers are a COO list (int32 "
               "index, value in the model's dtype) instead of CSR/CSC; per-token value outliers are the "
               "ceil((n - 1) * outliers / 2) largest and smallest entries of a token (what the reference's "
               "quantile thresholds select for distinct values); 3-bit codes are bit-packed, 8 in 3 bytes")

    bits: int = param(3, "bits per code (the paper's headline: 3; 2 and 4 too)", choices=(2, 3, 4))
    outliers: float = param(0.01, "fraction of entries kept as sparse full-precision outliers (0.01: the paper's "
                                  "1%; 0: dense-only)", min=0.0, max=0.5)
    first_token: bool = param(True, "keep the first token (the attention sink) in full precision")
    pre_rope: bool = param(True, "quantize keys before RoPE (un-rotated, rotated back when read)")
    calibration_tokens: int = param(1024, "calibration tokens: the end of datasets/harbor_town.txt", min=16)

    def validate(self) -> None:
        if self.outliers >= 0.5:
            raise ParameterError(f"cache 'kvquant' outliers={self.outliers}: at most 0.5 of the entries can be "
                                 "outliers (half above, half below); the paper keeps 0.01")

    def build(self, model, forward=None) -> KVCache:
        dim = head_dim(model)
        if dim % 8:
            raise ParameterError(f"cache 'kvquant' packs codes 8 at a time: the model's head dimension {dim} is "
                                 "not a multiple of 8")
        layers = calibrate(model, self.bits, self.outliers, self.first_token, self.pre_rope,
                           self.calibration_tokens, forward)
        inv_freq, scaling = rope(model) if self.pre_rope else (None, 1.0)
        inv_freq = None if inv_freq is None else inv_freq.to(model.device)
        calibrations = iter(layers)  # the cache builds its stores layer by layer, in order
        return KVCache(model.config, self, lambda: self.new_store(next(calibrations), inv_freq, scaling,
                                                                  model.device))

    def new_store(self, calibration: LayerCalibration | None = None, inv_freq=None, rope_scaling: float = 1.0,
                  device=None) -> KVQuantStore:
        if calibration is None:
            raise WorkbenchError("cache 'kvquant' stores need the model's calibration: build the cache with "
                                 "policy.build(model)")
        moved = LayerCalibration(*(t.to(device) for t in (calibration.key_zero, calibration.key_range,
                                                          calibration.key_levels, calibration.value_levels)))
        return KVQuantStore(moved, self.bits, self.outliers, self.first_token, inv_freq, rope_scaling)

