"""Mean around median (Meamed).

Xie, Koyejo and Gupta, "Generalized Byzantine-tolerant SGD", arXiv:1802.10116, 2018.
Requirement: n > 2f. Per coordinate, the mean of the n - f values closest to the median
(ByzFL's Meamed). Those values form a contiguous window of the sorted column, so no
n x d array of absolute differences is built.
"""

from __future__ import annotations

from .._base import drop_nonfinite, register_rule
from .._core import closest_window_mean, median_from_sorted, sorted_rows
from ._fbase import FRule


@register_rule
class Meamed(FRule):
    name = "meamed"

    def aggregate(self, x, w, *, reference=None, rng=None):  # type: ignore[override]
        self.check_n(x.shape[0])
        x, _, f = drop_nonfinite(x, None, self.f, self.name)
        s = sorted_rows(x)
        return closest_window_mean(s, median_from_sorted(s), s.shape[0] - f)
