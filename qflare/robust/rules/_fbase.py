"""Rules parametrised by f, the number of Byzantine updates they tolerate (ByzFL's f)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np

from .._base import (
    Aggregator,
    FParam,
    GramView,
    RowPlan,
    drop_nonfinite,
    linear_plan,
    lowered_f,
    rows_plan,
)
from .._core import F64, FloatArray, IntArray, RngLike, Weights, combine, gram, require


class FRule(FParam, Aggregator):
    def check_n(self, n: int) -> None:
        require(n > 2 * self.f, self.name, f"needs n > 2f, got n={n}, f={self.f}")

    def finite(self, x: FloatArray, w: Weights) -> tuple[FloatArray, Weights, int]:
        """Check n, then drop the non-finite rows; each one uses up one of the f."""
        self.check_n(x.shape[0])
        return drop_nonfinite(x, w, self.f, self.name)

    def finite_view(self, view: GramView, w: Weights) -> tuple[IntArray, Weights, int]:
        """``finite`` for rows known by their Gram matrix: the indices of the rows kept,
        their weights and f less the rows dropped."""
        self.check_n(view.n)
        f = lowered_f(view.finite, self.f, self.name)
        idx = np.flatnonzero(view.finite)
        return idx, (None if w is None else w[idx]), f


class GramRule(FRule):
    """A rule whose result is a combination of the finite rows with coefficients that
    depend on their Gram matrix alone: ``coefficients`` is the rule's maths, run on
    ``gram(x)`` in memory and on the block-accumulated Gram matrix by ``plan``."""

    def coefficients(self, g: F64, w: Weights, f: int) -> F64:
        """Coefficients [n] of the result over rows with Gram matrix g (all finite)."""
        raise NotImplementedError

    def apply(self, x: FloatArray, w: Weights) -> FloatArray:
        x, w, f = self.finite(x, w)
        return combine(x, self.coefficients(gram(x), w, f))

    def plan(self, view: GramView, w: Weights, *, rng: RngLike = None) -> RowPlan:
        idx, w, f = self.finite_view(view, w)
        return linear_plan(view.n, idx, self.coefficients(view.sub(idx), w, f))


class FiniteRule(FRule):
    """An unweighted rule run as ``on_finite(rows, f)`` on the finite rows, f lowered by
    the rows dropped: the rule's maths is a module-level function, the class only checks
    and registers it. With ``coordinatewise`` set, ``on_finite`` works column by column
    and runs on column blocks of the finite rows as it is."""

    on_finite: ClassVar[Callable[[FloatArray, int], FloatArray]]

    def apply(self, x: FloatArray, w: Weights) -> FloatArray:
        rows, _, f = self.finite(x, None)
        return type(self).on_finite(rows, f)

    def plan(self, view: GramView, w: Weights, *, rng: RngLike = None) -> RowPlan:
        if not type(self).coordinatewise:
            return super().plan(view, w, rng=rng)
        idx, _, f = self.finite_view(view, None)
        on_finite = type(self).on_finite
        return rows_plan(view.n, idx, lambda xb: on_finite(xb, f))
