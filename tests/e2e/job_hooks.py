"""A job's plug-ins, as a researcher writes them outside the package: the per-round config
(a learning-rate schedule) and the central evaluation on a held-out set. The aggregator
process imports them by ``module:function`` (``round_config = "job_hooks:round_config"``,
``evaluate_fn = "job_hooks:evaluate"``) from ``PYTHONPATH``; the test imports the same
module to know what they answer.

The task: linear regression ``y = x . TARGET`` with noise, 3 features, a torch
``nn.Linear(3, 1)`` (tensors ``weight`` [1, 3] and ``bias`` [1])."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

TARGET = np.array([1.0, -2.0, 0.5])
#: A prediction within this distance of the label counts as right ("accuracy").
TOLERANCE = 0.1


def round_config(round_no: int) -> dict[str, Any]:
    """The learning rate halves every round; three local steps."""
    return {"lr": 0.4 * 0.5 ** (round_no - 1), "local_steps": 3, "schedule": "halving"}


def dataset(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples, the same for the same name."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x = rng.standard_normal((n, 3))
    return x, x @ TARGET + 0.1 * rng.standard_normal(n)


def measure(
    tensors: Mapping[str, Any], x: np.ndarray, y: np.ndarray
) -> tuple[float, dict[str, float]]:
    """(mean squared error, {"accuracy": share within TOLERANCE, "mae": ...}) of a model."""
    weight = np.asarray(tensors["weight"], np.float64).reshape(-1)
    bias = float(np.asarray(tensors["bias"], np.float64).reshape(-1)[0])
    err = x @ weight + bias - y
    return float(np.mean(err**2)), {
        "accuracy": float(np.mean(np.abs(err) < TOLERANCE)),
        "mae": float(np.mean(np.abs(err))),
    }


def evaluate(
    version: int, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any]
) -> tuple[float, int, dict[str, float]]:
    """The central evaluation: 300 held-out examples nobody trains on."""
    x, y = dataset("central-test-set", 300)
    loss, metrics = measure(tensors, x, y)
    return loss, len(y), {**metrics, "lr": float(config["lr"])}
