"""Coordinate-wise median.

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018. Requirement: n >= 1 (robust while fewer than half the updates are Byzantine).
Even n gives the mean of the two middle values, as np.median and ByzFL's Median (torch's
median would give the lower one). NaN sorts last, so up to floor((n-1)/2) non-finite
updates are tolerated like any other outlier.
"""

from __future__ import annotations

from .._base import Aggregator, register_rule
from .._core import FloatArray, Weights, median_from_sorted, sorted_rows


@register_rule
class Median(Aggregator):
    name = "median"
    coordinatewise = True

    def apply(self, x: FloatArray, w: Weights) -> FloatArray:
        return median_from_sorted(sorted_rows(x))
