"""Chunked transfers read from a job's update stream (issue 12, item 1), on both buses
(memory and RabbitMQ): every way a chunk can be wrong is refused with its reason code and
leaves no partial transfer behind, a forged chunk drops nothing, and a reader that restarts
mid-transfer discards it (or, reading again from the manifest, rebuilds it whole).

Each case writes its messages into the stream as a participant would (``update.<job>`` on
``qflare.client``); a reader hands every delivery, in stream order, to one
:class:`~qflare.messages.Reassembler` and records what it made of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pytest

from qflare.bus import Bus, Delivery, Outcome, topology
from qflare.crypto.testing import MemoryFederation, make_federation
from qflare.messages import Chunk, MessageRejected, Reason, Reassembler, Update, encode, split

JOB = "jc"
CHUNK = 20_000


@pytest.fixture(scope="module")
def fed() -> MemoryFederation:
    return make_federation(clients=2, client_prefix="c")


@pytest.fixture(scope="module")
def envelope(fed: MemoryFederation) -> bytes:
    w = np.random.default_rng(3).standard_normal(30_000).astype(np.float32)
    body = Update(base_version=0, num_samples=5, tensors={"w": w})
    return encode("update", body, fed["c-000"], job=JOB, round=1)


def transfer(fed: MemoryFederation, envelope: bytes, who: str = "c-000") -> list[bytes]:
    """The manifest, then the chunks."""
    return list(split(envelope, fed[who], job=JOB, round=1, chunk_size=CHUNK))


def chunk(fed: MemoryFederation, manifest: bytes, index: int, data: bytes, who: str) -> bytes:
    """A chunk of ``manifest``'s transfer, signed by ``who`` (any index, any bytes)."""
    transfer_id = msgpack.unpackb(msgpack.unpackb(manifest)["body"])["transfer"]
    body = Chunk(transfer=transfer_id, index=index, data=data)
    return encode("chunk", body, fed[who], job=JOB, round=1)


@dataclass
class Reader:
    """What one Reassembler made of each message of the stream, in order."""

    r: Reassembler
    seen: list[tuple[str, Any]] = field(default_factory=list)

    async def __call__(self, delivery: Delivery) -> Outcome:
        try:
            out = self.r.feed(delivery.body)
        except MessageRejected as exc:
            self.seen.append(("rejected", exc.reason))
        else:
            self.seen.append(("done", bytes(out)) if out is not None else ("part", None))
        return Outcome.ACK


async def read(
    bus: Bus,
    messages: list[bytes],
    fed: MemoryFederation,
    wait_for: Callable[..., Awaitable[Any]],
    *,
    skip: int = 0,
) -> Reader:
    """Write ``messages`` into a fresh stream and read it from message ``skip`` on."""
    stream = topology.update_stream(JOB)
    await bus.declare_stream(stream)
    offsets: list[int] = []

    async def tap(d: Delivery) -> Outcome:
        assert d.offset is not None
        offsets.append(d.offset)
        return Outcome.ACK

    tapper = await bus.read_stream(stream.name, tap, offset="next")
    for data in messages:
        await bus.publish(topology.CLIENT, f"update.{JOB}", data)
    await wait_for(lambda: len(offsets) == len(messages), 20, message="the messages written")
    await tapper.cancel()
    reader = Reader(Reassembler(fed.trust(), ttl_s=60))
    sub = await bus.read_stream(stream.name, reader, offset=offsets[skip])
    await wait_for(lambda: len(reader.seen) == len(messages) - skip, 20, message="the reader")
    await sub.cancel()
    await bus.delete_stream(stream.name)
    return reader


async def test_a_whole_transfer_in_order_is_rebuilt(
    fed: MemoryFederation, envelope: bytes, bus: Bus, wait_for: Callable[..., Awaitable[Any]]
) -> None:
    msgs = transfer(fed, envelope)
    reader = await read(bus, msgs, fed, wait_for)
    assert reader.seen[-1] == ("done", envelope)
    assert [k for k, _v in reader.seen[:-1]] == ["part"] * (len(msgs) - 1)
    assert reader.r.pending == 0


