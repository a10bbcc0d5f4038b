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

from .._base import register_rule
from .._core import F64, FloatArray, Weights, gram, sq_dists_from_gram
from ._fbase import FRule, GramRule


def krum_scores(d2: F64, f: int) -> F64:
    """Sum of squared distances to the n - f - 1 nearest other rows."""
    n = d2.shape[0]
    k = n - f - 1
    if k <= 0:
        return np.zeros(n)
    out: F64 = np.sort(d2, axis=1)[:, 1 : k + 1].sum(axis=1)
    return out


def krum_setup(rule: FRule, x: FloatArray, w: Weights) -> tuple[FloatArray, Weights, int, F64]:
    """The finite rows, their weights, f less the rows dropped, and Krum scores."""
    x, w, f = rule.finite(x, w)
    return x, w, f, krum_scores(sq_dists_from_gram(gram(x)), f)


@register_rule
class Krum(GramRule):
    name = "krum"

    def coefficients(self, g: F64, w: Weights, f: int) -> F64:
        coef: F64 = np.zeros(g.shape[0])
        coef[int(np.argmin(krum_scores(sq_dists_from_gram(g), f)))] = 1.0
        return coef

    def apply(self, x: FloatArray, w: Weights) -> FloatArray:
        # The chosen row itself, not a GEMV over all rows that multiplies the rest by 0.
        x, _, _, scores = krum_setup(self, x, w)
        best: FloatArray = x[int(np.argmin(scores))]
        return best


@register_rule
class MultiKrum(GramRule):
    name = "multikrum"
    weighted = True

    def coefficients(self, g: F64, w: Weights, f: int) -> F64:
        n = g.shape[0]
        chosen = np.argsort(krum_scores(sq_dists_from_gram(g), f), kind="stable")[: n - f]
        coef: F64 = np.zeros(n)
        coef[chosen] = 1.0 if w is None else w[chosen]
        if coef.sum() == 0:
            coef[chosen] = 1.0
        out: F64 = coef / coef.sum()
        return out
