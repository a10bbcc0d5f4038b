"""Bucketing.

Karimireddy, He and Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
Bucketing", ICLR 2022. Requirement: s >= 1. Updates are shuffled, split into buckets of
s (the last may be smaller, as ByzFL) and each bucket is replaced by its mean; a bucket's
weight is the sum of its members' weights. The shuffle comes from the ``rng`` argument
(a Generator or seed) so the object holds no state; None draws fresh OS entropy.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .._base import GramView, PreAggregator, as_generator, register_pre
from .._core import F64, FloatArray, IntArray, RngLike, Weights, check_int


def buckets(n: int, s: int, perm: IntArray) -> list[IntArray]:
    return [perm[b : b + s] for b in range(0, n, s)]


@register_pre
class Bucketing(PreAggregator):
    name = "bucketing"
    param_names = ("s",)

    def __init__(self, s: int = 1) -> None:
        self.s = check_int("s", s, minimum=1)

    def transform(
        self,
        x: FloatArray,
        w: Weights,
        *,
        rng: RngLike = None,
        perm: npt.ArrayLike | None = None,
    ) -> tuple[FloatArray, Weights]:
        """``perm`` (tests: a peer's shuffle) replaces the one drawn from ``rng``."""
        groups = self.groups(x.shape[0], rng, perm)
        out = np.empty((len(groups), x.shape[1]), dtype=x.dtype)
        for i, g in enumerate(groups):
            out[i] = x[g].mean(axis=0)  # s rows gathered at a time: no n x d temporary
        return out, bucket_weights(groups, w)

    def plan(
        self,
        view: GramView,
        w: Weights,
        *,
        rng: RngLike = None,
        perm: npt.ArrayLike | None = None,
    ) -> tuple[F64, Weights]:
        groups = self.groups(view.n, rng, perm)
        t: F64 = np.zeros((len(groups), view.n))
        for i, g in enumerate(groups):
            t[i, g] = 1.0 / len(g)
        return t, bucket_weights(groups, w)

    def groups(self, n: int, rng: RngLike, perm: npt.ArrayLike | None) -> list[IntArray]:
        """The buckets: one permutation drawn from ``rng`` (unless ``perm`` is given)."""
        order = as_generator(rng).permutation(n) if perm is None else np.asarray(perm, np.intp)
        return buckets(n, self.s, order)


def bucket_weights(groups: list[IntArray], w: Weights) -> Weights:
    """A bucket weighs the sum of its members' weights."""
    return None if w is None else np.array([w[g].sum() for g in groups])
