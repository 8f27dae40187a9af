"""Expert prediction: guess the experts a token will use at a layer before that layer runs (so an offloading
system can prefetch them), and score the guesses.

Every predictor returns an array shaped like the events it predicts (tokens, layers, m), -1 where it makes no
guess; `precision_recall` scores it per layer against the experts actually used (workbench.routers.events).

    fate(trace)                           Fate: layer l's router input through layer l+1's router (recorded live)
    transition(events, calibration, k)    ExFlow's inter-layer affinity P(expert at l+1 | experts at l)
    previous_token(events)                the same experts as the token before (temporal locality)
    frequency(events, calibration, k)     each layer's most used experts
"""

from __future__ import annotations

import numpy as np

from workbench.routers.events import moe_layers, routing_events


def fate(trace, prompt: bool = True) -> np.ndarray:
    """Fate (Fang et al., 2025, "Accurate Expert Predictions in MoE Inference via Cross-Layer Gate"): the
    previous MoE layer's router input, fed to this layer's router, predicts this layer's top-k. Recorded live
    with record="routing" (`fate_expert_ids`), since it needs hidden states a trace does not keep."""
    return routing_events(trace, "fate_expert_ids", prompt)


def previous_token(events: np.ndarray) -> np.ndarray:
    """Each token is predicted to use the experts the token before it used at the same layer."""
    predicted = np.full_like(events, -1)
    predicted[1:] = events[:-1]
    return predicted


def frequency(events: np.ndarray, calibration: np.ndarray | None = None, k: int | None = None) -> np.ndarray:
    """Each layer's k most used experts: counted on `calibration` when given (one fixed guess per layer), or
    online, over the tokens before each one."""
    k = k or events.shape[-1]
    experts = int(max(events.max(), -1 if calibration is None else calibration.max())) + 1
    predicted = np.full((*events.shape[:2], k), -1, dtype=np.int64)
    for layer in moe_layers(events):
        if calibration is not None:
            predicted[:, layer] = _top(_counts(calibration[:, layer], experts), k)
            continue
        counts = np.zeros(experts)
        for t, row in enumerate(events[:, layer]):
            if counts.any():
                predicted[t, layer] = _top(counts, k)
            counts += _counts(row[None], experts)
    return predicted


def transition(events: np.ndarray, calibration: np.ndarray, k: int | None = None) -> np.ndarray:
    """ExFlow (Yao et al., 2024, "Exploiting Inter-Layer Expert Affinity for Accelerating MoE Inference"): the
    conditional routing probabilities between consecutive MoE layers, P(e' at l+1 | e at l), counted on a
    calibration trace; a token's guess at l+1 is the k experts with the largest summed probability given the
    experts it used at l. ExFlow uses the affinity to place experts across GPUs; here it predicts."""
    k = k or events.shape[-1]
    experts = int(max(events.max(), calibration.max())) + 1
    layers = moe_layers(calibration)
    predicted = np.full((*events.shape[:2], k), -1, dtype=np.int64)
    for layer, following in zip(layers, layers[1:]):
        affinity = np.zeros((experts, experts))
        for before, after in zip(calibration[:, layer], calibration[:, following]):
            affinity[np.ix_(before[before >= 0], after[after >= 0])] += 1
        affinity /= np.maximum(affinity.sum(1, keepdims=True), 1)
        for t, before in enumerate(events[:, layer]):
            used = before[before >= 0]
            if len(used):
                predicted[t, following] = _top(affinity[used].sum(0), k)
    return predicted


def precision_recall(predicted: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: precision (share of guessed experts that were used) and recall (share of used experts that
    were guessed), pooled over the tokens with a guess; NaN for layers without guesses or experts."""
    layers = actual.shape[1]
    precision, recall = np.full(layers, np.nan), np.full(layers, np.nan)
    for layer in range(layers):
        right = guessed = used = 0
        for guess, truth in zip(predicted[:, layer], actual[:, layer]):
            guess, truth = set(guess[guess >= 0].tolist()), set(truth[truth >= 0].tolist())
            if not guess:
                continue
            right += len(guess & truth)
            guessed += len(guess)
            used += len(truth)
        if guessed:
            precision[layer] = right / guessed
        if used:
            recall[layer] = right / used
    return precision, recall


def _counts(rows: np.ndarray, experts: int) -> np.ndarray:
    return np.bincount(rows[rows >= 0].ravel(), minlength=experts).astype(float)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """The k highest-scoring ids, ties to the lower id (stable)."""
    return np.argsort(-scores, kind="stable")[:k]
