"""Minimum-diameter averaging (MDA).

El Mhamdi, Guerraoui, Guirguis, Hoang and Rouault, "Genuinely Distributed Byzantine
Machine Learning", PODC 2020 (after Rousseeuw's minimum volume estimator, 1985).
Requirement: n > 2f, and C(n, n - f) subsets to search (exponential: refused above
``max_subsets``). Returns the (weighted) mean of the n - f updates whose largest pairwise
distance is smallest; ties go to the first subset in lexicographic order, as ByzFL.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._base import drop_nonfinite, register_rule
from .._core import check_int, combine, pairwise_sq_dists
from ._fbase import FRule
from ._subsets import DEFAULT_MAX_SUBSETS, subset_chunks


@register_rule
class MDA(FRule):
    name = "mda"
    weighted = True

    def __init__(self, f: int = 0, max_subsets: int = DEFAULT_MAX_SUBSETS) -> None:
        super().__init__(f)
        self.max_subsets = check_int("max_subsets", max_subsets, minimum=1)

    def params(self) -> dict[str, Any]:
        return {"f": self.f}

    def aggregate(self, x, w, *, reference=None, rng=None):  # type: ignore[override]
        self.check_n(x.shape[0])
        x, w, f = drop_nonfinite(x, w, self.f, self.name)
        n = x.shape[0]
        k = n - f
        d2 = pairwise_sq_dists(x)
        best, best_diam = None, np.inf
        for c in subset_chunks(n, k, self.name, self.max_subsets):
            diam = d2[c[:, :, None], c[:, None, :]].max(axis=(1, 2))
            i = int(np.argmin(diam))
            if diam[i] < best_diam:
                best, best_diam = c[i], diam[i]
        coef = np.zeros(n)
        coef[best] = 1.0 if w is None else w[best]
        return combine(x, coef / coef.sum())
