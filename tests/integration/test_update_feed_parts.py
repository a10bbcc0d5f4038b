"""Updates sent in parts (``update.manifest`` + ``update.part``, messages/parts.py) read from
a job's update stream by qflare.runtime.updates.UpdateFeed, on both buses (memory and
RabbitMQ): read ahead and fetched into the rows of a round's matrix part by part, bit for
bit the rows of the same updates sent whole, with other senders' messages between the
parts; never whole in the sink; a missing or tampered part leaves no row held."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from test_update_feed import JOB, counted, write, written

from qflare.bus import Bus, topology
from qflare.crypto.testing import MemoryFederation, make_federation
from qflare.messages import Update, encode, open_envelope
from qflare.messages.bodies import UpdatePart
from qflare.messages.envelope import peek_header
from qflare.messages.parts import encode_update_parts
from qflare.messages.tensors import RoundRows
from qflare.runtime import updates
from qflare.runtime.updates import (
    PartWriter,
    Ref,
    StreamUpdate,
    UpdateFeed,
    UpdateNotFound,
    into_rows,
)

CLIENTS = ("c-000", "c-001", "c-002")
PART_VALUES = 8  # 44 values: 6 parts, the last of 4


@pytest.fixture(scope="module")
def fed() -> MemoryFederation:
    return make_federation(clients=len(CLIENTS), client_prefix="c")


def tensors(client: str) -> dict[str, np.ndarray]:
    v = np.random.default_rng(int(client[2:])).standard_normal(44).astype(np.float32)
    return {"w": v[:35].reshape(5, 7), "b": v[35:]}


def whole(fed: MemoryFederation, client: str) -> bytes:
    body = Update(base_version=0, num_samples=3, tensors=tensors(client))
    return encode("update", body, fed[client], job=JOB, round=1, seal_to=[fed["aggregator"].cert])


def parted(fed: MemoryFederation, client: str) -> list[bytes]:
    """The client's update in parts: its manifest, then its parts."""
    return list(
        encode_update_parts(
            fed[client],
            tensors(client),
            job=JOB,
            round=1,
            base_version=0,
            num_samples=3,
            seal_to=[fed["aggregator"].cert],
            part_values=PART_VALUES,
        )
    )


