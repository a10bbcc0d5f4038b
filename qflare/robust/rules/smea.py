"""Smallest maximum eigenvalue averaging (SMEA).

Allouah, Guerraoui, Gupta, Pinot and Stephan, "On the Privacy-Robustness-Utility
Trilemma in Distributed Learning", ICML 2023. Requirement: n > 2f, and C(n, n - f)
subsets to search (refused above ``max_subsets``). Returns the (weighted) mean of the
n - f updates whose scatter matrix sum_i (x_i - m)(x_i - m)^T has the smallest top
eigenvalue. The eigenvalue is exact here (eigvalsh of the centred k x k Gram block);
ByzFL estimates it with one power iteration from a random start, so its choice is random
whenever d > 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._base import drop_nonfinite, register_rule
from .._core import centred_gram, check_int, combine
from ._fbase import FRule
from ._subsets import DEFAULT_MAX_SUBSETS, subset_chunks


@register_rule
class SMEA(FRule):
    name = "smea"
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
        g = centred_gram(x)
        best, best_val = None, np.inf
        for c in subset_chunks(n, k, self.name, self.max_subsets):
            gs = g[c[:, :, None], c[:, None, :]]
            gs = (gs - gs.mean(axis=1, keepdims=True) - gs.mean(axis=2, keepdims=True)
                  + gs.mean(axis=(1, 2), keepdims=True))
            top = np.linalg.eigvalsh(gs)[:, -1]
            i = int(np.argmin(top))
            if top[i] < best_val:
                best, best_val = c[i], top[i]
        coef = np.zeros(n)
        coef[best] = 1.0 if w is None else w[best]
        return combine(x, coef / coef.sum())
