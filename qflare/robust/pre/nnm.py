"""Nearest-neighbour mixing (NNM).

Allouah, Farhadkhani, Guerraoui, Gupta, Pinot and Stephan, "Fixing by Mixing: A Recipe
for Optimal Byzantine ML under Heterogeneity", AISTATS 2023. Requirement: f < n.
Each update is replaced by the mean of its n - f nearest updates (itself included), as
ByzFL's NNM. Built as a sparse n x n mixing matrix times X: O(n^2 + n d) memory where
ByzFL's gather of n x (n - f) x d rows needs gigabytes.
"""

from __future__ import annotations

import numpy as np

from .._base import FParam, GramView, PreAggregator, drop_nonfinite, lowered_f, register_pre
from .._core import (
    F64,
    FloatArray,
    RngLike,
    Weights,
    mm,
    pairwise_sq_dists,
    require,
    sq_dists_from_gram,
)


def nnm_matrix(d2: F64, f: int) -> F64:
    """Row i averages the n - f rows nearest row i (itself included; ties to the lower
    index)."""
    n = d2.shape[0]
    k = n - f
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    m: F64 = np.zeros((n, n))
    np.put_along_axis(m, idx, 1.0 / k, axis=1)
    return m


@register_pre
class NNM(FParam, PreAggregator):
    name = "nnm"

    def transform(
        self, x: FloatArray, w: Weights, *, rng: RngLike = None
    ) -> tuple[FloatArray, Weights]:
        n = x.shape[0]
        require(self.f < n, self.name, f"needs f < n, got f={self.f}, n={n}")
        x, w, f = drop_nonfinite(x, w, self.f, self.name)
        m = nnm_matrix(pairwise_sq_dists(x), f)
        return mm(m, x), w

    def plan(self, view: GramView, w: Weights, *, rng: RngLike = None) -> tuple[F64, Weights]:
        n = view.n
        require(self.f < n, self.name, f"needs f < n, got f={self.f}, n={n}")
        f = lowered_f(view.finite, self.f, self.name)
        idx = np.flatnonzero(view.finite)
        t: F64 = np.zeros((len(idx), n))
        t[:, idx] = nnm_matrix(sq_dists_from_gram(view.sub(idx)), f)
        return t, (None if w is None else w[idx])
