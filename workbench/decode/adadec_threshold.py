"""AdaDec's entropy threshold: where a logistic regression of "the reference token ranks first" on entropy crosses a
probability cutoff.

AdaDec (He et al., arXiv 2506.08980) teacher-forces reference solutions through the model and records, for each
reference token, the entropy H of the model's next-token distribution and whether the reference token is its argmax.
A logistic regression P(first | H) = sigmoid(a + w H) is fitted on class-balanced data; the threshold is the entropy
at which the fitted probability equals a cutoff:

    tau = (logit(cutoff) - a) / w

Departures from the authors' code (src/learn_threshold/logistic_regression.py): the classes are balanced by weights
(each class weighs half the total, sklearn's class_weight="balanced") rather than by randomly down-sampling the
larger class, the fit is unregularised Newton-Raphson (sklearn's default adds an L2 penalty, C=1), and the cutoff
defaults to 0.5, the balanced classifier's decision boundary; the authors' code instead picks the cutoff in
0.01..0.99 that maximises accuracy on a held-out 20% split (`accuracy_cutoff` here; bench/adadec_threshold.py
prints both).
"""

from __future__ import annotations

import math

import numpy as np

from workbench.errors import ParameterError, WorkbenchError


def fit_logistic(x, y, balance: bool = True, iterations: int = 100) -> tuple[float, float]:
    """(intercept a, slope w) of P(y = 1 | x) = sigmoid(a + w x), by weighted Newton-Raphson in float64.

    balance -- weigh each class by n / (2 n_class), so both classes count equally (the authors balance by
               down-sampling)."""
    x, y = _check_data(x, y)
    mean, scale = x.mean(), x.std() or 1.0  # fit on standardised x: Newton is better conditioned there
    design = np.stack([np.ones_like(x), (x - mean) / scale], axis=1)
    weights = np.ones_like(x)
    if balance:
        positives = y.sum()
        weights = np.where(y == 1, len(y) / (2 * positives), len(y) / (2 * (len(y) - positives)))
    beta = np.zeros(2)
    ridge = np.diag([0.0, 1e-9 * weights.sum()])  # keeps a perfectly separable set finite; negligible otherwise
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(design @ beta)))
        gradient = design.T @ (weights * (y - p)) - ridge @ beta
        hessian = design.T @ (design * (weights * p * (1 - p))[:, None]) + ridge
        step = np.linalg.solve(hessian, gradient)
        beta += step
        if np.abs(step).max() < 1e-12:
            break
    slope = beta[1] / scale
    return float(beta[0] - slope * mean), float(slope)


def learn_threshold(entropies, ranked_first, *, cutoff: float = 0.5, balance: bool = True) -> float:
    """The entropy (nats) at which the fitted P(reference token ranks first | entropy) equals `cutoff`.

    entropies    -- next-token entropies, one per reference token
    ranked_first -- for each, whether the reference token was the model's argmax (bools or 0/1)
    cutoff       -- the probability the threshold sits at (0.5: the balanced classifier's decision boundary)
    balance      -- fit on class-balanced weights, as AdaDec does"""
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0 < cutoff < 1:
        raise ParameterError(f"learn_threshold cutoff must be a probability strictly between 0 and 1, got {cutoff!r}")
    intercept, slope = fit_logistic(entropies, ranked_first, balance=balance)
    if not slope < 0:
        raise WorkbenchError(f"entropy does not predict a first-ranked reference token here (fitted slope {slope:.4g} "
                             ">= 0): higher entropy must make it less likely; use more (or other) reference text")
    return (math.log(cutoff / (1 - cutoff)) - intercept) / slope


def accuracy_cutoff(probabilities, ranked_first) -> tuple[float, float]:
    """(cutoff, accuracy): the cutoff in 0.01, 0.02, ..., 0.99 whose rule "first if p >= cutoff" is most accurate
    (the first such on ties), as the authors' code picks it on its held-out split."""
    p, y = np.asarray(probabilities, dtype=np.float64), np.asarray(ranked_first).astype(bool)
    cutoffs = np.round(np.arange(1, 100) / 100, 2)
    accuracy = np.array([((p >= c) == y).mean() for c in cutoffs])
    best = int(accuracy.argmax())
    return float(cutoffs[best]), float(accuracy[best])


def _check_data(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x):
        raise ParameterError(f"learn_threshold needs one ranked_first flag per entropy; got {len(x)} entropies and "
                             f"ranked_first of shape {tuple(y.shape)}")
    if not np.isfinite(x).all():
        raise ParameterError("learn_threshold needs finite entropies; drop the NaN / inf ones first")
    if not np.isin(y, (0, 1)).all():
        raise ParameterError("learn_threshold's ranked_first must be booleans or 0 / 1")
    y = y.astype(np.float64)
    if len(y) < 2 or y.min() == y.max():
        raise ParameterError("learn_threshold needs tokens of both kinds: some whose reference token ranked first "
                             "and some whose did not")
    return x, y
