"""Enumerating the size-k subsets of n in ByzFL's (lexicographic) order, in chunks."""

from __future__ import annotations

import itertools
from math import comb
from typing import Iterator

import numpy as np

from .._core import require

DEFAULT_MAX_SUBSETS = 200_000


def subset_chunks(n: int, k: int, rule: str, max_subsets: int, chunk: int = 4096) -> Iterator[np.ndarray]:
    total = comb(n, k)
    require(total <= max_subsets, rule,
            f"C(n={n}, n-f={k}) = {total} subsets exceeds max_subsets={max_subsets}")
    it = itertools.combinations(range(n), k)
    while True:
        block = list(itertools.islice(it, chunk))
        if not block:
            return
        yield np.asarray(block, dtype=np.intp)
