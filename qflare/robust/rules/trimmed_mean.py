"""Coordinate-wise trimmed mean: drop the f largest and f smallest values per coordinate.

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018. Requirement: n > 2f. Same convention as ByzFL's TrMean(f); Flower's
aggregate_trimmed_avg(p) cuts int(p * n) per side.
"""

from __future__ import annotations

from .._base import register_rule
from .._core import FloatArray, Weights, sorted_rows
from ._fbase import FRule


@register_rule
class TrimmedMean(FRule):
    name = "trimmed_mean"
    coordinatewise = True

    def apply(self, x: FloatArray, w: Weights) -> FloatArray:
        n = x.shape[0]
        self.check_n(n)
        rows = x if self.f == 0 else sorted_rows(x)[self.f : n - self.f]
        # float32 accumulation over at most n rows; a float64 pass took 2-3x longer here.
        out: FloatArray = rows.mean(axis=0)
        return out
