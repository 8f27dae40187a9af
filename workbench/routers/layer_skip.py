"""`layer_skip` (router): per sequence, the prompt decides which decoder layers the decoding skips.

Training-free layer routing. At the prefill every layer runs and is measured on the prompt; from the first decode
pass on, the `share` of layers that changed the residual stream least are skipped (they return their input, via
workbench.run.layers), for the rest of the sequence.

Measures (`metric`):
  "bi"       ShortGPT's Block Influence (Men et al., 2024): BI_l = 1 - mean over the prompt's tokens of
             cos(layer l's input, its output); the layers with the lowest BI are skipped, wherever they are.
  "angular"  Gromov et al. (2024), "The Unreasonable Ineffectiveness of the Deeper Layers": the angular distance
             arccos(cos(x_l, x_{l+n})) / pi between the input of layer l and the output of layer l+n-1 at the
             prompt's last token; the contiguous block of n layers with the smallest distance is skipped.

Deciding once per sequence at the prefill is FiRST's protocol (Jain et al., 2024: the prompt decides which layers
the decoding skips), which keeps the KV cache consistent: a skipped layer holds the prompt's keys and values and
is never read again. Layer 0 always runs (the cache counts positions there).

Departures: FiRST trains a small router per layer, and ShortGPT and Gromov et al. measure on a calibration set
and remove the layers from the model for good; here the sequence's own prompt is the calibration set (nothing is
trained or removed), and Gromov et al.'s healing fine-tune (QLoRA) is not done. The prefill itself runs every
layer (it is what is measured), so the savings are the decode passes' only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.registry import param
from workbench.routers.base import Router


@dataclass
class LayerSkipRouter(Router):
    name = "layer_skip"
    summary = ("Skip the decoder layers that change the hidden state least on the prompt (ShortGPT's Block "
               "Influence, or the most similar block), from the first decode step on.")
    paper = ("ShortGPT: Layers in Large Language Models are More Redundant Than You Expect (Men et al., 2024); "
             "The Unreasonable Ineffectiveness of the Deeper Layers (Gromov et al., 2024); FiRST: Finetuning "
             "Router-Selective Transformers (Jain et al., 2024)")
    departs = ("measured on the sequence's own prompt at the prefill, not on a calibration set, and no trained "
               "router (FiRST) or healing fine-tune (Gromov et al.); layer 0 always runs; the prefill runs every "
               "layer, so only decode passes are saved")
    needs_moe = False  # any decoder model: it routes layers, not experts
    routes_layers = True

    share: float = param(0.25, "share of the decoder layers skipped while decoding (rounded down)", min=0.0, max=0.9)
    metric: str = param("bi", "how redundant a layer is: 'bi' (ShortGPT's 1 - cos of each layer's input and "
                              "output, over the prompt) or 'angular' (Gromov et al.'s most similar contiguous block "
                              "at the last prompt token)", choices=("bi", "angular"))

    def count(self, num_layers: int) -> int:
        """How many layers are skipped in a model of `num_layers` (layer 0 is never one of them)."""
        return min(int(self.share * num_layers), num_layers - 1)

    # -- the prefill measures ---------------------------------------------------------------------------------
    def watches_layers(self, state: dict, phase: str) -> bool:
        return phase == "prefill"

    def observe_layer(self, call, state: dict) -> None:
        if call.layer == 0:  # a new prefill: a new sequence, measured afresh
            state.clear()
            state["influence"], state["inputs"] = {}, {}
        state["influence"][call.layer] = float(1.0 - call.similarity().mean())
        state["inputs"][call.layer] = call.hidden_in[-1].float()  # the last prompt token, for 'angular'
        state["last_output"] = call.hidden_out[-1].float()

    # -- the decoding skips -----------------------------------------------------------------------------------
    def skipped_layers(self, state: dict, phase: str, num_layers: int) -> frozenset[int]:
        if phase == "prefill" or "influence" not in state:
            return frozenset()
        if "skipped" not in state:
            state["skipped"] = self.choose(state, num_layers)
        return state["skipped"]

    def choose(self, state: dict, num_layers: int) -> frozenset[int]:
        """The layers to skip from the prefill's measurements."""
        n = self.count(num_layers)
        if n == 0:
            return frozenset()
        if self.metric == "bi":
            influence = state["influence"]
            ranked = sorted((layer for layer in influence if layer > 0), key=lambda layer: influence[layer])
            return frozenset(ranked[:n])
        distances = self.block_distances(state, num_layers, n)
        start = min(distances, key=distances.get)
        return frozenset(range(start, start + n))

    @staticmethod
    def block_distances(state: dict, num_layers: int, n: int) -> dict[int, float]:
        """Gromov et al.'s angular distance between the input of layer l and the output of layer l+n-1 (the input
        of layer l+n, or the last layer's output), at the last prompt token, for every start l >= 1."""
        inputs = state["inputs"]

        def stream(layer: int) -> torch.Tensor:
            return inputs[layer] if layer < num_layers else state["last_output"]

        distances = {}
        for start in range(1, num_layers - n + 1):
            cos = torch.nn.functional.cosine_similarity(stream(start), stream(start + n), dim=0).clamp(-1.0, 1.0)
            distances[start] = math.acos(float(cos)) / math.pi
        return distances
