"""The work both sides of benchmarks/vs_flower.py do, in NumPy only (the ClientApp runs in
Flower's own virtualenv, which has no torch).

The model is one float32 tensor ``w`` of ``params`` values (1000 rows when that divides);
a participant's training step is one gradient step of ``0.5 * ||w - target||^2`` towards a
target of its own, so updates differ between participants (as detection expects) and cost
one pass over the model.
"""

from __future__ import annotations

import numpy as np

_TARGETS: dict[tuple[int, int], np.ndarray] = {}


def shape(params: int) -> tuple[int, int]:
    rows = 1000 if params % 1000 == 0 and params >= 1000 else 1
    return rows, params // rows


def initial_model(params: int) -> np.ndarray:
    return (0.01 * np.random.default_rng(0).standard_normal(shape(params))).astype(np.float32)


def target(index: int, params: int) -> np.ndarray:
    key = (index, params)
    if key not in _TARGETS:
        rng = np.random.default_rng(1000 + index)
        _TARGETS[key] = rng.standard_normal(shape(params), dtype=np.float32)
    return _TARGETS[key]


def train_step(w: np.ndarray, index: int, lr: float) -> np.ndarray:
    """The locally trained model: ``w - lr * (w - target)``."""
    return (w - np.float32(lr) * (w - target(index, w.size))).astype(np.float32, copy=False)
