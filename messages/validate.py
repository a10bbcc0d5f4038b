"""Validation of an update's tensors against the open round's tensor spec (pure, no I/O).

The codec already guarantees each tensor's bytes match its declared dtype and shape; this
checks the round's expectations: the exact set of names, dtype and shape per name, and
finiteness (NaN/Inf would poison any mean and most robust rules).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from qflare.messages.bodies import TensorSpec
from qflare.messages.errors import MessageRejected, Reason


def validate_update(tensors: Mapping[str, np.ndarray], spec: Sequence[TensorSpec]) -> None:
    """Raise MessageRejected (SHAPE_MISMATCH, DTYPE_NOT_ALLOWED, NON_FINITE, MALFORMED) unless
    ``tensors`` has exactly the spec's names with its dtypes and shapes, all finite."""
    expected = {s.name: s for s in spec}
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise MessageRejected(
            Reason.SHAPE_MISMATCH,
            f"tensor names differ: missing {missing[:5]}, unexpected {extra[:5]}",
        )
    for name, s in expected.items():
        array = tensors[name]
        if not isinstance(array, np.ndarray):
            raise MessageRejected(Reason.MALFORMED, f"{name}: not an array")
        if array.dtype.name != s.dtype:
            raise MessageRejected(
                Reason.DTYPE_NOT_ALLOWED,
                f"{name}: dtype {array.dtype.name}, round expects {s.dtype}",
            )
        if list(array.shape) != s.shape:
            raise MessageRejected(
                Reason.SHAPE_MISMATCH, f"{name}: shape {list(array.shape)}, round expects {s.shape}"
            )
    for name in expected:
        array = tensors[name]
        # A sum is one pass with no temporary of the tensor's size; it is finite only if
        # every element is (an overflow to inf falls through to the exact check).
        with np.errstate(over="ignore", invalid="ignore"):
            total = np.add.reduce(array.ravel(), dtype=np.float64)
        if array.size and not np.isfinite(total) and not np.isfinite(array).all():
            raise MessageRejected(Reason.NON_FINITE, f"{name} contains NaN or Inf")
