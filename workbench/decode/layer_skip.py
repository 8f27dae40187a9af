"""`layer_skip`: self-speculative decoding; the draft is the target model itself with some of its layers skipped.

No second model and no training. The draft runs the same weights with a set of decoder layers left out, either a
chosen set (`skip`, as in Draft & Verify and SWIFT) or every layer after the first E (`exit_layer`: the final norm
and the lm_head are applied to layer E's output, as in LayerSkip's early-exit draft). It drafts `k` tokens and
the full model checks them in one verify pass, with the acceptance rule every drafter shares (see
workbench.decode.speculative). The output is exactly greedy's tokens in greedy mode and follows `sample`'s
distribution otherwise, whatever layers the draft skipped.

How a layer is skipped. The draft has a Session of its own on the same model, with its own full cache, so the
target's cache never sees a draft token. Each decoder layer's `forward` is wrapped once per model (on the
instance: the weights are shared, nothing is copied). The wrapper reads the workbench pass that every forward of a
session carries in its keyword arguments (workbench.run.bridge: transformers hands them to every decoder layer).
When the pass belongs to a draft session that skips this layer, the layer returns its input hidden states
unchanged (in transformers 5 a decoder layer takes and returns a tensor, and its residual connection makes the
identity the natural "no layer"). Every other forward runs the layer's own code: the target's session, any other
session and a direct call of the model, also from another thread at the same time (nothing global changes
during a draft, unlike swapping `model.model.layers`). Skipped layers never call their attention, so their slots
of the draft cache stay empty, and the draft cache holds keys and values only for the layers it runs.

Layer 0 always runs: the cache counts positions, and transformers sizes its masks, at the first layer.

The default `skip="auto"` leaves out every other layer of the second half, the last layer kept (layers L/2,
L/2+2, ... < L-1: 7 of SmolLM2-135M's 30 layers, layer 2 of a 4-layer model, none of a 2-layer model). It is
this module's training-free starting point, not a set from a paper: SWIFT (Xia et al., Fig. 2a) finds that
uniformly skipping intermediate layers already drafts well, and layer-dropping studies agree that the first
layers (and the last, which shapes the logits) matter most. Both papers tune the set per model or task
(Bayesian optimisation: offline in Draft & Verify, on the fly in SWIFT); `skip="2,4,6"` sets it by hand.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass

import torch

from workbench.decode.speculative import ModelDrafting
from workbench.errors import ParameterError, WorkbenchError
from workbench.registry import param

# a draft session's cache -> the decoder layers its passes skip (read by every wrapped layer's forward)
_SKIPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INDEX = "_workbench_layer_index"  # set on a decoder layer once its forward is wrapped


@dataclass
class LayerSkip(ModelDrafting):
    name = "layer_skip"
    summary = ("Self-speculative decoding: the model with some layers skipped (or exiting early) drafts k tokens, "
               "the full model verifies them in one pass.")
    paper = ("Draft & Verify: Lossless Large Language Model Acceleration via Self-Speculative Decoding (Zhang et "
             "al., ACL 2024); SWIFT: On-the-Fly Self-Speculative Decoding (Xia et al., 2024); LayerSkip's early-"
             "exit draft (Elhoushi et al., ACL 2024)")
    departs = ("whole decoder layers are skipped (Draft & Verify skips attention and MLP sublayers apart) from a "
               "fixed set, not one found by Bayesian optimisation (Draft & Verify offline, SWIFT on the fly); no "
               "confidence-based early stop of the draft (both papers; schedule='heuristic' adapts its length "
               "instead); the draft keeps its own cache for the layers it runs (LayerSkip's early exit reuses the "
               "verify pass's)")

    skip: str = param("auto", "layers the draft skips: comma-separated indices (layer 0 always runs), 'auto' "
                              "(every other layer of the second half, the last kept) or 'none'")
    exit_layer: int = param(0, "early exit instead: the draft runs only the first exit_layer layers, then the "
                               "final norm and lm_head (0: off, use `skip`)", min=0)

    def validate(self) -> None:
        super().validate()
        listed = parse_skip(self.skip)  # raises on a malformed list
        if self.exit_layer and listed is not None:
            raise ParameterError(f"decoder 'layer_skip' takes skip= or exit_layer=, not both (skip={self.skip!r}, "
                                 f"exit_layer={self.exit_layer}); leave skip='auto' for an early exit")

    def skipped_layers(self, num_layers: int) -> frozenset[int]:
        """The layers the draft of a model with `num_layers` decoder layers skips (checked against that count)."""
        if self.exit_layer:
            if self.exit_layer >= num_layers:
                raise ParameterError(f"decoder 'layer_skip' parameter 'exit_layer' is {self.exit_layer}; the model "
                                     f"has {num_layers} layers, so it must be in 1..{num_layers - 1} (0: off)")
            return frozenset(range(self.exit_layer, num_layers))
        listed = parse_skip(self.skip)
        if listed is None:
            return frozenset(range(num_layers // 2, num_layers - 1, 2))
        outside = sorted(i for i in listed if i >= num_layers)
        if outside:
            raise ParameterError(f"decoder 'layer_skip' parameter 'skip' names layers {outside}; the model has "
                                 f"{num_layers} layers, so skipped layers must be in 1..{num_layers - 1}")
        return listed

    def step(self, ctx) -> list[int]:
        self.draft_session(ctx)  # at the first step: bad layer indices are refused before anything is drafted
        return super().step(ctx)

    def draft_session(self, ctx):
        return draft_session(self, ctx)


def parse_skip(skip: str) -> frozenset[int] | None:
    """The layer indices of a `skip` value; None for 'auto'."""
    text = skip.strip().lower() if isinstance(skip, str) else skip
    if text == "auto":
        return None
    if text in ("", "none"):
        return frozenset()
    try:
        layers = frozenset(int(part) for part in text.split(","))
    except (AttributeError, ValueError):
        raise ParameterError(f"decoder 'layer_skip' parameter 'skip' is {skip!r}; give comma-separated layer "
                             "indices ('2,4'), 'auto' or 'none'") from None
    if any(i < 1 for i in layers):
        raise ParameterError(f"decoder 'layer_skip' parameter 'skip' is {skip!r}; layer 0 always runs (the cache "
                             "counts positions there) and indices are not negative: skip layers from 1 up")
    return layers


def draft_session(decoder: LayerSkip, ctx):
    """The run's draft session: the target model over a full cache of its own, whose passes skip layers."""
    from workbench.run.session import Session

    session = ctx.state.get("draft_session")
    if session is None:
        model = ctx.session.model
        layers = decoder_layers(model.hf, model.num_layers)
        skipped = decoder.skipped_layers(len(layers))
        for index, layer in enumerate(layers):
            skippable(layer, index)
        session = ctx.state["draft_session"] = Session(model, "full", "sdpa")
        _SKIPPED[session.cache] = skipped
    return session


def decoder_layers(hf_model, num_layers: int) -> torch.nn.ModuleList:
    """The model's decoder layers (transformers' `get_decoder().layers`)."""
    layers = getattr(hf_model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != num_layers:
        raise WorkbenchError(f"decoder 'layer_skip' cannot find the {num_layers} decoder layers of "
                             f"{type(hf_model).__name__} (expected get_decoder().layers)")
    return layers


def skippable(layer: torch.nn.Module, index: int) -> None:
    """Wrap the layer's forward (once) so that a pass of a draft session skipping `index` returns its input."""
    if getattr(layer, _INDEX, None) == index:
        return
    setattr(layer, _INDEX, index)
    layer.forward = types.MethodType(_forward, layer)  # a bound method: copy.deepcopy rebinds it to the copy


def _forward(layer, *args, **kwargs):
    from workbench.run.bridge import PASS_KEYWORD

    bound = kwargs.get(PASS_KEYWORD)
    cache = bound.binding.cache if bound is not None else None
    if cache is not None and getattr(layer, _INDEX) in _SKIPPED.get(cache, ()):
        return args[0] if args else kwargs["hidden_states"]  # the residual stream, unchanged
    return type(layer).forward(layer, *args, **kwargs)
