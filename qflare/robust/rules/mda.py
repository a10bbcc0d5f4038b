"""Minimum-diameter averaging (MDA).

El Mhamdi, Guerraoui, Guirguis, Hoang and Rouault, "Genuinely Distributed Byzantine
Machine Learning", PODC 2020 (after Rousseeuw's minimum volume estimator, 1985).
Requirement: n > 2f, and C(n, n - f) subsets to search (exponential: refused above
``max_subsets``). Returns the (weighted) mean of the n - f updates whose largest pairwise
distance is smallest; ties go to the first subset in lexicographic order, as ByzFL.
"""

from __future__ import annotations

import numpy as np

from .._base import register_rule
from .._core import pairwise_sq_dists
from ._subsets import SubsetRule


@register_rule
class MDA(SubsetRule):
    name = "mda"

    def pair_matrix(self, x: np.ndarray) -> np.ndarray:
        return pairwise_sq_dists(x)

    def block_scores(self, blocks: np.ndarray) -> np.ndarray:
        return blocks.max(axis=(1, 2))
