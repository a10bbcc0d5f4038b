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
from .._core import centred_gram
from ._subsets import SubsetRule


@register_rule
class SMEA(SubsetRule):
    name = "smea"

    def pair_matrix(self, x: np.ndarray) -> np.ndarray:
        return centred_gram(x)

    def block_scores(self, blocks: np.ndarray) -> np.ndarray:
        # re-centre each block on its own subset's mean: its top eigenvalue is the scatter's
        gs = (
            blocks
            - blocks.mean(axis=1, keepdims=True)
            - blocks.mean(axis=2, keepdims=True)
            + blocks.mean(axis=(1, 2), keepdims=True)
        )
        return np.linalg.eigvalsh(gs)[:, -1]
