"""Centered clipping.

Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust Optimization",
ICML 2021. Requirement: n >= 1; robustness needs a good reference point.

Stateless, unlike ByzFL's CenteredClipping (which keeps its last output in ``self.m``):
the reference is the ``reference=`` call argument (the previous round's aggregate or
momentum, which the caller stores), the origin when absent. Each of the L iterations
moves the centre by the (weighted) mean of the differences clipped to norm tau.
"""

from __future__ import annotations

import numpy as np

from .._base import Aggregator, GramView, RowPlan, drop_nonfinite, lowered_f, register_rule
from .._core import F64, FloatArray, RngLike, Weights, check_float, check_int, combine, row_norms


def clipped_step(norms: F64, base: F64, tau: float) -> F64:
    """Coefficients c of one iteration's move sum_i c_i (x_i - v): each difference
    x_i - v (norm ``norms[i]``) clipped to tau and weighted by ``base[i]``."""
    with np.errstate(divide="ignore"):
        scale = np.minimum(1.0, tau / norms)
    out: F64 = base * scale
    return out


@register_rule
class CenteredClipping(Aggregator):
    name = "cc"
    weighted = True
    param_names = ("tau", "L")

    def __init__(self, tau: float = 100.0, L: int = 1, f: int | None = None) -> None:
        self.tau = check_float("tau", tau)
        self.L = check_int("L", L)
        # f is accepted so that specs like cc(f=2,tau=1) read alike; CC itself needs none.
        self.f = None if f is None else check_int("f", f)

    def tolerated(self, n: int) -> int:
        return n - 1 if self.f is None else self.f

    def aggregate(
        self, x: FloatArray, w: Weights, *, reference: FloatArray | None = None, rng: RngLike = None
    ) -> FloatArray:
        x, w, _ = drop_nonfinite(x, w, self.tolerated(x.shape[0]), self.name)
        n = x.shape[0]
        v = np.zeros(x.shape[1]) if reference is None else reference.astype(np.float64)
        base = np.full(n, 1.0 / n) if w is None else w / w.sum()
        step = max(1, n // 16)
        for _ in range(self.L):
            vf = v.astype(x.dtype)
            # Norms of x_i - v in row blocks: no n x d difference array.
            norms = np.concatenate([row_norms(x[i : i + step] - vf) for i in range(0, n, step)])
            coef = clipped_step(norms, base, self.tau)
            # mean_i s_i (x_i - v) = sum_i coef_i x_i - v sum_i coef_i
            v = v + combine(x, coef) - v * coef.sum()
        return v

    def plan(self, view: GramView, w: Weights, *, rng: RngLike = None) -> RowPlan:
        """The iterations on coefficients: v = sum_i a_i x_i + a_ref reference, its
        distances to the rows from the Gram matrix of the rows and the reference."""
        lowered_f(view.finite, self.tolerated(view.n), self.name)
        idx = np.flatnonzero(view.finite)
        n = len(idx)
        w = None if w is None else w[idx]
        base = np.full(n, 1.0 / n) if w is None else w / w.sum()
        # Gram matrix of the kept rows and the reference (row n; zero when there is none).
        g = np.zeros((n + 1, n + 1))
        keep = np.concatenate([idx, [view.n]]) if view.has_ref else idx
        g[: len(keep), : len(keep)] = view.aug[np.ix_(keep, keep)]
        a: F64 = np.zeros(n + 1)
        a[n] = 1.0
        diag = np.diag(g)
        for _ in range(self.L):
            ga = g @ a
            norms = np.sqrt(np.maximum(diag[:n] - 2.0 * ga[:n] + a @ ga, 0.0))
            coef = clipped_step(norms, base, self.tau)
            a = a * (1.0 - coef.sum())
            a[:n] += coef
        out: F64 = np.zeros((1, view.n))
        out[0, idx] = a[:n]
        return RowPlan(out, None, np.array([a[n]]) if view.has_ref else None)
