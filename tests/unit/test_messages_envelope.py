"""Signed envelopes: round trips, sealing, and a negative test for every reason code."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qflare.crypto import Identity, context_for
from qflare.crypto.pki import canonical
from qflare.crypto.testing import MemoryFederation, make_federation
from qflare.messages import (
    BODY_TYPES,
    Envelope,
    Limits,
    MessageRejected,
    ModelPublished,
    Reason,
    RoundOpened,
    TensorSpec,
    Update,
    encode,
    open_envelope,
    packb,
    peek_kind,
)
from qflare.messages.codec import SEALED_EXT, TENSOR_EXT

JOB = "job-1"


@pytest.fixture(scope="module")
def fed() -> MemoryFederation:
    f = make_federation(clients=2)
    f.add("expired", "client", valid_days=-1)
    f.add("future", "client", now=time.time() + 10 * 86400)
    f.add("revoked", "client")
    f.revoke("revoked")
    return f


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal((16, 8)).astype(np.float32),
        "b": rng.standard_normal(8).astype(np.float32),
    }


def update_body(tensors: dict[str, np.ndarray]) -> Update:
    return Update(base_version=3, num_samples=100, tensors=tensors)


def raw_envelope(
    ident: Identity, kind: str, body: bytes, *, ctx_kind: str | None = None, **override: Any
) -> bytes:
    """An envelope built independently of qflare.messages.encode (plain msgpack.packb)."""
    header = {
        "v": 1,
        "kind": kind,
        "sender": ident.id,
        "cert": ident.cert.to_bytes(),
        "job": JOB,
        "round": 1,
        "ts": int(time.time() * 1000),
        "nonce": os.urandom(16),
    }
    header.update({k: v for k, v in override.items() if k in header})
    header["body_digest"] = override.get("body_digest", hashlib.sha256(body).digest())
    sig = ident.key.sign(canonical(header), context_for(ctx_kind or kind))
    env = {**header, "sig": override.get("sig", sig), "body": body}
    return msgpack.packb(env, use_bin_type=True)


def reason_of(data: bytes | bytearray, fed: MemoryFederation, **kw: Any) -> Reason:
    with pytest.raises(MessageRejected) as exc:
        open_envelope(data, fed.trust(), **kw)
    return exc.value.reason


# --- round trips ----------------------------------------------------------------------


def test_round_trip_bit_exact(fed: MemoryFederation, tensors: dict[str, np.ndarray]) -> None:
    data = encode("update", update_body(tensors), fed["client-000"], job=JOB, round=4)
    env = open_envelope(data, fed.trust(), expect_kind="update", expect_job=JOB, expect_round=4)
    assert isinstance(env, Envelope) and env.sender == "client-000" and env.round == 4
    assert env.cert.role == "client" and not env.sealed and env.size == len(data)
    for name, array in tensors.items():
        assert env.body.tensors[name].tobytes() == array.tobytes()
        assert not env.body.tensors[name].flags.writeable
    assert (
        env.body_digest
        == hashlib.sha256(msgpack.unpackb(data, ext_hook=msgpack.ExtType)["body"]).digest()
    )


def test_wire_format_is_plain_msgpack(
    fed: MemoryFederation, tensors: dict[str, np.ndarray]
) -> None:
    data = encode("update", update_body(tensors), fed["client-000"], job=JOB, round=1)
    env = msgpack.unpackb(data, raw=False)
    assert set(env) == {
        "v",
        "kind",
        "sender",
        "cert",
        "job",
        "round",
        "ts",
        "nonce",
        "body_digest",
        "body",
        "sig",
    }
    body = msgpack.unpackb(env["body"], raw=False, ext_hook=lambda c, d: (c, d))
    assert body["tensors"]["w"][0] == TENSOR_EXT
    # ... and an envelope assembled with msgpack.packb opens too.
    raw = raw_envelope(
        fed["client-000"],
        "update",
        packb({"base_version": 0, "num_samples": 1, "tensors": tensors}),
    )
    assert open_envelope(raw, fed.trust()).body.num_samples == 1


@pytest.mark.parametrize("kind", sorted(BODY_TYPES))
def test_every_kind_has_a_strict_model_and_a_sender(kind: str) -> None:
    cls = BODY_TYPES[kind]
    assert kind == cls.KIND and cls.SENDERS
    assert cls.model_config["extra"] == "forbid" and cls.model_config["strict"]


def test_service_kinds_round_trip(fed: MemoryFederation) -> None:
    opened = RoundOpened(
        model_version=2,
        model_digest=b"\x01" * 32,
        participants=["client-000", "client-001"],
        deadline=time.time() + 60,
        min_updates=2,
        clip_norm=1.0,
        rule="median",
        tensor_spec=[TensorSpec(name="w", dtype="float32", shape=[16, 8])],
        model_offset=7,
        updates_from=120,
    )
    env = open_envelope(
        encode("round.opened", opened, fed["aggregator"], job=JOB, round=2), fed.trust()
    )
    assert env.body == opened
    rej = encode(
        "update.rejected",
        {"client": "client-001", "reason": Reason.NON_FINITE, "detail": "w"},
        fed["ingest"],
        job=JOB,
        round=2,
    )
    assert open_envelope(rej, fed.trust()).body.reason is Reason.NON_FINITE
    accepted = {
        "client": "client-001",
        "update_digest": b"\x02" * 32,
        "base_version": 1,
        "num_samples": 5,
        "offset": 42,
    }
    env = open_envelope(
        encode("update.accepted", accepted, fed["ingest"], job=JOB, round=2), fed.trust()
    )
    assert env.body.offset == 42
    with pytest.raises(ValueError):  # a verdict carries no tensors: the bytes stay in the stream
        encode("update.accepted", {**accepted, "tensors": {}}, fed["ingest"], job=JOB, round=2)


def test_sealed_round_trip(fed: MemoryFederation, tensors: dict[str, np.ndarray]) -> None:
    ingest = fed["ingest"]
    data = encode(
        "update", update_body(tensors), fed["client-000"], job=JOB, round=1, seal_to=ingest.cert
    )
    assert tensors["w"].tobytes()[:64] not in data
    env = open_envelope(data, fed.trust(), kem_key=ingest.kem)
    assert env.sealed and env.body.tensors["w"].tobytes() == tensors["w"].tobytes()


def test_sealed_once_for_several_readers(
    fed: MemoryFederation, tensors: dict[str, np.ndarray]
) -> None:
    readers = [fed[r] for r in ("ingest", "aggregator", "detector")]
    data = encode(
        "update",
        update_body(tensors),
        fed["client-000"],
        job=JOB,
        round=1,
        seal_to=[r.cert for r in readers],
    )
    for reader in readers:
        env = open_envelope(data, fed.trust(), kem_key=reader.kem)
        assert env.body.tensors["w"].tobytes() == tensors["w"].tobytes()
    with pytest.raises(MessageRejected) as exc:
        open_envelope(data, fed.trust(), kem_key=fed["accountant"].kem)
    assert exc.value.reason is Reason.UNSEAL_FAILED


def test_vouched_digest_binds_the_bytes_without_a_second_signature_check(
    fed: MemoryFederation, tensors: dict[str, np.ndarray]
) -> None:
    data = encode("update", update_body(tensors), fed["client-000"], job=JOB, round=1)
    digest = open_envelope(data, fed.trust()).body_digest
    assert open_envelope(data, fed.trust(), vouched_digest=digest).sender == "client-000"
    # another digest than the one vouched for: refused before anything is decoded
    with pytest.raises(MessageRejected) as exc:
        open_envelope(data, fed.trust(), vouched_digest=b"\x00" * 32)
    assert exc.value.reason is Reason.BAD_DIGEST
    # the body changed under the same header: it no longer hashes to the vouched digest
    tampered = bytearray(data)
    tampered[-5] ^= 1
    with pytest.raises(MessageRejected) as exc:
        open_envelope(bytes(tampered), fed.trust(), vouched_digest=digest)
    assert exc.value.reason in (Reason.BAD_DIGEST, Reason.MALFORMED)


def test_encode_refuses_configuration_mistakes(
    fed: MemoryFederation, tensors: dict[str, np.ndarray]
) -> None:
    with pytest.raises(ValueError, match="may not send"):
        encode(
            "model.published",
            ModelPublished(version=1, digest=b"\x00" * 32, epsilon=0.1),
            fed["client-000"],
            job=JOB,
            round=1,
        )
    with pytest.raises(ValueError, match="unknown kind"):
        encode("nope", {}, fed["client-000"], job=JOB, round=1)
    with pytest.raises(ValueError):
        encode("update", {"base_version": 0}, fed["client-000"], job=JOB, round=1)
    with pytest.raises(ValueError, match="round"):
        encode("update", update_body(tensors), fed["client-000"], job=JOB, round=-1)


# --- one negative test per reason code ---------------------------------------------------


def _good(
    fed: MemoryFederation, tensors: dict[str, np.ndarray], who: str = "client-000", **kw: Any
) -> bytes:
    return encode("update", update_body(tensors), fed[who], job=JOB, round=1, **kw)


def _plain_body(**extra: Any) -> bytes:
    return packb(
        {"base_version": 0, "num_samples": 1, "tensors": {"w": np.ones(4, np.float32)}, **extra}
    )


def test_forged_signature_is_bad_signature(fed, tensors) -> None:  # type: ignore[no-untyped-def]
    env = msgpack.unpackb(_good(fed, tensors))
    sig = bytearray(env["sig"])
    sig[10] ^= 0x40
    env["sig"] = bytes(sig)
    assert reason_of(msgpack.packb(env), fed) is Reason.BAD_SIGNATURE
    env["sig"] = env["sig"][:-1]
    assert reason_of(msgpack.packb(env), fed) is Reason.BAD_SIGNATURE


def test_altered_header_is_bad_signature(fed, tensors) -> None:  # type: ignore[no-untyped-def]
    env = msgpack.unpackb(_good(fed, tensors))
    env["round"] = 2
    assert reason_of(msgpack.packb(env), fed) is Reason.BAD_SIGNATURE


def test_signature_for_another_kind_is_bad_signature(fed) -> None:  # type: ignore[no-untyped-def]
    data = raw_envelope(fed["client-000"], "update", _plain_body(), ctx_kind="update.accepted")
    assert reason_of(data, fed) is Reason.BAD_SIGNATURE


def test_unknown_signer(fed, tensors) -> None:  # type: ignore[no-untyped-def]
    stranger = make_federation(clients=1, services=())
    assert reason_of(_good(stranger, tensors), fed) is Reason.UNKNOWN_SIGNER


def test_expired_not_yet_valid_and_revoked(fed, tensors) -> None:  # type: ignore[no-untyped-def]
    assert reason_of(_good(fed, tensors, "expired"), fed) is Reason.EXPIRED
    assert reason_of(_good(fed, tensors, "future"), fed) is Reason.NOT_YET_VALID
    assert reason_of(_good(fed, tensors, "revoked"), fed) is Reason.REVOKED
    late = fed["client-000"].cert.not_after + 1
    assert reason_of(_good(fed, tensors), fed, now=late) is Reason.EXPIRED


def test_sender_must_match_certificate(fed) -> None:  # type: ignore[no-untyped-def]
    data = raw_envelope(fed["client-000"], "update", _plain_body(), sender="client-001")
    assert reason_of(data, fed) is Reason.SENDER_MISMATCH


def test_client_may_not_publish_a_model(fed) -> None:  # type: ignore[no-untyped-def]
    body = packb(
        {"version": 9, "digest": b"\x00" * 32, "epsilon": 0.0, "metrics": {}, "tensors": None}
    )
    data = raw_envelope(fed["client-000"], "model.published", body)
    assert reason_of(data, fed) is Reason.ROLE_NOT_ALLOWED


def test_future_timestamp_is_clock_skew(fed) -> None:  # type: ignore[no-untyped-def]
    data = raw_envelope(
        fed["client-000"], "update", _plain_body(), ts=int((time.time() + 3600) * 1000)
    )
    assert reason_of(data, fed) is Reason.CLOCK_SKEW


def test_body_not_matching_digest_is_bad_digest(fed, tensors) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(_good(fed, tensors))
    data[-5] ^= 0x01  # inside the last tensor's bytes; the header is untouched
    assert reason_of(data, fed) is Reason.BAD_DIGEST


def test_unknown_kind_and_version(fed) -> None:  # type: ignore[no-untyped-def]
    assert (
        reason_of(raw_envelope(fed["client-000"], "update.v2", b"\x80"), fed) is Reason.UNKNOWN_KIND
    )
    assert (
        reason_of(raw_envelope(fed["client-000"], "update", _plain_body(), v=2), fed)
        is Reason.UNSUPPORTED_VERSION
    )


@pytest.mark.parametrize(
    "body",
    [
        {"base_version": 0, "num_samples": 1, "tensors": {}, "extra": 1},
        {"base_version": "0", "num_samples": 1, "tensors": {}},
        {"base_version": 0, "num_samples": 0, "tensors": {}},
        {"base_version": 0, "tensors": {}},
        {"base_version": 0, "num_samples": 1, "tensors": {"w": [1.0, 2.0]}},
    ],
    ids=["unknown-field", "string-for-int", "zero-samples", "missing-field", "list-not-tensor"],
)
def test_schema_violations_are_bad_schema(fed, body) -> None:  # type: ignore[no-untyped-def]
    data = raw_envelope(fed["client-000"], "update", packb(body))
    assert reason_of(data, fed) is Reason.BAD_SCHEMA


def test_body_not_a_map_is_bad_schema(fed) -> None:  # type: ignore[no-untyped-def]
    assert (
        reason_of(raw_envelope(fed["client-000"], "update", packb([1])), fed) is Reason.BAD_SCHEMA
    )


def test_a_signed_body_that_fails_names_its_signer_and_a_tampered_one_does_not(
    fed: MemoryFederation, tensors: dict[str, np.ndarray]
) -> None:
    """A body refused after the signature and its digest verified is the signer's own
    (SignedBodyRejected names it); a body that does not hash to the signed digest may be
    anyone's (plain MessageRejected). Pickled, the rejection stays a MessageRejected."""
    import pickle

    from qflare.messages.errors import SignedBodyRejected

    body = {"base_version": "0", "num_samples": 1, "tensors": {}}
    data = raw_envelope(fed["client-001"], "update", packb(body), round=4)
    with pytest.raises(SignedBodyRejected) as signed:
        open_envelope(data, fed.trust())
    got = signed.value
    assert (got.reason, got.sender, got.job, got.round) == (
        Reason.BAD_SCHEMA,
        "client-001",
        JOB,
        4,
    )
    assert got.body_digest == hashlib.sha256(packb(body)).digest()
    again = pickle.loads(pickle.dumps(got))
    assert type(again) is MessageRejected and again.reason is Reason.BAD_SCHEMA

    tampered = bytearray(_good(fed, tensors))
    tampered[-5] ^= 0x01
    with pytest.raises(MessageRejected) as plain:
        open_envelope(tampered, fed.trust())
    assert not isinstance(plain.value, SignedBodyRejected)
    assert plain.value.reason is Reason.BAD_DIGEST


