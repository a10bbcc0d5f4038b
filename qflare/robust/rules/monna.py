"""MoNNA: mean of the n - f nearest neighbours of one trusted update.

Farhadkhani, Guerraoui, Gupta, Hoang, Pinot and Stephan, "Robust Collaborative Learning
with Linear Gradient Overhead", ICML 2023. Requirement: n > 2f and idx < n, the update at
``idx`` being trusted (a server-side or verified client update).
"""

from __future__ import annotations

import numpy as np

from .._base import GramView, RowPlan, register_rule
from .._core import (
    F64,
    BoolArray,
    FloatArray,
    RngLike,
    Weights,
    check_int,
    combine,
    finite_rows,
    require,
    row_norms,
)
from ._fbase import FRule


@register_rule
class MoNNA(FRule):
    name = "monna"
    weighted = True
    param_names = ("f", "idx")

    def __init__(self, f: int = 0, idx: int = 0) -> None:
        super().__init__(f)
        self.idx = check_int("idx", idx)

    def apply(self, x: FloatArray, w: Weights) -> FloatArray:
        n = x.shape[0]
        self.check_n(n)
        require(self.idx < n, self.name, f"needs idx < n, got idx={self.idx}, n={n}")
        anchor = x[self.idx]
        # Distances to one row: a direct pass in row blocks, no n x d difference array.
        step = max(1, n // 16)
        d2 = np.concatenate([row_norms(x[i : i + step] - anchor) for i in range(0, n, step)]) ** 2
        ok = finite_rows(x) if not np.all(np.isfinite(d2)) else np.ones(n, bool)
        return combine(x, self.coefficients(d2, ok, w))

    def plan(self, view: GramView, w: Weights, *, rng: RngLike = None) -> RowPlan:
        n = view.n
        self.check_n(n)
        require(self.idx < n, self.name, f"needs idx < n, got idx={self.idx}, n={n}")
        g = view.g
        with np.errstate(invalid="ignore"):
            d2 = np.maximum(np.diag(g) + g[self.idx, self.idx] - 2.0 * g[self.idx], 0.0)
        return RowPlan(self.coefficients(d2, view.finite, w)[None, :])

    def coefficients(self, d2: F64, ok: BoolArray, w: Weights) -> F64:
        """Weights [n] of the n - f rows nearest the trusted one (squared distances d2),
        among the usable rows ``ok``."""
        n = len(d2)
        require(bool(ok[self.idx]), self.name, f"the trusted update idx={self.idx} is non-finite")
        d2 = np.where(ok, np.nan_to_num(d2, nan=np.inf), np.inf)
        k = n - self.f
        require(
            int(ok.sum()) >= k,
            self.name,
            f"{n - int(ok.sum())} updates are non-finite but f={self.f}",
        )
        chosen = np.argsort(d2, kind="stable")[:k]
        coef: F64 = np.zeros(n)
        coef[chosen] = 1.0 if w is None else w[chosen]
        out: F64 = coef / coef.sum()
        return out