def interleave(*streams: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for i in range(max(len(s) for s in streams)):
        out.extend(s[i] for s in streams if i < len(s))
    return out


def one_message_rows(clients: tuple[str, ...] = CLIENTS) -> np.ndarray:
    """The rows the same updates sent whole give (the one-message path)."""
    rows = RoundRows(len(CLIENTS), CLIENTS)
    refs = []
    for c in clients:
        ref = (c, b"whole")
        rows.add(ref, tensors(c))
        refs.append(ref)
    return np.array(rows.matrix(refs)[1])


class Spy:
    """A writer that records the size of every write."""

    def __init__(self, writer: PartWriter, sizes: list[int]) -> None:
        self.writer, self.sizes = writer, sizes

    def write(self, start: int, values: Any) -> bool:
        self.sizes.append(int(values.size))
        return self.writer.write(start, values)

    def commit(self) -> bool:
        return self.writer.commit()

    def abort(self) -> None:
        self.writer.abort()


class Reader:
    """A service's side of a feed: the round's rows, and what its sink was handed."""

    def __init__(self) -> None:
        self.rows = RoundRows(len(CLIENTS), CLIENTS)
        self.seen: list[StreamUpdate] = []
        self.sizes: list[int] = []

    async def sink(self, u: StreamUpdate) -> PartWriter | None:
        self.seen.append(u)
        writer = await into_rows(self.rows, u)
        return None if writer is None else Spy(writer, self.sizes)

    def feed(self, bus: Bus, fed: MemoryFederation) -> UpdateFeed:
        return UpdateFeed(
            bus,
            JOB,
            trust=fed.trust(),
            kem_key=fed["aggregator"].kem,
            wants=lambda round_no, sender: round_no == 1,
            sink=self.sink,
        )

    def matrix(self, refs: list[Ref]) -> np.ndarray:
        return np.array(self.rows.matrix([(r.client, r.digest) for r in refs])[1])

    def assert_never_whole(self) -> None:
        """No update in parts reached the sink with tensors; no write was over a part."""
        for u in self.seen:
            assert u.layout is None or u.tensors == {}, u.client
        assert self.sizes and max(self.sizes) <= PART_VALUES


async def lay_out(
    bus: Bus, messages: list[bytes], wait_for: Callable[..., Awaitable[Any]]
) -> dict[bytes, int]:
    """Write ``messages`` into the job's update stream; the offset of each."""
    await write(bus, messages)
    return {data: offset for offset, data in await written(bus, len(messages), wait_for)}


def ref_of(data: bytes, offsets: dict[bytes, int]) -> Ref:
    head = peek_header(data)
    return Ref(head.sender, head.body_digest, offsets[data])


async def test_updates_in_parts_are_read_ahead_and_fetched_into_the_rows_of_whole_ones(
    fed: MemoryFederation, bus: Bus, wait_for: Callable[..., Awaitable[Any]]
) -> None:
    """Two senders' parts interleaved, with garbage and a third sender's one-message update
    between them: the read-ahead, once it passed the manifests' offsets, holds each row
    complete, and fetch (with a sink, and without) reads the same; the sink never gets an
    update in parts whole, and no write is larger than a part."""
    await bus.declare_stream(topology.update_stream(JOB))
    a, b = parted(fed, "c-000"), parted(fed, "c-001")
    c = whole(fed, "c-002")
    noise = [b"\x93garbage %d" % i for i in range(len(a))]
    stream = interleave(a, noise, b)
    stream.insert(5, c)
    offsets = await lay_out(bus, stream, wait_for)
    refs = [ref_of(a[0], offsets), ref_of(b[0], offsets), ref_of(c, offsets)]

    ahead = Reader()
    feed = ahead.feed(bus, fed)
    await feed.start(0)
    assert await feed.wait_past(max(r.offset for r in refs), timeout=20)
    assert all((r.client, r.digest) in ahead.rows for r in refs)  # no polling: passed
    await feed.stop()
    assert ahead.matrix(refs).tobytes() == one_message_rows().tobytes()
    ahead.assert_never_whole()
    assert {u.client for u in ahead.seen if u.layout is not None} == {"c-000", "c-001"}

    again = Reader()
    got = await again.feed(bus, fed).fetch(1, refs, timeout=20, sink=again.sink)
    assert sorted(got) == list(CLIENTS) and all(u.tensors == {} for u in got.values())
    assert {c: u.digest for c, u in got.items()} == {r.client: r.digest for r in refs}
    assert again.matrix(refs).tobytes() == one_message_rows().tobytes()
    again.assert_never_whole()

    plain = await Reader().feed(bus, fed).fetch(1, refs, timeout=20)  # no sink: whole
    for client in CLIENTS:
        for name, t in tensors(client).items():
            assert plain[client].tensors[name].tobytes() == t.tobytes(), (client, name)
    assert plain["c-000"].num_samples == 3 and plain["c-000"].offset == refs[0].offset


async def test_a_missing_part_is_update_not_found_and_holds_no_row(
    fed: MemoryFederation, bus: Bus, wait_for: Callable[..., Awaitable[Any]]
) -> None:
    await bus.declare_stream(topology.update_stream(JOB))
    a, b = parted(fed, "c-000"), parted(fed, "c-001")
    del a[3]  # part 2 of c-000 never written
    offsets = await lay_out(bus, interleave(a, b), wait_for)
    refs = [ref_of(a[0], offsets), ref_of(b[0], offsets)]

    ahead = Reader()
    feed = ahead.feed(bus, fed)
    await feed.start(0)
    assert await feed.wait_past(max(offsets.values()), timeout=20)
    await feed.stop()
    assert ("c-001", refs[1].digest) in ahead.rows
    assert ("c-000", refs[0].digest) not in ahead.rows and not ahead.rows._partial

    again = Reader()
    with pytest.raises(UpdateNotFound, match=r"c-000.*parts 2\.\.5"):
        await again.feed(bus, fed).fetch(1, refs, timeout=3, sink=again.sink)
    assert ("c-000", refs[0].digest) not in again.rows and not again.rows._partial


@pytest.mark.parametrize("how", ["forged-before-the-real-one", "re-signed-instead"])
async def test_a_tampered_part_never_lands_in_a_row_as_complete(
    fed: MemoryFederation, bus: Bus, wait_for: Callable[..., Awaitable[Any]], how: str
) -> None:
    """A part whose signature does not verify (another CA's key claiming the sender) placed
    before the real part changes nothing: the row is the real update's. A part the sender
    itself signed over other values than its manifest names replaces the real one: the
    update is never held, read ahead or fetched."""
    await bus.declare_stream(topology.update_stream(JOB))
    a = parted(fed, "c-000")
    transfer = open_envelope(a[0], fed.trust(), kem_key=fed["aggregator"].kem).body.transfer
    bad = UpdatePart(transfer=transfer, index=1, values=np.ones(PART_VALUES, np.float32))
    if how == "forged-before-the-real-one":
        forger = make_federation(clients=1, services=("aggregator",), client_prefix="c")
        forged = encode("update.part", bad, forger["c-000"], job=JOB, round=1)
        stream = [*a[:2], forged, *a[2:]]
    else:
        signed = encode(
            "update.part", bad, fed["c-000"], job=JOB, round=1, seal_to=[fed["aggregator"].cert]
        )
        stream = [*a[:2], signed, *a[3:]]
    offsets = await lay_out(bus, stream, wait_for)
    refs = [ref_of(a[0], offsets)]
    held = how == "forged-before-the-real-one"

    ahead = Reader()
    feed = ahead.feed(bus, fed)
    await feed.start(0)
    assert await feed.wait_past(max(offsets.values()), timeout=20)
    await feed.stop()
    assert (refs[0].client, refs[0].digest) in ahead.rows if held else len(ahead.rows) == 0
    assert not ahead.rows._partial

    again = Reader()
    fetch = again.feed(bus, fed).fetch(1, refs, timeout=3, sink=again.sink)
    if held:
        await fetch
        for r in (ahead, again):
            assert r.matrix(refs).tobytes() == one_message_rows(("c-000",)).tobytes()
    else:
        with pytest.raises(UpdateNotFound, match="c-000"):
            await fetch
        assert len(again.rows) == 0 and not again.rows._partial


async def test_the_read_ahead_passes_an_update_in_parts_only_with_its_last_part(
    fed: MemoryFederation, bus: Bus, wait_for: Callable[..., Awaitable[Any]]
) -> None:
    """The vouched offset is the manifest's, its parts lie after it: until the last part is
    in, the read-ahead has not passed the manifest's offset (a verdict waits, rather than
    reading the update again)."""
    await bus.declare_stream(topology.update_stream(JOB))
    a = parted(fed, "c-000")
    offsets = await lay_out(bus, a[:3], wait_for)
    ref = ref_of(a[0], offsets)
    ahead = Reader()
    feed = ahead.feed(bus, fed)
    await feed.start(0)
    await wait_for(
        lambda: (feed.next_offset or 0) > max(offsets.values()) and not feed._pending,
        20,
        message="the first parts read",
    )
    assert not feed.passed(ref.offset)
    assert not await feed.wait_past(ref.offset, timeout=0.5)
    assert (ref.client, ref.digest) not in ahead.rows
    await write(bus, a[3:])
    assert await feed.wait_past(ref.offset, timeout=20)
    assert (ref.client, ref.digest) in ahead.rows
    await feed.stop()
    assert ahead.matrix([ref]).tobytes() == one_message_rows(("c-000",)).tobytes()


async def test_a_manifest_the_read_ahead_jumps_over_is_read_alone_with_its_parts(
    fed: MemoryFederation,
    bus: Bus,
    wait_for: Callable[..., Awaitable[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read-ahead far behind a vouched offset jumps to it; a vouched manifest in the
    range it jumped over is read on its own, with its parts after it, into its row."""
    monkeypatch.setattr(updates, "READ_AHEAD_MAX_LAG", 4)
    await bus.declare_stream(topology.update_stream(JOB))
    a, c = parted(fed, "c-000"), whole(fed, "c-002")
    flood = [b"\x93flood %d" % i for i in range(20)]
    offsets = await lay_out(bus, [*flood[:10], *a, *flood[10:], c], wait_for)
    refs = [ref_of(a[0], offsets), ref_of(c, offsets)]
    deliveries: list[int] = []
    flow = asyncio.Event()
    counted(bus, deliveries, flow, free=3)  # the read-ahead stalls in the first flood
    ahead = Reader()
    feed = ahead.feed(bus, fed)
    await feed.start(0)
    await wait_for(lambda: len(deliveries) > 3, 10, message="the read-ahead's start")
    feed.vouched(refs[1])
    await wait_for(lambda: (feed.next_offset or 0) >= refs[1].offset, 10, message="the jump")
    flow.set()
    feed.vouched(refs[0])  # in the range jumped over: read on its own
    assert await feed.wait_past(refs[1].offset, timeout=20)
    assert all((r.client, r.digest) in ahead.rows for r in refs)
    await feed.stop()
    assert ahead.matrix(refs[:1]).tobytes() == one_message_rows(("c-000",)).tobytes()
    ahead.assert_never_whole()
