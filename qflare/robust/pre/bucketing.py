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

from .._base import PreAggregator, register_pre
from .._core import check_int, mm


def bucket_means(x: np.ndarray, s: int, perm: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    nb = -(-n // s)
    m = np.zeros((nb, n))
    for b in range(nb):
        members = perm[b * s:(b + 1) * s]
        m[b, members] = 1.0 / len(members)
    return m


@register_pre
class Bucketing(PreAggregator):
    name = "bucketing"

    def __init__(self, s: int = 1) -> None:
        self.s = check_int("s", s, minimum=1)

    def params(self) -> dict[str, Any]:
        return {"s": self.s}

    def transform(self, x, w, *, rng=None, perm=None):  # type: ignore[override]
        n = x.shape[0]
        if perm is None:
            gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
            perm = gen.permutation(n)
        m = bucket_means(x, self.s, np.asarray(perm))
        out = mm(m, x)
        wout = None if w is None else (m > 0).astype(np.float64) @ w
        return out, wout
