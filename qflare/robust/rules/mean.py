"""Weighted mean (FedAvg).

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017. Not robust (one update moves it arbitrarily); requirement: n >= 1.
"""

from __future__ import annotations

from .._base import Aggregator, register_rule
from .._core import FloatArray, Weights, weighted_mean


@register_rule
class Mean(Aggregator):
    name = "mean"
    weighted = True
    coordinatewise = True

    def apply(self, x: FloatArray, w: Weights) -> FloatArray:
        return weighted_mean(x, w)