def test_expectations(fed, tensors) -> None:  # type: ignore[no-untyped-def]
    data = _good(fed, tensors)
    assert reason_of(data, fed, expect_kind="round.opened") is Reason.WRONG_KIND
    assert reason_of(data, fed, expect_job="job-2") is Reason.WRONG_JOB
    assert reason_of(data, fed, expect_round=2) is Reason.STALE_ROUND


def test_truncated_and_garbled_envelopes_are_malformed(fed, tensors) -> None:  # type: ignore[no-untyped-def]
    data = _good(fed, tensors)
    for cut in (0, 1, 10, len(data) // 2, len(data) - 1):
        assert reason_of(data[:cut], fed) is Reason.MALFORMED
    assert reason_of(b"\xc1" + data[1:], fed) is Reason.MALFORMED
    assert reason_of(data + b"\x00", fed) is Reason.MALFORMED
    assert reason_of(msgpack.packb([1, 2]), fed) is Reason.MALFORMED
    env = msgpack.unpackb(data)
    env["extra"] = 1
    assert reason_of(msgpack.packb(env), fed) is Reason.MALFORMED
    del env["extra"], env["nonce"]
    assert reason_of(msgpack.packb(env), fed) is Reason.MALFORMED
    env = msgpack.unpackb(data)
    env["round"] = "1"
    assert reason_of(msgpack.packb(env), fed) is Reason.MALFORMED
    assert (
        reason_of(raw_envelope(fed["client-000"], "update", _plain_body(), round=-1), fed)
        is Reason.MALFORMED
    )


def test_declared_length_larger_than_data_is_malformed(fed, tensors) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(_good(fed, tensors))
    at = data.index(b"\xa4body") + 5  # the body's bin header follows its key
    width = {0xC5: 2, 0xC6: 4}[data[at]]
    declared = int.from_bytes(data[at + 1 : at + 1 + width], "big")
    data[at + 1 : at + 1 + width] = (declared + 1000).to_bytes(width, "big")
    assert reason_of(data, fed) is Reason.MALFORMED


def test_nesting_bombs_are_too_deep(fed) -> None:  # type: ignore[no-untyped-def]
    bomb = b"\x91" * 10_000 + b"\xc0"
    assert reason_of(bomb, fed) is Reason.TOO_DEEP
    body = (
        b"\x84"
        + packb("base_version")
        + b"\x00"
        + packb("num_samples")
        + b"\x01"
        + packb("tensors")
        + b"\x80"
        + packb("x")
        + bomb
    )
    assert reason_of(raw_envelope(fed["client-000"], "update", body), fed) is Reason.TOO_DEEP


def test_oversized_envelope_is_too_large(fed, tensors) -> None:  # type: ignore[no-untyped-def]
    data = _good(fed, tensors)
    assert reason_of(data, fed, limits=Limits(max_envelope_bytes=len(data) - 1)) is Reason.TOO_LARGE
    big = raw_envelope(fed["client-000"], "update", _plain_body(), job="j" * 300)
    assert reason_of(big, fed) is Reason.TOO_LARGE


def test_disallowed_dtype_and_inconsistent_shape(fed) -> None:  # type: ignore[no-untyped-def]
    def body_with(ext_payload: bytes) -> bytes:
        return (
            b"\x83"
            + packb("base_version")
            + b"\x00"
            + packb("num_samples")
            + b"\x01"
            + packb("tensors")
            + b"\x81"
            + packb("w")
            + msgpack.packb(msgpack.ExtType(TENSOR_EXT, ext_payload))
        )

    odd = body_with(msgpack.packb(["complex64", [1]]) + b"\x00" * 8)
    assert (
        reason_of(raw_envelope(fed["client-000"], "update", odd), fed) is Reason.DTYPE_NOT_ALLOWED
    )
    short = body_with(msgpack.packb(["float32", [4]]) + b"\x00" * 12)
    assert reason_of(raw_envelope(fed["client-000"], "update", short), fed) is Reason.SHAPE_MISMATCH


def test_unsealing_failures(fed, tensors) -> None:  # type: ignore[no-untyped-def]
    ingest = fed["ingest"]
    sealed = _good(fed, tensors, seal_to=ingest.cert)
    assert reason_of(sealed, fed) is Reason.UNSEAL_FAILED  # no key given
    assert reason_of(sealed, fed, kem_key=fed["detector"].kem) is Reason.UNSEAL_FAILED
    # A sealed body lifted into another (validly signed) envelope: the AAD differs.
    body = msgpack.unpackb(sealed)["body"]
    moved = raw_envelope(fed["client-000"], "update", body)
    assert body[0] in (0xC7, 0xC8, 0xC9) and body[body[0] - 0xC7 + 2] == SEALED_EXT
    assert reason_of(moved, fed, kem_key=ingest.kem) is Reason.UNSEAL_FAILED


def test_peek_kind_reads_without_verifying(fed, tensors) -> None:  # type: ignore[no-untyped-def]
    assert peek_kind(_good(fed, tensors)) == "update"
    with pytest.raises(MessageRejected):
        peek_kind(b"\x00")


# --- properties ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_envelope(fed: MemoryFederation) -> bytes:
    return encode(
        "update",
        update_body({"w": np.arange(8, dtype=np.float32)}),
        fed["client-000"],
        job=JOB,
        round=1,
    )


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2048))
def test_random_bytes_to_open_envelope_raise_only_message_rejected(fed, data) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MessageRejected):
        open_envelope(data, fed.trust())


@settings(max_examples=200, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=3),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_mutated_envelopes_raise_only_message_rejected(fed, valid_envelope, edits, cut) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(valid_envelope)
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    try:
        env = open_envelope(bytes(data), fed.trust())
    except MessageRejected:
        return
    # Only an edit that keeps every signed value (e.g. another msgpack int width) may pass.
    orig = open_envelope(valid_envelope, fed.trust())
    assert (env.kind, env.sender, env.job, env.round, env.ts, env.nonce, env.body_digest) == (
        orig.kind,
        orig.sender,
        orig.job,
        orig.round,
        orig.ts,
        orig.nonce,
        orig.body_digest,
    )
