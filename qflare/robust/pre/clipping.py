"""Static norm clipping: each update scaled down to norm at most c.

Allouah, Guerraoui, Gupta, Jellouli, Rizk and Stephan, "The Vital Role of Gradient
Clipping in Byzantine-Resilient Distributed Learning", arXiv:2405.14432, 2024.
Requirement: c >= 0. Returns new rows; ByzFL's Clipping rescales its input in place.
"""

from __future__ import annotations

import numpy as np

from .._base import GramView, PreAggregator, register_pre
from .._core import F64, FloatArray, RngLike, Weights, check_float, row_norms


def clip_scales(limits: F64, norms: F64) -> F64:
    """The factor row i is scaled by to bring its norm down to limits[i] (1 if below)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out: F64 = np.where(norms > limits, limits / norms, 1.0)
    return out


def clip_rows(x: FloatArray, limits: F64, norms: F64) -> FloatArray:
    """New rows: row i scaled down to norm limits[i] where its norm is above it."""
    with np.errstate(invalid="ignore"):  # an Inf row scaled by 0 is NaN, and non-finite
        out: FloatArray = x * clip_scales(limits, norms).astype(x.dtype)[:, None]
    return out


def view_norms(view: GramView) -> F64:
    """Row norms from the Gram matrix (NaN/Inf for rows that are not finite)."""
    with np.errstate(invalid="ignore"):
        out: F64 = np.sqrt(np.diag(view.g))
    return out


@register_pre
class Clipping(PreAggregator):
    name = "clip"
    param_names = ("c",)

    def __init__(self, c: float = 2.0) -> None:
        self.c = check_float("c", c)

    def transform(
        self, x: FloatArray, w: Weights, *, rng: RngLike = None
    ) -> tuple[FloatArray, Weights]:
        return clip_rows(x, np.full(x.shape[0], self.c), row_norms(x)), w

    def plan(self, view: GramView, w: Weights, *, rng: RngLike = None) -> tuple[F64, Weights]:
        return np.diag(clip_scales(np.full(view.n, self.c), view_norms(view))), w
