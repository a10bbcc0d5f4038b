"""The body codec: zero-copy tensors, every limit enforced before allocation, and nothing
but MessageRejected coming out of arbitrary bytes."""

from __future__ import annotations

import contextlib
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qflare.messages import (
    ALLOWED_DTYPES,
    DEFAULT_LIMITS,
    Limits,
    MessageRejected,
    Reason,
    packb,
    unpack,
)
from qflare.messages.codec import TENSOR_EXT


def _reason(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Reason:
    with pytest.raises(MessageRejected) as exc:
        unpack(data, limits)
    return exc.value.reason


def _ext(header: object, raw: bytes) -> bytes:
    return msgpack.packb(msgpack.ExtType(TENSOR_EXT, msgpack.packb(header) + raw))


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
def test_tensor_round_trip_is_bit_exact_and_zero_copy(dtype: str) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 5)) * 100).astype(dtype)
    data = packb({"t": array})
    out = unpack(data)["t"]
    assert out.dtype == array.dtype and out.shape == array.shape
    assert out.tobytes() == array.tobytes()
    assert not out.flags.writeable
    assert np.shares_memory(out, np.frombuffer(data, dtype=np.uint8))


def test_big_endian_and_non_contiguous_inputs_are_normalised() -> None:
    a = np.arange(12, dtype=">f4").reshape(3, 4)
    out = unpack(packb([a, a.T]))
    assert out[0].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(out[0], a)
    np.testing.assert_array_equal(out[1], a.T)


def test_scalars_and_containers_match_msgpack() -> None:
    value = {
        "i": [0, 1, -1, -33, 127, 128, 65536, 2**40, -(2**40)],
        "f": 1.5,
        "s": "é" * 40,
        "b": b"\x00" * 300,
        "n": None,
        "t": True,
        "e": [],
        "m": {"x": {"y": [1]}},
    }
    assert unpack(packb(value)) == value
    assert unpack(msgpack.packb(value, use_bin_type=True)) == value
    assert unpack(msgpack.packb(np.float32(2.5).item())) == 2.5
    assert unpack(b"\xca" + struct.pack(">f", 2.5)) == 2.5


def test_bytearray_input_gives_read_only_views() -> None:
    data = bytearray(packb(np.ones(4, dtype=np.float32)))
    out = unpack(data)
    assert not out.flags.writeable
    with pytest.raises(ValueError):
        out[0] = 2


def test_encoder_refuses_what_the_wire_does_not_carry() -> None:
    with pytest.raises(ValueError, match="not allowed"):
        packb(np.zeros(2, dtype=np.complex64))
    with pytest.raises(TypeError):
        packb({1: 2})
    with pytest.raises(TypeError):
        packb(object())


# --- each limit / malformation, with its reason ---------------------------------------


def test_truncated_input_is_malformed() -> None:
    data = packb({"t": np.arange(10, dtype=np.float32), "s": "hello"})
    for cut in range(len(data)):
        assert _reason(data[:cut]) is Reason.MALFORMED


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",
        b"\x81\x01\x02",
        b"\x82\xa1a\x01\xa1a\x02",
        b"\xa2\xff\xfe",
        b"\xc0\xc0",
        b"\xd4\x05\x00",
    ],
    ids=["never-used-byte", "int-key", "duplicate-key", "bad-utf8", "trailing", "foreign-ext"],
)
def test_garbled_msgpack_is_malformed(data: bytes) -> None:
    assert _reason(data) is Reason.MALFORMED


@pytest.mark.parametrize(
    "data",
    [
        b"\xc6\xff\xff\xff\xf0abc",
        b"\xdb\x00\x10\x00\x00abc",
        b"\xdd\x7f\xff\xff\xff\xc0",
        b"\xdf\x00\x01\x00\x00\xa1a",
        b"\xc9\x00\x00\x10\x00\x01abc",
    ],
    ids=["bin", "str", "array", "map", "ext"],
)
def test_declared_length_larger_than_data_is_malformed(data: bytes) -> None:
    # The bounds are checked against the bytes present before anything is allocated.
    assert (
        _reason(data, Limits(max_container_len=2**32, max_str_len=2**32, max_bin_len=2**32))
        is Reason.MALFORMED
    )


def test_nesting_bomb_is_too_deep() -> None:
    assert _reason(b"\x91" * 100_000 + b"\xc0") is Reason.TOO_DEEP
    assert _reason(b"\x81\xa1a" * 50 + b"\xc0") is Reason.TOO_DEEP
    assert unpack(b"\x91" * 8 + b"\xc0") == [[[[[[[[None]]]]]]]]


def test_oversized_input_and_fields_are_too_large() -> None:
    assert _reason(b"\xc0" * 101, Limits(max_body_bytes=100)) is Reason.TOO_LARGE
    assert _reason(msgpack.packb("x" * 5000)) is Reason.TOO_LARGE
    assert _reason(msgpack.packb(b"x" * 5000), Limits(max_bin_len=4096)) is Reason.TOO_LARGE
    assert _reason(msgpack.packb([0] * 20), Limits(max_container_len=10)) is Reason.TOO_LARGE


def test_tensor_limits() -> None:
    small = Limits(max_tensors=2, max_ndim=3, max_elements=100, max_total_elements=150)
    t = np.zeros(10, dtype=np.float32)
    assert _reason(packb([t, t, t]), small) is Reason.TOO_LARGE
    assert _reason(packb(np.zeros((1, 1, 1, 1))), small) is Reason.TOO_LARGE
    assert _reason(packb(np.zeros(101, dtype=np.uint8)), small) is Reason.TOO_LARGE
    assert (
        _reason(packb([np.zeros(80, np.uint8), np.zeros(80, np.uint8)]), small) is Reason.TOO_LARGE
    )
    # A huge declared shape is refused from the header alone, before any allocation.
    assert _reason(_ext(["float32", [2**40, 2**40]], b"")) is Reason.TOO_LARGE


@pytest.mark.parametrize("dtype", ["complex64", "object", "<U4", "float128", "V8", ""])
def test_disallowed_dtype(dtype: str) -> None:
    assert _reason(_ext([dtype, [1]], b"\x00" * 8)) is Reason.DTYPE_NOT_ALLOWED


def test_declared_shape_must_match_the_data() -> None:
    assert _reason(_ext(["float32", [3]], b"\x00" * 8)) is Reason.SHAPE_MISMATCH
    assert _reason(_ext(["float32", [1]], b"\x00" * 8)) is Reason.SHAPE_MISMATCH
    assert _reason(_ext(["float32", [-1]], b"")) is Reason.MALFORMED
    assert _reason(_ext(["float32", [1.5]], b"")) is Reason.MALFORMED
    assert _reason(_ext(["float32"], b"")) is Reason.MALFORMED
    assert (
        _reason(msgpack.packb(msgpack.ExtType(TENSOR_EXT, b"\x92\xa7float32\xd4\x01\x00")))
        is Reason.MALFORMED
    )  # no ext inside a tensor header


# --- properties ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_message_rejected(data: bytes) -> None:
    with contextlib.suppress(MessageRejected):
        unpack(data)


_VALID = packb(
    {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "s": "name",
        "l": [1, 2.5, None, b"bytes"],
        "m": {"k": True},
    }
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), max_size=4),
    st.integers(0, len(_VALID)),
)
def test_mutated_valid_bodies_raise_only_message_rejected(
    edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(_VALID)
    for pos, value in edits:
        data[pos] = value
    with contextlib.suppress(MessageRejected):
        unpack(bytes(data[:cut]) + bytes(data[cut:]) if cut % 2 else bytes(data[:cut]))
