"""Early-exit analysis of a trace (record="layers"): at which layer the model already knows its next token.

Per decoder layer, over the run's steps: `agreement`, the share of steps whose logit-lens top token at that layer
(the layer's output through the final norm and LM head, nostalgebraist's "logit lens") is already the model's
own top token; `kl`, the mean KL(model || lens) in nats; `similarity`, the mean cosine of the layer's input and
output (ShortGPT's Block Influence is 1 minus it); `skipped`, the share of steps whose pass skipped the layer.
An early-exit decoder (CE-CoLLM, LayerSkip) could stop at the first layer whose agreement is high enough; the
agreement says how often it would have been right.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from workbench.errors import ParameterError
from workbench.routers.events import sequence_values


def early_exit(trace) -> pd.DataFrame:
    """One row per decoder layer: agreement, kl, similarity, skipped (see the module docstring)."""
    if "lens_token" not in trace:
        raise ParameterError("the trace has no 'lens_token': run with record='layers'")
    tokens = sequence_values(trace, "lens_token")  # (step, layer); -1 for the later tokens of a multi-token step
    chosen = tokens[:, -1]
    valid = chosen >= 0
    if not valid.any():
        raise ParameterError("the trace's 'layers' records are empty (no step was recorded)")
    tokens, kl = tokens[valid], sequence_values(trace, "lens_kl")[valid]
    skipped = sequence_values(trace, "layer_skipped")[valid]
    return pd.DataFrame({
        "layer": np.arange(tokens.shape[1]),
        "agreement": (tokens == tokens[:, -1:]).mean(0),
        "kl": kl.mean(0),
        "similarity": np.nanmean(sequence_values(trace, "layer_similarity")[valid], axis=0),
        "skipped": (skipped == 1).mean(0),
    })


def first_confident_layer(trace, agreement: float = 0.9) -> int | None:
    """The first layer whose logit lens agrees with the model's top token on at least `agreement` of the steps
    (None: no layer before the last does)."""
    table = early_exit(trace)
    hits = table.index[table["agreement"] >= agreement]
    return int(hits[0]) if len(hits) else None
