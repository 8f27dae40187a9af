"""The recorder's layer part: each forward pass's decoder layers (workbench.run.layers), turned into rows.

Per pass: every token's cosine similarity of each layer's input and output, and for the query that chooses the
step's token the logit lens at every layer (the layer's output through the model's final norm and LM head): its
top token and its KL from the last layer's, which is the model's own distribution.
"""

from __future__ import annotations

import numpy as np
import torch


class LayerRecords:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.calls: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}  # layer -> (similarity, lens, skipped)

    def observe(self, call) -> None:
        row = slice(-1, None) if call.phase in ("prefill", "append") else slice(0, 1)  # as the routing rows
        self.calls[call.layer] = (call.similarity(), torch.log_softmax(call.lens(row)[0], dim=-1), call.skipped)

    def end_forward(self) -> dict[str, np.ndarray] | None:
        """This pass's rows: layer_similarity (tokens, layer) and, for the chosen row, lens_token, lens_kl and
        layer_skipped (layer,); None when no layer was watched. Clears the pass."""
        if not self.calls:
            return None
        calls, self.calls = self.calls, {}
        tokens = next(iter(calls.values()))[0].shape[0]
        similarity = np.full((tokens, self.num_layers), np.nan, dtype=np.float32)
        token = np.full(self.num_layers, -1, dtype=np.int64)
        kl = np.full(self.num_layers, np.nan, dtype=np.float32)
        skipped = np.zeros(self.num_layers, dtype=np.int64)
        final = calls[max(calls)][1]  # the last layer's lens: the model's log-probabilities
        for layer, (cosine, lens, was_skipped) in calls.items():
            similarity[:, layer] = cosine.cpu().numpy()
            token[layer] = int(lens.argmax())
            kl[layer] = float((final.exp() * (final - lens)).sum())
            skipped[layer] = int(was_skipped)
        return {"layer_similarity": similarity, "lens_token": token, "lens_kl": kl, "layer_skipped": skipped}
