"""Models in parts (qflare.messages.parts: encode_model_parts, ModelAssembler) and the
model-stream reader (qflare.messages.models.ModelReader): round trips bit for bit, and every
wrong manifest or part refused with its code, nothing of a refused model handed out."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from qflare.crypto.testing import make_federation
from qflare.messages import MessageRejected, Reason, encode, open_envelope
from qflare.messages.models import ModelReader, model_envelopes, opener
from qflare.messages.parts import ModelAssembler, check_part, encode_model_parts
from qflare.messages.tensors import model_digest

FED = make_federation(clients=1)


def model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((37, 11)).astype(np.float32),
        "a": np.zeros((0,), np.float32),
        "b": rng.standard_normal(13).astype(np.float64),
        "z": np.zeros((2, 0), np.float16),
        "c": np.arange(7, dtype=np.float16),
        "big": rng.standard_normal(3).astype(">f8"),  # big-endian: sent little-endian
    }


def envelopes(part_bytes: int = 64, **kw: Any) -> list[bytes]:
    t = kw.pop("tensors", model())
    return list(
        encode_model_parts(
            FED["aggregator"],
            t,
            job="j",
            round=2,
            version=2,
            epsilon=0.5,
            part_bytes=part_bytes,
            **kw,
        )
    )


def assemble(data: list[bytes]) -> dict[str, np.ndarray]:
    a = ModelAssembler(open_envelope(data[0], FED.trust()))
    for d in data[1:]:
        a.add(open_envelope(d, FED.trust(), vouched_digest=a.expected))
    return a.finish()


@pytest.mark.parametrize("part_bytes", [1, 7, 64, 1 << 20], ids=lambda n: f"{n}B")
def test_a_model_in_parts_arrives_bit_for_bit(part_bytes: int) -> None:
    t = model()
    data = envelopes(part_bytes, digest=model_digest(t))
    manifest = open_envelope(data[0], FED.trust()).body
    assert manifest.digest == model_digest(t)
    got = assemble(data)
    assert model_digest(got) == model_digest(t)
    for k, v in t.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype.newbyteorder("<")
        assert np.array_equal(got[k], v)


def test_a_digest_not_the_tensors_is_a_configuration_mistake() -> None:
    with pytest.raises(ValueError, match="hash to"):
        envelopes(digest=bytes(32))
    with pytest.raises(ValueError, match="part_bytes"):
        envelopes(0)


def _fields(data: bytes) -> dict[str, Any]:
    env = open_envelope(data, FED.trust())
    return {name: getattr(env.body, name) for name in type(env.body).model_fields}


def _resign(kind: str, fields: dict[str, Any]) -> bytes:
    return encode(kind, fields, FED["aggregator"], job="j", round=2)


def test_each_wrong_part_is_refused_and_fails_the_model() -> None:
    data = envelopes(200)
    cases: dict[str, tuple[list[bytes], Reason]] = {
        "missing": ([data[0], data[1], data[3]], Reason.CHUNK_MISMATCH),
        "duplicate": ([data[0], data[1], data[1]], Reason.DUPLICATE),
        "not named": (
            [data[0], _resign("model.part", {**_fields(data[2]), "index": 0})],
            Reason.BAD_DIGEST,
        ),
        "another transfer": (
            [data[0], _resign("model.part", {**_fields(data[1]), "transfer": bytes(16)})],
            Reason.CHUNK_MISMATCH,
        ),
    }
    for name, (stream, reason) in cases.items():
        a = ModelAssembler(open_envelope(stream[0], FED.trust()))
        with pytest.raises(MessageRejected) as err:
            for d in stream[1:]:
                a.add(open_envelope(d, FED.trust()))
        assert err.value.reason is reason, name
        assert not a.done
        with pytest.raises(MessageRejected):
            a.finish()


@pytest.mark.parametrize(
    ("received", "reason"),
    [
        (np.zeros(4, np.uint8), Reason.TOO_LARGE),  # the last of 10 bytes in parts of 4 holds 2
        (np.zeros(1, np.uint8), Reason.CHUNK_MISMATCH),
        (np.zeros(2, np.int8), Reason.DTYPE_NOT_ALLOWED),
        (np.zeros((2, 1), np.uint8), Reason.CHUNK_MISMATCH),
    ],
    ids=["oversized", "short", "int8", "two-dimensional"],
)
def test_a_model_part_of_the_wrong_size_or_type_is_refused(
    received: np.ndarray, reason: Reason
) -> None:
    """The check a model part meets after its place and digest (the same as an update
    part's, on bytes): a signed part the manifest names but whose bytes do not fit."""
    digests = [b"0" * 32, b"1" * 32, b"2" * 32]
    ok = check_part(
        2,
        2,
        b"2" * 32,
        digests,
        received=np.zeros(2, np.uint8),
        dtype=np.dtype("u1"),
        per_part=4,
        total=10,
    )
    assert ok == 8
    with pytest.raises(MessageRejected) as err:
        check_part(
            2, 2, b"2" * 32, digests, received=received, dtype=np.dtype("u1"), per_part=4, total=10
        )
    assert err.value.reason is reason


def test_a_manifest_whose_digest_the_bytes_do_not_match_is_refused_at_the_end() -> None:
    data = envelopes(200)
    lying = _resign("model.manifest", {**_fields(data[0]), "digest": bytes(32)})
    with pytest.raises(MessageRejected) as err:
        assemble([lying, *data[1:]])
    assert err.value.reason is Reason.BAD_DIGEST


def test_a_manifest_beyond_the_limits_allocates_nothing() -> None:
    fields = _fields(envelopes(200)[0])
    huge = [{"name": "w", "dtype": "float32", "shape": [1 << 20, 1 << 20]}]
    for change, reason in (
        ({"tensors": huge}, Reason.TOO_LARGE),
        ({"part_bytes": 1 << 30}, Reason.TOO_LARGE),
        ({"part_digests": fields["part_digests"][:-1]}, Reason.CHUNK_MISMATCH),
        ({"tensors": list(reversed(fields["tensors"]))}, Reason.SHAPE_MISMATCH),
    ):
        with pytest.raises(MessageRejected) as err:
            ModelAssembler(
                open_envelope(_resign("model.manifest", {**fields, **change}), FED.trust())
            )
        assert err.value.reason is reason, change


async def _read(data: list[bytes], **kw: Any) -> list[Any]:
    reader = ModelReader(opener(FED.trust()), **kw)
    return [m for d in data if (m := await reader.take(d)) is not None]


async def test_the_reader_takes_one_message_and_parted_models_alike() -> None:
    t = model()
    t.pop("big")  # one model.published carries native little-endian tensors as given
    common = dict(job="j", round=1, version=1, digest=model_digest(t), epsilon=0.0)
    whole = [d async for d in model_envelopes(FED["aggregator"], t, **common)]
    parted = [
        d
        async for d in model_envelopes(FED["aggregator"], t, threshold=16, part_bytes=50, **common)
    ]
    assert len(whole) == 1 and len(parted) > 2
    for got in (await _read(whole), await _read(parted), await _read([*whole, *parted])):
        assert [m.version for m in got] in ([1], [1, 1])
        assert all(model_digest(m.tensors) == model_digest(t) for m in got)
    # a manifest abandoned half way (an aggregator that restarted) is never handed out
    assert [m.version for m in await _read([*parted[:2], *parted])] == [1]
    with pytest.raises(MessageRejected) as err:
        await _read(parted, expect=(1, bytes(32)))
    assert err.value.reason is Reason.BAD_DIGEST
    with pytest.raises(MessageRejected) as err:
        await _read(parted[1:])
    assert err.value.reason is Reason.CHUNK_MISMATCH
