"""The layer bridge: decoder layers a session's pass skips, and watchers of each layer's input and output.

A pass's `ForwardPass.skipped_layers` names decoder layers that return their input unchanged (in transformers 5 a
decoder layer takes and returns the residual stream, so the identity is the natural "no layer"); a BoundPass's
`watch(layer, hidden_in, hidden_out, skipped)` is called with each layer's input and output (the session
makes a `LayerCall` of them). Two users share it: layer_skip's draft
session (self-speculative decoding, workbench.decode.layer_skip) and the `layer_skip` router, which measures the
layers at the prefill and skips the most redundant ones while decoding; the recorder watches for the logit lens.

How. Each decoder layer's `forward` is wrapped once per model (on the instance: the weights are shared, nothing
is copied), the first time a pass needs it. The wrapper reads the workbench pass that every forward of a session
carries in its keyword arguments (workbench.run.bridge: transformers hands them to every decoder layer). Every
other forward runs the layer's own code: another session, a direct call of the model, also from another thread at
the same time (nothing global changes, unlike swapping `model.model.layers`). A skipped layer never calls its
attention, so its cache slots get no new tokens: a layer skipped from some point on holds only what came before.

Layer 0 always runs: the cache counts positions, and transformers sizes its masks, at the first layer.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError

_INDEX = "_workbench_layer_index"  # set on a decoder layer once its forward is wrapped


@dataclass
class LayerCall:
    """One decoder layer's work in a pass: its input and output residual streams (n, hidden), and the model."""

    layer: int
    phase: str
    hidden_in: torch.Tensor
    hidden_out: torch.Tensor
    hf_model: torch.nn.Module
    skipped: bool = False  # the pass skipped this layer (hidden_out is hidden_in)

    def similarity(self) -> torch.Tensor:
        """Cosine similarity of each token's input and output (n,) float32: ShortGPT's Block Influence is 1 minus
        its mean."""
        return torch.nn.functional.cosine_similarity(self.hidden_in.float(), self.hidden_out.float(), dim=-1)

    def lens(self, rows: torch.Tensor | slice | int = slice(None)) -> torch.Tensor:
        """The logit lens: these rows of the layer's output through the model's final norm and LM head,
        float32 (rows, vocab); the last layer's lens is exactly the model's logits."""
        norm, head = final_norm_and_head(self.hf_model)
        return head(norm(self.hidden_out[rows])).float()


def decoder_layers(hf_model, num_layers: int | None = None) -> torch.nn.ModuleList:
    """The model's decoder layers (transformers' `get_decoder().layers`)."""
    layers = getattr(hf_model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or (num_layers is not None and len(layers) != num_layers):
        raise WorkbenchError(f"cannot find the decoder layers of {type(hf_model).__name__} (expected "
                             "get_decoder().layers): layers cannot be skipped or watched")
    return layers


def final_norm_and_head(hf_model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The final norm and LM head that turn the last layer's output into logits (Llama-style `norm`)."""
    norm = getattr(hf_model.get_decoder(), "norm", None)
    head = hf_model.get_output_embeddings()
    if norm is None or head is None:
        raise WorkbenchError(f"{type(hf_model).__name__} has no final `norm` on its decoder or no output embeddings: "
                             "the logit lens needs both")
    return norm, head


def wrap(hf_model) -> None:
    """Wrap every decoder layer's forward (once per model) so passes can skip and watch layers."""
    for index, layer in enumerate(decoder_layers(hf_model)):
        if getattr(layer, _INDEX, None) != index:
            setattr(layer, _INDEX, index)
            layer.forward = types.MethodType(_forward, layer)  # a bound method: copy.deepcopy rebinds it


def _forward(layer, *args, **kwargs):
    from workbench.run.bridge import PASS_KEYWORD

    bound = kwargs.get(PASS_KEYWORD)
    if bound is None:
        return type(layer).forward(layer, *args, **kwargs)
    index = getattr(layer, _INDEX)
    hidden = args[0] if args else kwargs["hidden_states"]
    skipped = index in bound.forward.skipped_layers
    output = hidden if skipped else type(layer).forward(layer, *args, **kwargs)
    if bound.watch is not None:
        out = output[0] if isinstance(output, tuple) else output
        bound.watch(index, hidden[0], out[0], skipped)
    return output
