"""`layer_skip`: self-speculative decoding; the draft is the target model itself with some of its layers skipped.

No second model and no training. The draft runs the same weights with a set of decoder layers left out, either a
chosen set (`skip`, as in Draft & Verify and SWIFT) or every layer after the first E (`exit_layer`: the final norm
and the lm_head are applied to layer E's output, as in LayerSkip's early-exit draft). It drafts `k` tokens and
the full model checks them in one verify pass, with the acceptance rule every drafter shares (see
workbench.decode.speculative). The output is exactly greedy's tokens in greedy mode and follows `sample`'s
distribution otherwise, whatever layers the draft skipped.

How a layer is skipped. The draft has a Session of its own on the same model, with its own full cache, so the
target's cache never sees a draft token, and every pass of that session skips the chosen layers through the layer
bridge (workbench.run.layers, shared with the `layer_skip` router): a skipped decoder layer returns its input
hidden states unchanged, on the same weights, while the target's session and any other forward run every layer.
Skipped layers never call their attention, so their slots of the draft cache stay empty.

Layer 0 always runs: the cache counts positions, and transformers sizes its masks, at the first layer.

The default `skip="auto"` leaves out every other layer of the second half, the last layer kept (layers L/2,
L/2+2, ... < L-1: 7 of SmolLM2-135M's 30 layers, layer 2 of a 4-layer model, none of a 2-layer model). It is
this module's training-free starting point, not a set from a paper: SWIFT (Xia et al., Fig. 2a) finds that
uniformly skipping intermediate layers already drafts well, and layer-dropping studies agree that the first
layers (and the last, which shapes the logits) matter most. Both papers tune the set per model or task
(Bayesian optimisation: offline in Draft & Verify, on the fly in SWIFT); `skip="2,4,6"` sets it by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.decode.speculative import ModelDrafting
from workbench.errors import ParameterError
from workbench.registry import param
from workbench.run.layers import decoder_layers


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
        skipped = decoder.skipped_layers(len(decoder_layers(model.hf, model.num_layers)))
        session = ctx.state["draft_session"] = Session(model, "full", "sdpa")
        session.skip_layers = skipped
    return session
