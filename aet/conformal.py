"""Conformal p-values and thresholds of a novelty score, from held-out calibration scores.

A row's p-value is the fraction of calibration scores at least as large as its own, with the
(n + 1) correction: ``p = (1 + #{calibration >= s}) / (n + 1)``. When the calibration rows and a
new normal row are exchangeable, ``P(p <= alpha) <= alpha`` for every alpha: flagging rows
with ``p <= alpha`` flags at most a fraction alpha of normal rows, whatever the score's units.
"""

from __future__ import annotations

import math

import numpy as np

P_VALUE_NAME = "p_value"  # the output a client asks for beside `reconstruction_error`


def p_values(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(N,) float32 conformal p-values of `scores` (higher score: more unusual) against the
    sorted calibration scores `calibration` (n,)."""
    n = len(calibration)
    at_least = n - np.searchsorted(calibration, np.asarray(scores, np.float64), side="left")
    return ((1.0 + at_least) / (n + 1.0)).astype(np.float32)


def threshold(
    calibration: np.ndarray, alpha: float | None = None, contamination: float | None = None
) -> float:
    """The score above which a row is novel.

    With `alpha`: exactly the rows with conformal p-value <= alpha (+inf when alpha is below
    1 / (n + 1): no row can be flagged). With `contamination`: the calibration scores'
    (1 - contamination) quantile, so that fraction of the calibration rows lies above it.
    """
    if (alpha is None) == (contamination is None):
        raise ValueError("give exactly one of alpha or contamination")
    if alpha is not None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha: expected a level in (0, 1); got {alpha}")
        n = len(calibration)
        allowed = math.floor(alpha * (n + 1) + 1e-9) - 1  # most calibration scores >= s
        if allowed < 0:
            return math.inf
        return float(calibration[n - 1 - min(allowed, n - 1)])
    assert contamination is not None
    if not 0 < contamination <= 0.5:
        raise ValueError(f"contamination: expected a fraction in (0, 0.5]; got {contamination}")
    return float(np.quantile(calibration, 1.0 - contamination))
