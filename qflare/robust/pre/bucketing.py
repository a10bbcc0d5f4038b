"""Bucketing.

Karimireddy, He and Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
Bucketing", ICLR 2022. Requirement: s >= 1. Updates are shuffled, split into buckets of
s (the last may be smaller, as ByzFL) and each bucket is replaced by its mean; a bucket's
weight is the sum of its members' weights. The shuffle comes from the ``rng`` argument
(a Generator or seed) so the object holds no state; None draws fresh OS entropy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .._base import PreAggregator, register_pre
from .._core import FloatArray, IntArray, RngLike, Weights, check_int


def buckets(n: int, s: int, perm: IntArray) -> list[IntArray]:
    return [perm[b : b + s] for b in range(0, n, s)]


@register_pre
class Bucketing(PreAggregator):
    name = "bucketing"

    def __init__(self, s: int = 1) -> None:
        self.s = check_int("s", s, minimum=1)

    def params(self) -> dict[str, Any]:
        return {"s": self.s}

    def transform(
        self,
        x: FloatArray,
        w: Weights,
        *,
        rng: RngLike = None,
        perm: npt.ArrayLike | None = None,
    ) -> tuple[FloatArray, Weights]:
        """``perm`` (tests: a peer's shuffle) replaces the one drawn from ``rng``."""
        n = x.shape[0]
        if perm is None:
            gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
            order = gen.permutation(n)
        else:
            order = np.asarray(perm, dtype=np.intp)
        groups = buckets(n, self.s, order)
        out = np.empty((len(groups), x.shape[1]), dtype=x.dtype)
        for i, g in enumerate(groups):
            out[i] = x[g].mean(axis=0)  # s rows gathered at a time: no n x d temporary
        wout: Weights = None if w is None else np.array([w[g].sum() for g in groups])
        return out, wout
