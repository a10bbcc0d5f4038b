"""Covariance-bound agnostic filter (CAF).

Allouah, Guerraoui and Stephan, "Towards Trustworthy Federated Learning with Untrusted
Participants", ICML 2025. Requirement: n > 2f.
Soft weights c (all 1 at first) are lowered, while sum(c) > n - 2f, in proportion to
each update's squared projection on the top eigenvector of the c-weighted covariance;
the weighted mean with the smallest top eigenvalue seen is returned. The eigenpair is
exact, computed on the n x n Gram matrix, and tau_max is taken over the updates with
positive weight (see the loop) (the top eigenvector lies in the span of the
centred updates); ByzFL uses one power iteration from a random start, so the two agree
exactly only where that estimate is exact (d = 1).
"""

from __future__ import annotations

import numpy as np

from .._base import register_rule
from .._core import F64, FloatArray, Weights, centre_gram, combine, gram
from ._fbase import GramRule


def caf(x: FloatArray, f: int, tau_over: str = "weighted") -> F64:
    """CAF on finite rows; ``tau_over="all"`` reproduces ByzFL's tau_max (tests only)."""
    return combine(x, caf_coefficients(gram(x), f, tau_over))


def caf_coefficients(g_raw: F64, f: int, tau_over: str = "weighted") -> F64:
    """CAF's weights [n] of the rows, from their raw Gram matrix."""
    n = g_raw.shape[0]
    g = centre_gram(g_raw)
    c: F64 = np.ones(n)
    best_a: F64 = c / n
    best_val = np.inf
    while c.sum() > n - 2 * f:
        a = c / c.sum()
        ga = g @ a
        # Gram of the differences x_i - mu_c.
        gd = g - ga[:, None] - ga[None, :] + a @ ga
        s = np.sqrt(c)
        vals, vecs = np.linalg.eigh(s[:, None] * gd * s[None, :] / c.sum())
        lam, u = vals[-1], vecs[:, -1]
        if lam < best_val:
            best_val, best_a = lam, a
        if lam <= 0:
            break
        proj = gd @ (s * u)
        tau = proj * proj
        # Max over the updates still weighted: each pass zeroes at least one weight, so
        # the loop ends within n passes. ByzFL takes it over all updates; once a far
        # outlier is zeroed its tau dwarfs the rest and the weights barely move.
        tau_max = tau.max() if tau_over == "all" else tau[c > 0].max()
        if tau_max <= 0:
            break
        c = np.maximum(c * (1.0 - tau / tau_max), 0.0)
    return best_a


@register_rule
class CAF(GramRule):
    name = "caf"

    def coefficients(self, g: F64, w: Weights, f: int) -> F64:
        return caf_coefficients(g, f)
