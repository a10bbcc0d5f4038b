"""validate_update: an update's tensors against the open round's tensor spec."""

from __future__ import annotations

import numpy as np
import pytest

from qflare.messages import MessageRejected, Reason, TensorSpec, validate_update

SPEC = [
    TensorSpec(name="w", dtype="float32", shape=[4, 3]),
    TensorSpec(name="b", dtype="float32", shape=[3]),
]


def good() -> dict[str, np.ndarray]:
    return {"w": np.zeros((4, 3), np.float32), "b": np.ones(3, np.float32)}


def reason(tensors: dict[str, np.ndarray]) -> Reason:
    with pytest.raises(MessageRejected) as exc:
        validate_update(tensors, SPEC)
    return exc.value.reason


def test_matching_update_passes() -> None:
    validate_update(good(), SPEC)


def test_wrong_shape() -> None:
    assert reason({**good(), "w": np.zeros((3, 4), np.float32)}) is Reason.SHAPE_MISMATCH
    assert reason({**good(), "b": np.zeros((1, 3), np.float32)}) is Reason.SHAPE_MISMATCH


def test_missing_or_extra_tensor() -> None:
    assert reason({"w": good()["w"]}) is Reason.SHAPE_MISMATCH
    assert reason({**good(), "extra": np.zeros(1, np.float32)}) is Reason.SHAPE_MISMATCH


def test_wrong_dtype() -> None:
    assert reason({**good(), "b": np.ones(3, np.float64)}) is Reason.DTYPE_NOT_ALLOWED


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad: float) -> None:
    t = good()
    t["w"] = t["w"].copy()
    t["w"][2, 1] = bad
    assert reason(t) is Reason.NON_FINITE


def test_large_finite_values_that_overflow_a_sum_still_pass() -> None:
    spec = [TensorSpec(name="x", dtype="float64", shape=[4])]
    validate_update({"x": np.full(4, 1.7e308)}, spec)
