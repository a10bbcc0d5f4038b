"""Adaptive robust clipping (ARC).

Allouah, Guerraoui, Gupta, Jellouli, Rizk and Stephan, "The Vital Role of Gradient
Clipping in Byzantine-Resilient Distributed Learning", arXiv:2405.14432, 2024.
Requirement: f <= n. The k = floor(2 f (n - f) / n) largest updates are clipped to the
norm of the largest one left unclipped (ByzFL's ARC, which modifies its input in place;
this returns new rows). k is the exact floor; ByzFL's floating-point product comes out
one lower at some sizes (n=242, f=33).
"""

from __future__ import annotations

import numpy as np

from .._base import FParam, GramView, PreAggregator, register_pre
from .._core import F64, FloatArray, RngLike, Weights, require, row_norms
from .clipping import clip_rows, clip_scales, view_norms


@register_pre
class ARC(FParam, PreAggregator):
    name = "arc"

    def transform(
        self, x: FloatArray, w: Weights, *, rng: RngLike = None
    ) -> tuple[FloatArray, Weights]:
        k = self.clipped(x.shape[0])
        if k == 0:
            return x.copy(), w
        norms = row_norms(x)
        return clip_rows(x, arc_limits(norms, k), norms), w

    def plan(self, view: GramView, w: Weights, *, rng: RngLike = None) -> tuple[F64, Weights]:
        k = self.clipped(view.n)
        if k == 0:
            return np.eye(view.n), w
        norms = view_norms(view)
        return np.diag(clip_scales(arc_limits(norms, k), norms)), w

    def clipped(self, n: int) -> int:
        """How many of n rows ARC clips: floor(2 f (n - f) / n)."""
        require(self.f <= n, self.name, f"needs f <= n, got f={self.f}, n={n}")
        # Integer arithmetic: ByzFL's int(2 * f / n * (n - f)) rounds below the floor at
        # some sizes (n=242, f=33: 28.999... -> 28, not 29).
        return 2 * self.f * (n - self.f) // n


def arc_limits(norms: F64, k: int) -> F64:
    """Norm limit of every row: the k largest clipped to the largest norm left (inf for
    the others)."""
    n = len(norms)
    order = np.argsort(norms, kind="stable")
    limits: F64 = np.full(n, np.inf)
    limits[order[n - k :]] = norms[order[n - k - 1]]
    return limits