def _cases(fed: MemoryFederation, envelope: bytes) -> dict[str, tuple[list[bytes], Reason]]:
    """Each case: the stream's messages, and the refusal the bad one gets."""
    m = transfer(fed, envelope)
    last = len(m) - 1  # the chunks are m[1..last], index 0..last-1
    return {
        "reordered": ([m[0], m[1], m[3], m[2]], Reason.CHUNK_MISMATCH),
        "duplicated": ([m[0], m[1], m[1]], Reason.DUPLICATE),
        "surplus": ([*m[:-1], chunk(fed, m[0], last, b"x", "c-000")], Reason.CHUNK_MISMATCH),
        "oversized": (
            [m[0], chunk(fed, m[0], 0, b"x" * (CHUNK + 1), "c-000")],
            Reason.CHUNK_MISMATCH,
        ),
        "wrong bytes": ([m[0], chunk(fed, m[0], 0, b"y" * CHUNK, "c-000")], Reason.BAD_DIGEST),
        "no manifest": ([m[2]], Reason.CHUNK_MISMATCH),
        "manifest twice": ([m[0], m[1], m[0]], Reason.DUPLICATE),
    }


@pytest.mark.parametrize(
    "case",
    [
        "reordered",
        "duplicated",
        "surplus",
        "oversized",
        "wrong bytes",
        "no manifest",
        "manifest twice",
    ],
)
async def test_a_wrong_chunk_is_refused_and_leaves_nothing_behind(
    case: str,
    fed: MemoryFederation,
    envelope: bytes,
    bus: Bus,
    wait_for: Callable[..., Awaitable[Any]],
) -> None:
    msgs, why = _cases(fed, envelope)[case]
    reader = await read(bus, msgs, fed, wait_for)
    assert reader.seen[-1] == ("rejected", why), reader.seen
    assert all(kind != "done" for kind, _v in reader.seen)
    # the sender's transfer is dropped whole: no bytes held, nothing to complete later
    assert reader.r.pending == 0 and reader.r.inflight_bytes == 0


async def test_a_forged_chunk_drops_nothing(
    fed: MemoryFederation, envelope: bytes, bus: Bus, wait_for: Callable[..., Awaitable[Any]]
) -> None:
    """A chunk claiming the sender's transfer under a key the CA never issued, and one whose
    bytes were changed in flight, name no one: the honest transfer completes."""
    m = transfer(fed, envelope)
    forger = make_federation(clients=1, services=(), client_prefix="c")  # another CA, c-000
    transfer_id = msgpack.unpackb(msgpack.unpackb(m[0])["body"])["transfer"]
    forged = encode(
        "chunk", Chunk(transfer=transfer_id, index=0, data=b"z"), forger["c-000"], job=JOB, round=1
    )
    tampered = bytearray(m[1])
    tampered[-3] ^= 0x01
    reader = await read(bus, [m[0], forged, bytes(tampered), *m[1:]], fed, wait_for)
    assert reader.seen[1] == ("rejected", Reason.UNKNOWN_SIGNER)
    assert reader.seen[2] == ("rejected", Reason.BAD_DIGEST)
    assert reader.seen[-1] == ("done", envelope)
    assert reader.r.pending == 0


async def test_a_missing_chunk_is_caught_by_the_next_one(
    fed: MemoryFederation, envelope: bytes, bus: Bus, wait_for: Callable[..., Awaitable[Any]]
) -> None:
    m = transfer(fed, envelope)
    reader = await read(bus, [m[0], m[1], *m[3:]], fed, wait_for)
    assert reader.seen[2] == ("rejected", Reason.CHUNK_MISMATCH)  # index 2 came before 1
    assert all(kind != "done" for kind, _v in reader.seen)
    assert reader.r.pending == 0


async def test_a_restarted_reader_discards_or_rebuilds(
    fed: MemoryFederation, envelope: bytes, bus: Bus, wait_for: Callable[..., Awaitable[Any]]
) -> None:
    """A reader that restarts after the manifest refuses every chunk of the transfer (never
    half-used); one that reads again from the manifest rebuilds the envelope whole."""
    m = transfer(fed, envelope)
    late = await read(bus, m, fed, wait_for, skip=2)
    assert late.seen == [("rejected", Reason.CHUNK_MISMATCH)] * (len(m) - 2)
    assert late.r.pending == 0
    again = await read(bus, m, fed, wait_for, skip=0)
    assert again.seen[-1] == ("done", envelope)


async def test_a_sender_that_stops_is_dropped_after_its_ttl(
    fed: MemoryFederation, envelope: bytes, bus: Bus, wait_for: Callable[..., Awaitable[Any]]
) -> None:
    m = transfer(fed, envelope)
    reader = await read(bus, m[:-1], fed, wait_for)  # the sender crashed before its last chunk
    assert reader.r.pending == 1
    loop = asyncio.get_running_loop()
    assert len(reader.r.expire(now=loop.time() + 10_000)) == 1
    assert reader.r.pending == 0 and reader.r.inflight_bytes == 0
