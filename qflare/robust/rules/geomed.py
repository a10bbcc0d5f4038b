"""Geometric median by smoothed Weiszfeld iterations (RFA).

Pillutla, Kakade and Harchaoui, "Robust Aggregation for Federated Learning", IEEE TSP
2022; Weiszfeld, Tohoku Math. J. 1937. Requirement: n >= 1 (breakdown point 1/2).
Convention as ByzFL's GeometricMedian(nu, T): start at the origin, rows with NaN/Inf left
out, T iterations with distances floored at nu. Every iterate after the first is an
affine combination of the rows, so the iterations run on the n x n Gram matrix and the
[d] result is formed once at the end.
"""

from __future__ import annotations

import numpy as np

from .._base import Aggregator, GramView, RowPlan, linear_plan, register_rule
from .._core import (
    F64,
    FloatArray,
    RngLike,
    Weights,
    centre_gram,
    check_float,
    check_int,
    combine,
    finite_rows,
    gram,
    require,
)


@register_rule
class GeometricMedian(Aggregator):
    name = "geomed"
    weighted = True
    param_names = ("nu", "T")

    def __init__(self, nu: float = 0.1, T: int = 3) -> None:
        self.nu = check_float("nu", nu, strict=True)
        self.T = check_int("T", T)

    def apply(self, x: FloatArray, w: Weights) -> FloatArray:
        mask = finite_rows(x)
        require(bool(mask.any()), self.name, f"all {x.shape[0]} updates are non-finite")
        if not mask.all():
            x = x[mask]
            w = None if w is None else w[mask]
        if self.T == 0:
            return np.zeros(x.shape[1])
        return combine(x, self.coefficients(gram(x), w))

    def plan(self, view: GramView, w: Weights, *, rng: RngLike = None) -> RowPlan:
        ok = view.finite
        require(bool(ok.any()), self.name, f"all {view.n} updates are non-finite")
        idx = np.flatnonzero(ok)
        if self.T == 0:
            return linear_plan(view.n, idx, np.zeros(len(idx)))
        return linear_plan(
            view.n, idx, self.coefficients(view.sub(idx), None if w is None else w[idx])
        )

    def coefficients(self, g_raw: F64, w: Weights) -> F64:
        """Weiszfeld's weights [n] of the (finite) rows after T >= 1 iterations."""
        n = g_raw.shape[0]
        alpha = np.full(n, 1.0 / n) if w is None else w / w.sum()
        g = centre_gram(g_raw)
        norms = np.sqrt(np.maximum(np.diag(g_raw), 0.0))  # first step starts at the origin
        beta = alpha / np.maximum(norms, self.nu)
        a: F64 = beta / beta.sum()
        diag = np.diag(g)
        for _ in range(self.T - 1):
            ga = g @ a
            dist = np.sqrt(np.maximum(diag - 2.0 * ga + a @ ga, 0.0))
            beta = alpha / np.maximum(dist, self.nu)
            a = beta / beta.sum()
        return a
