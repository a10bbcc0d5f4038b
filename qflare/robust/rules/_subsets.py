"""Rules that search the size-(n - f) subsets of the updates and average the best one.

The subsets are enumerated in ByzFL's (lexicographic) order, in chunks, so ties go to the
first subset as in ByzFL.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from math import comb
from typing import ClassVar

import numpy as np

from .._core import F64, IntArray, Weights, check_int, require
from ._fbase import GramRule

DEFAULT_MAX_SUBSETS = 200_000


def subset_chunks(
    n: int, k: int, rule: str, max_subsets: int, chunk: int = 4096
) -> Iterator[IntArray]:
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


class SubsetRule(GramRule):
    """The (weighted) mean of the n - f updates whose subset scores lowest.

    A subset's score is computed from its k x k block of an n x n matrix of the updates;
    exponential in n, so refused above ``max_subsets`` subsets.
    """

    weighted = True
    #: the n x n matrix the subsets' blocks are taken from, made from the Gram matrix
    pair_matrix: ClassVar[Callable[[F64], F64]]
    #: one score per [k, k] block of [m, k, k] blocks; the lowest wins
    block_scores: ClassVar[Callable[[F64], F64]]

    def __init__(self, f: int = 0, max_subsets: int = DEFAULT_MAX_SUBSETS) -> None:
        super().__init__(f)
        self.max_subsets = check_int("max_subsets", max_subsets, minimum=1)

    def coefficients(self, g: F64, w: Weights, f: int) -> F64:
        n = g.shape[0]
        cls = type(self)
        m = cls.pair_matrix(g)
        best: IntArray = np.arange(n - f)
        best_score = np.inf
        for c in subset_chunks(n, n - f, self.name, self.max_subsets):
            scores = cls.block_scores(m[c[:, :, None], c[:, None, :]])
            i = int(np.argmin(scores))
            if scores[i] < best_score:
                best, best_score = c[i], float(scores[i])
        coef: F64 = np.zeros(n)
        coef[best] = 1.0 if w is None else w[best]
        out: F64 = coef / coef.sum()
        return out
