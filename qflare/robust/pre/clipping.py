"""Static norm clipping: each update scaled down to norm at most c.

Allouah, Guerraoui, Gupta, Jellouli, Rizk and Stephan, "The Vital Role of Gradient
Clipping in Byzantine-Resilient Distributed Learning", arXiv:2405.14432, 2024.
Requirement: c >= 0. Returns new rows; ByzFL's Clipping rescales its input in place.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._base import PreAggregator, register_pre
from .._core import F64, FloatArray, RngLike, Weights, check_float, row_norms


def clip_rows(x: FloatArray, limits: F64, norms: F64) -> FloatArray:
    """New rows: row i scaled down to norm limits[i] where its norm is above it."""
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(norms > limits, limits / norms, 1.0)
    out: FloatArray = x * scale.astype(x.dtype)[:, None]
    return out


@register_pre
class Clipping(PreAggregator):
    name = "clip"

    def __init__(self, c: float = 2.0) -> None:
        self.c = check_float("c", c)

    def params(self) -> dict[str, Any]:
        return {"c": self.c}

    def transform(
        self, x: FloatArray, w: Weights, *, rng: RngLike = None
    ) -> tuple[FloatArray, Weights]:
        return clip_rows(x, np.full(x.shape[0], self.c), row_norms(x)), w
