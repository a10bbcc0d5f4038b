"""Mean around median (Meamed).

Xie, Koyejo and Gupta, "Generalized Byzantine-tolerant SGD", arXiv:1802.10116, 2018.
Requirement: n > 2f. Per coordinate, the mean of the n - f values closest to the median
(ByzFL's Meamed); ties in distance go to the smaller value. Those values form a
contiguous window of the sorted column, so no n x d array of absolute differences is
built.
"""

from __future__ import annotations

from .._base import register_rule
from .._core import FloatArray, closest_window_mean, median_from_sorted, sorted_rows
from ._fbase import FiniteRule


def meamed(x: FloatArray, f: int) -> FloatArray:
    """Meamed of finite rows x."""
    s = sorted_rows(x)
    return closest_window_mean(s, median_from_sorted(s), s.shape[0] - f)


@register_rule
class Meamed(FiniteRule):
    name = "meamed"
    on_finite = meamed
    coordinatewise = True
