"""Centered clipping.

Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust Optimization",
ICML 2021. Requirement: n >= 1; robustness needs a good reference point.

Stateless, unlike ByzFL's CenteredClipping (which keeps its last output in ``self.m``):
the reference is the ``reference=`` call argument (the previous round's aggregate or
momentum, which the caller stores), the origin when absent. Each of the L iterations
moves the centre by the (weighted) mean of the differences clipped to norm tau.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._base import Aggregator, drop_nonfinite, register_rule
from .._core import FloatArray, RngLike, Weights, check_float, check_int, combine, row_norms


@register_rule
class CenteredClipping(Aggregator):
    name = "cc"
    weighted = True

    def __init__(self, tau: float = 100.0, L: int = 1, f: int | None = None) -> None:
        self.tau = check_float("tau", tau)
        self.L = check_int("L", L)
        # f is accepted so that specs like cc(f=2,tau=1) read alike; CC itself needs none.
        self.f = None if f is None else check_int("f", f)

    def params(self) -> dict[str, Any]:
        return {"tau": self.tau, "L": self.L}

    def aggregate(
        self, x: FloatArray, w: Weights, *, reference: FloatArray | None = None, rng: RngLike = None
    ) -> FloatArray:
        x, w, _ = drop_nonfinite(x, w, x.shape[0] - 1 if self.f is None else self.f, self.name)
        n = x.shape[0]
        v = np.zeros(x.shape[1]) if reference is None else reference.astype(np.float64)
        base = np.full(n, 1.0 / n) if w is None else w / w.sum()
        step = max(1, n // 16)
        for _ in range(self.L):
            vf = v.astype(x.dtype)
            # Norms of x_i - v in row blocks: no n x d difference array.
            norms = np.concatenate([row_norms(x[i : i + step] - vf) for i in range(0, n, step)])
            with np.errstate(divide="ignore"):
                scale = np.minimum(1.0, self.tau / norms)
            coef = base * scale
            # mean_i s_i (x_i - v) = sum_i coef_i x_i - v sum_i coef_i
            v = v + combine(x, coef) - v * coef.sum()
        return v
