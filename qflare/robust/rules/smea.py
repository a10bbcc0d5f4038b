"""Smallest maximum eigenvalue averaging (SMEA).

Allouah, Guerraoui, Gupta, Pinot and Stephan, "On the Privacy-Robustness-Utility
Trilemma in Distributed Learning", ICML 2023. Requirement: n > 2f, and C(n, n - f)
subsets to search (refused above ``max_subsets``). Returns the (weighted) mean of the
n - f updates whose scatter matrix sum_i (x_i - m)(x_i - m)^T has the smallest top
eigenvalue. The eigenvalue is exact here (eigvalsh of the centred k x k Gram block);
ByzFL estimates it with one power iteration from a random start, so its choice is random
whenever d > 1.
"""

from __future__ import annotations

import numpy as np

from .._base import register_rule
from .._core import F64, centre_gram
from ._subsets import SubsetRule


def top_scatter_eigenvalues(blocks: F64) -> F64:
    """Top eigenvalue of each subset's scatter matrix, from its block of the Gram matrix
    re-centred on the subset's own mean (the k x k Gram of the centred subset shares the
    scatter's nonzero eigenvalues)."""
    gs = (
        blocks
        - blocks.mean(axis=1, keepdims=True)
        - blocks.mean(axis=2, keepdims=True)
        + blocks.mean(axis=(1, 2), keepdims=True)
    )
    top: F64 = np.linalg.eigvalsh(gs)[:, -1]
    return top


@register_rule
class SMEA(SubsetRule):
    name = "smea"
    pair_matrix = centre_gram
    block_scores = top_scatter_eigenvalues
