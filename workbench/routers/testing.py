"""Synthetic routing traces for tests and examples of the expert-cache simulator and the consistency metrics."""

from __future__ import annotations

import numpy as np


def synthetic_trace(seed: int, tokens: int, layers: int, k: int, experts: int, holes: float = 0.0,
                    locality: float = 0.5) -> np.ndarray:
    """(tokens, layers, k) expert ids: each token-layer repeats the previous token's experts with probability
    `locality`, else draws k distinct experts uniformly; a share `holes` of the entries is -1 (missing)."""
    rng = np.random.default_rng(seed)
    trace = np.zeros((tokens, layers, k), np.int64)
    for layer in range(layers):
        current = rng.choice(experts, k, replace=False)
        for t in range(tokens):
            if rng.random() > locality:
                current = rng.choice(experts, k, replace=False)
            trace[t, layer] = current
    trace[rng.random(trace.shape) < holes] = -1
    return trace
