"""Bulyan.

El Mhamdi, Guerraoui and Rouault, "The Hidden Vulnerability of Distributed Learning in
Byzantium", ICML 2018. Requirement: n >= 4f + 3.
theta = n - 2f updates are picked one at a time by Krum over those not yet picked (Krum
scores in ByzFL's convention: n' - f - 1 neighbours among the n' left); then per
coordinate the beta = theta - 2f values closest to the median of the picked ones are
averaged. ByzFL has no Bulyan; Flower's aggregate_bulyan scores Krum with n' - f - 2
neighbours (``bulyan(x, f, neighbour_offset=2)`` reproduces it).
"""

from __future__ import annotations

import numpy as np

from .._base import GramView, RowPlan, register_rule, rows_plan
from .._core import (
    F64,
    FloatArray,
    IntArray,
    RngLike,
    Weights,
    closest_window_mean,
    median_from_sorted,
    pairwise_sq_dists,
    require,
    sq_dists_from_gram,
)
from ._fbase import FiniteRule


def require_n(n: int, f: int) -> None:
    require(n >= 4 * f + 3, "bulyan", f"needs n >= 4f + 3, got n={n}, f={f} (4f + 3 = {4 * f + 3})")


def bulyan_select(d2: F64, f: int, theta: int, neighbour_offset: int = 1) -> list[int]:
    """Indices picked by repeated Krum over the remaining rows."""
    left = list(range(d2.shape[0]))
    picked: list[int] = []
    for _ in range(theta):
        sub = d2[np.ix_(left, left)]
        k = max(1, len(left) - f - neighbour_offset)
        scores = np.sort(sub, axis=1)[:, 1 : k + 1].sum(axis=1)
        best = left[int(np.argmin(scores))]
        picked.append(best)
        left.remove(best)
    return picked


def bulyan(x: FloatArray, f: int, neighbour_offset: int = 1) -> FloatArray:
    """Bulyan of finite rows x."""
    picked, beta = bulyan_picks(pairwise_sq_dists(x), f, neighbour_offset)
    return bulyan_coordinates(x[picked], beta)


def bulyan_picks(d2: F64, f: int, neighbour_offset: int = 1) -> tuple[IntArray, int]:
    """The rows the first phase picks (in index order) from the squared distances of
    finite rows, and beta, how many values per coordinate the second phase averages."""
    n = d2.shape[0]
    require_n(n, f)
    theta = n - 2 * f
    picked = np.sort(bulyan_select(d2, f, theta, neighbour_offset))
    return picked, theta - 2 * f


def bulyan_coordinates(picked: FloatArray, beta: int) -> FloatArray:
    """Bulyan's second phase on the picked rows (a gathered copy, sorted in place: one
    copy, not two): per coordinate, the mean of the beta values nearest their median."""
    picked.sort(axis=0)
    return closest_window_mean(picked, median_from_sorted(picked), beta)


@register_rule
class Bulyan(FiniteRule):
    name = "bulyan"
    on_finite = bulyan

    def check_n(self, n: int) -> None:
        require_n(n, self.f)

    def plan(self, view: GramView, w: Weights, *, rng: RngLike = None) -> RowPlan:
        """Krum's picks from the Gram matrix; the second phase per column block."""
        idx, _, f = self.finite_view(view, None)
        picked, beta = bulyan_picks(sq_dists_from_gram(view.sub(idx)), f)
        return rows_plan(view.n, idx[picked], lambda xb: bulyan_coordinates(xb, beta))
