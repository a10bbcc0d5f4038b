"""Rules that search the size-(n - f) subsets of the updates and average the best one.

The subsets are enumerated in ByzFL's (lexicographic) order, in chunks, so ties go to the
first subset as in ByzFL.
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections.abc import Iterator
from math import comb

import numpy as np

from .._base import drop_nonfinite
from .._core import check_int, combine, require
from ._fbase import FRule

DEFAULT_MAX_SUBSETS = 200_000


def subset_chunks(
    n: int, k: int, rule: str, max_subsets: int, chunk: int = 4096
) -> Iterator[np.ndarray]:
    total = comb(n, k)
    require(
        total <= max_subsets,
        rule,
        f"C(n={n}, n-f={k}) = {total} subsets exceeds max_subsets={max_subsets}",
    )
    it = itertools.combinations(range(n), k)
    while True:
        block = list(itertools.islice(it, chunk))
        if not block:
            return
        yield np.asarray(block, dtype=np.intp)


class SubsetRule(FRule):
    """The (weighted) mean of the n - f updates whose subset scores lowest.

    A subset's score is computed from its k x k block of an n x n matrix of the updates
    (``pair_matrix``); exponential in n, so refused above ``max_subsets`` subsets.
    """

    weighted = True

    def __init__(self, f: int = 0, max_subsets: int = DEFAULT_MAX_SUBSETS) -> None:
        super().__init__(f)
        self.max_subsets = check_int("max_subsets", max_subsets, minimum=1)

    @abstractmethod
    def pair_matrix(self, x: np.ndarray) -> np.ndarray:
        """The n x n matrix the subsets' blocks are taken from."""

    @abstractmethod
    def block_scores(self, blocks: np.ndarray) -> np.ndarray:
        """One score per [k, k] block of ``blocks`` [m, k, k]; lowest wins."""

    def aggregate(self, x, w, *, reference=None, rng=None):  # type: ignore[override]
        self.check_n(x.shape[0])
        x, w, f = drop_nonfinite(x, w, self.f, self.name)
        n = x.shape[0]
        m = self.pair_matrix(x)
        best, best_score = None, np.inf
        for c in subset_chunks(n, n - f, self.name, self.max_subsets):
            scores = self.block_scores(m[c[:, :, None], c[:, None, :]])
            i = int(np.argmin(scores))
            if scores[i] < best_score:
                best, best_score = c[i], scores[i]
        coef = np.zeros(n)
        coef[best] = 1.0 if w is None else w[best]
        return combine(x, coef / coef.sum())
