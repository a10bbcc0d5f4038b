"""Krum and Multi-Krum.

Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017. Requirement: n > 2f (ByzFL's check; the paper asks n > 2f + 2).
Convention as ByzFL: an update's score sums its squared distances to its n - f - 1
nearest other updates; Krum returns the lowest-scored update, Multi-Krum the mean of the
n - f lowest. Flower's aggregate_krum(num_malicious=m) uses n - m - 2 neighbours, so our
Krum(f) picks what Flower picks with m = f - 1.
"""

from __future__ import annotations

import numpy as np

from .._base import drop_nonfinite, register_rule
from .._core import combine, finite_rows, gram, sq_dists_from_gram
from ._fbase import FRule


def krum_scores(d2: np.ndarray, f: int) -> np.ndarray:
    """Sum of squared distances to the n - f - 1 nearest other rows."""
    n = d2.shape[0]
    k = n - f - 1
    if k <= 0:
        return np.zeros(n)
    s = np.sort(d2, axis=1)[:, 1 : k + 1]
    return s.sum(axis=1)


def gram_finite(x: np.ndarray, w: np.ndarray | None, f: int, rule: str):
    """Gram matrix of x; non-finite rows are dropped (each counts against f) first."""
    g = gram(x)
    if np.all(np.isfinite(g)):
        return x, w, f, g, None
    mask = finite_rows(x)
    x2, w2, f2 = drop_nonfinite(x, w, f, rule, mask)
    return x2, w2, f2, gram(x2), mask


@register_rule
class Krum(FRule):
    name = "krum"

    def aggregate(self, x, w, *, reference=None, rng=None):  # type: ignore[override]
        self.check_n(x.shape[0])
        x, w, f, g, _ = gram_finite(x, w, self.f, self.name)
        scores = krum_scores(sq_dists_from_gram(g), f)
        return x[int(np.argmin(scores))].astype(np.float64)


@register_rule
class MultiKrum(FRule):
    name = "multikrum"
    weighted = True

    def aggregate(self, x, w, *, reference=None, rng=None):  # type: ignore[override]
        self.check_n(x.shape[0])
        x, w, f, g, _ = gram_finite(x, w, self.f, self.name)
        n = x.shape[0]
        scores = krum_scores(sq_dists_from_gram(g), f)
        chosen = np.argsort(scores, kind="stable")[: n - f]
        coef = np.zeros(n)
        coef[chosen] = 1.0 if w is None else w[chosen]
        if coef.sum() == 0:
            coef[chosen] = 1.0
        return combine(x, coef / coef.sum())
