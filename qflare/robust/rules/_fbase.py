"""Rules parametrised by f, the number of Byzantine updates they tolerate (ByzFL's f)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from .._base import Aggregator, FParam, drop_nonfinite
from .._core import FloatArray, Weights, require


class FRule(FParam, Aggregator):
    def check_n(self, n: int) -> None:
        require(n > 2 * self.f, self.name, f"needs n > 2f, got n={n}, f={self.f}")

    def finite(self, x: FloatArray, w: Weights) -> tuple[FloatArray, Weights, int]:
        """Check n, then drop the non-finite rows; each one uses up one of the f."""
        self.check_n(x.shape[0])
        return drop_nonfinite(x, w, self.f, self.name)


class FiniteRule(FRule):
    """An unweighted rule run as ``on_finite(rows, f)`` on the finite rows, f lowered by
    the rows dropped: the rule's maths is a module-level function, the class only checks
    and registers it."""

    on_finite: ClassVar[Callable[[FloatArray, int], FloatArray]]

    def apply(self, x: FloatArray, w: Weights) -> FloatArray:
        rows, _, f = self.finite(x, None)
        return type(self).on_finite(rows, f)
