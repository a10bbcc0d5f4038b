"""Chunked envelopes: split, verified reassembly, and every way a chunk is refused."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from qflare.crypto.testing import MemoryFederation, make_federation
from qflare.messages import (
    Limits,
    MessageRejected,
    Reason,
    Reassembler,
    Update,
    encode,
    open_envelope,
    split,
)

JOB = "job-c"


@pytest.fixture(scope="module")
def fed() -> MemoryFederation:
    return make_federation(clients=2)


@pytest.fixture(scope="module")
def envelope(fed: MemoryFederation) -> bytes:
    tensors = {"w": np.random.default_rng(1).standard_normal(50_000).astype(np.float32)}
    return encode(
        "update",
        Update(base_version=0, num_samples=1, tensors=tensors),
        fed["client-000"],
        job=JOB,
        round=2,
    )


def parts(
    fed: MemoryFederation, envelope: bytes, who: str = "client-000", chunk_size: int = 30_000
) -> list[bytes]:
    return list(split(envelope, fed[who], job=JOB, round=2, chunk_size=chunk_size))


def reason(r: Reassembler, data: bytes) -> Reason:
    with pytest.raises(MessageRejected) as exc:
        r.feed(data)
    return exc.value.reason


def test_reassembles_in_order(fed, envelope) -> None:  # type: ignore[no-untyped-def]
    ps = parts(fed, envelope)
    assert len(ps) == 1 + -(-len(envelope) // 30_000)
    r = Reassembler(fed.trust())
    assert r.feed(ps[0]) is None
    chunks = ps[1:]
    out = None
    for i, c in enumerate(chunks):
        out = r.feed(c)
        assert (out is None) == (i < len(chunks) - 1)
    assert bytes(out) == envelope and r.inflight_bytes == 0
    env = open_envelope(out, fed.trust(), max_bytes=Limits().max_body_bytes)
    assert (
        env.body.tensors["w"].tobytes()
        == open_envelope(envelope, fed.trust()).body.tensors["w"].tobytes()
    )


def test_unchunked_messages_pass_through(fed, envelope) -> None:  # type: ignore[no-untyped-def]
    assert Reassembler(fed.trust()).feed(envelope) is envelope


def test_chunk_without_manifest(fed, envelope) -> None:  # type: ignore[no-untyped-def]
    assert reason(Reassembler(fed.trust()), parts(fed, envelope)[1]) is Reason.CHUNK_MISMATCH


def test_duplicate_chunk_and_manifest_drop_the_transfer(fed, envelope) -> None:  # type: ignore[no-untyped-def]
    ps = parts(fed, envelope)
    r = Reassembler(fed.trust())
    r.feed(ps[0])
    assert reason(r, ps[0]) is Reason.DUPLICATE
    assert r.pending == 0 and r.inflight_bytes == 0  # nothing half-built is kept
    assert reason(r, ps[1]) is Reason.CHUNK_MISMATCH  # of no transfer now
    r.feed(ps[0])
    r.feed(ps[1])
    assert reason(r, ps[1]) is Reason.DUPLICATE
    assert r.pending == 0


def test_a_chunk_out_of_order_drops_the_transfer(fed, envelope) -> None:  # type: ignore[no-untyped-def]
    ps = parts(fed, envelope)
    r = Reassembler(fed.trust())
    r.feed(ps[0])
    r.feed(ps[1])
    assert reason(r, ps[3]) is Reason.CHUNK_MISMATCH
    assert r.pending == 0 and r.inflight_bytes == 0


def test_chunk_from_another_sender_or_transfer(fed, envelope) -> None:  # type: ignore[no-untyped-def]
    mine, theirs = parts(fed, envelope), parts(fed, envelope, "client-001")
    r = Reassembler(fed.trust())
    r.feed(mine[0])
    assert reason(r, theirs[1]) is Reason.CHUNK_MISMATCH


def test_chunk_not_matching_manifest_digest(fed, envelope) -> None:  # type: ignore[no-untyped-def]
    # Same sender, two transfers: a chunk re-labelled with the other transfer's id is
    # validly signed but its bytes do not match the manifest entry.
    other = encode(
        "update",
        Update(base_version=0, num_samples=2, tensors={"w": np.ones(50_000, np.float32)}),
        fed["client-000"],
        job=JOB,
        round=2,
    )
    a, b = parts(fed, envelope), parts(fed, other)
    r = Reassembler(fed.trust())
    r.feed(a[0])
    body = msgpack.unpackb(msgpack.unpackb(b[1])["body"])
    transfer = msgpack.unpackb(msgpack.unpackb(a[0])["body"])["transfer"]
    from qflare.messages import Chunk

    forged = encode(
        "chunk",
        Chunk(transfer=transfer, index=0, data=body["data"]),
        fed["client-000"],
        job=JOB,
        round=2,
    )
    assert reason(r, forged) is Reason.BAD_DIGEST


def test_out_of_range_and_wrong_size(fed, envelope) -> None:  # type: ignore[no-untyped-def]
    from qflare.messages import Chunk

    ps = parts(fed, envelope)
    r = Reassembler(fed.trust())
    r.feed(ps[0])
    transfer = msgpack.unpackb(msgpack.unpackb(ps[0])["body"])["transfer"]
    n = len(ps) - 1
    out_of_range = encode(
        "chunk", Chunk(transfer=transfer, index=n, data=b"x"), fed["client-000"], job=JOB, round=2
    )
    assert reason(r, out_of_range) is Reason.CHUNK_MISMATCH
    oversized = encode(
        "chunk",
        Chunk(transfer=transfer, index=0, data=b"x" * 30_001),
        fed["client-000"],
        job=JOB,
        round=2,
    )
    assert reason(r, oversized) is Reason.CHUNK_MISMATCH
    other_round = encode(
        "chunk",
        Chunk(transfer=transfer, index=0, data=b"x" * 30_000),
        fed["client-000"],
        job=JOB,
        round=3,
    )
    assert reason(r, other_round) is Reason.CHUNK_MISMATCH


def test_declared_total_over_limit_is_refused_before_allocation(fed, envelope) -> None:  # type: ignore[no-untyped-def]
    r = Reassembler(fed.trust(), Limits(max_body_bytes=len(envelope) - 1))
    assert reason(r, parts(fed, envelope)[0]) is Reason.TOO_LARGE
    r = Reassembler(fed.trust(), max_inflight_bytes=len(envelope) + 10)
    r.feed(parts(fed, envelope)[0])
    assert reason(r, parts(fed, envelope)[0]) is Reason.TOO_LARGE  # a second transfer


def test_missing_chunk_never_completes_and_expires(fed, envelope) -> None:  # type: ignore[no-untyped-def]
    ps = parts(fed, envelope)
    r = Reassembler(fed.trust(), ttl_s=60)
    for p in ps[:-1]:
        assert r.feed(p) is None
    assert r.inflight_bytes == len(envelope)
    import time

    assert len(r.expire(now=time.monotonic() + 61)) == 1
    assert r.inflight_bytes == 0
    assert reason(r, ps[-1]) is Reason.CHUNK_MISMATCH


def test_forged_chunk_signature(fed, envelope) -> None:  # type: ignore[no-untyped-def]
    ps = parts(fed, envelope)
    r = Reassembler(fed.trust())
    r.feed(ps[0])
    env = msgpack.unpackb(ps[1])
    env["sig"] = bytes(len(env["sig"]))
    assert reason(r, msgpack.packb(env)) is Reason.BAD_SIGNATURE
