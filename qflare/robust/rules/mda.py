"""Minimum-diameter averaging (MDA).

El Mhamdi, Guerraoui, Guirguis, Hoang and Rouault, "Genuinely Distributed Byzantine
Machine Learning", PODC 2020 (after Rousseeuw's minimum volume estimator, 1985).
Requirement: n > 2f, and C(n, n - f) subsets to search (exponential: refused above
``max_subsets``). Returns the (weighted) mean of the n - f updates whose largest pairwise
distance is smallest; ties go to the first subset in lexicographic order, as ByzFL.
"""

from __future__ import annotations

from .._base import register_rule
from .._core import F64, sq_dists_from_gram
from ._subsets import SubsetRule


def diameters(blocks: F64) -> F64:
    """The squared diameter of each subset: the largest entry of its distance block."""
    out: F64 = blocks.max(axis=(1, 2))
    return out


@register_rule
class MDA(SubsetRule):
    name = "mda"
    pair_matrix = sq_dists_from_gram
    block_scores = diameters
