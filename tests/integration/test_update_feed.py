"""The read-ahead of a job's update stream (qflare.runtime.updates.UpdateFeed) follows the
verdicts past a flood, on both buses (memory and RabbitMQ).

Honest updates lie in the stream with thousands of garbage messages between them, as a
flooding participant would write them. A read-ahead far behind an offset a verdict names
jumps to it instead of delivering every message in between, reads the vouched updates it
jumped over one by one, and still hands the sink every wanted update; ``fetch`` reads
far-apart offsets apart. Counted here: the deliveries each reader took.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from qflare.bus import Bus, BusUnavailable, Delivery, Outcome, topology
from qflare.crypto.testing import MemoryFederation, make_federation
from qflare.messages import Update, encode
from qflare.messages.envelope import peek_header
from qflare.runtime import updates
from qflare.runtime.updates import READ_AHEAD_MAX_LAG, Ref, StreamUpdate, UpdateFeed, _runs

JOB = "jf"
GARBAGE = 3 * READ_AHEAD_MAX_LAG


@pytest.fixture(scope="module")
def fed() -> MemoryFederation:
    return make_federation(clients=5, client_prefix="c")


def update(fed: MemoryFederation, client: str) -> bytes:
    body = Update(base_version=0, num_samples=3, tensors={"w": np.full(4, 0.5, np.float32)})
    return encode("update", body, fed[client], job=JOB, round=1, seal_to=[fed["aggregator"].cert])


def counted(bus: Bus, deliveries: list[int], flow: asyncio.Event, free: int) -> None:
    """Count every delivery any reader of ``bus`` takes (offsets, in order); after the
    first ``free`` ones, each waits for ``flow`` (a reader slower than the writer)."""
    real = bus.read_stream

    async def read_stream(stream: Any, handler: Any, **kw: Any) -> Any:
        async def take(delivery: Delivery) -> Outcome:
            assert delivery.offset is not None
            deliveries.append(delivery.offset)
            if len(deliveries) > free:
                await flow.wait()
            await asyncio.sleep(0)  # a delivery comes from the network, not in a tight loop
            result: Outcome = await handler(delivery)
            return result

        return await real(stream, take, **kw)

    bus.read_stream = read_stream  # type: ignore[method-assign]


def aggregator_feed(bus: Bus, fed: MemoryFederation, kept: dict[str, StreamUpdate]) -> UpdateFeed:
    """The aggregator's feed of round 1, keeping each update it reads in ``kept``."""

    async def sink(u: StreamUpdate) -> None:
        kept[u.client] = u

    return UpdateFeed(
        bus,
        JOB,
        trust=fed.trust(),
        kem_key=fed["aggregator"].kem,
        wants=lambda round_no, sender: round_no == 1,
        sink=sink,
    )


async def write(bus: Bus, messages: list[bytes]) -> None:
    for data in messages:
        await bus.publish(topology.CLIENT, f"update.{JOB}", data)


async def written(
    bus: Bus, count: int, wait_for: Callable[..., Awaitable[Any]]
) -> list[tuple[int, bytes]]:
    """The first ``count`` messages of the job's update stream: (offset, body)."""
    tap: list[tuple[int, bytes]] = []

    async def on_tap(d: Delivery) -> Outcome:
        assert d.offset is not None
        tap.append((d.offset, d.body))
        return Outcome.ACK

    tapper = await bus.read_stream(topology.update_stream(JOB).name, on_tap, offset="first")
    await wait_for(lambda: len(tap) == count, 30, message="the tap")
    await tapper.cancel()
    return tap


async def test_a_lagging_read_ahead_jumps_to_the_vouched_offsets(
    fed: MemoryFederation,
    bus: Bus,
    wait_for: Callable[..., Awaitable[Any]],
) -> None:
    await bus.declare_stream(topology.update_stream(JOB))
    honest = {c: update(fed, c) for c in fed.clients}
    garbage = [b"\x93garbage %d" % i for i in range(GARBAGE)]
    # c-000 c-001 | garbage | c-002 | garbage | c-003 c-004
    stream = [
        honest["c-000"],
        honest["c-001"],
        *garbage,
        honest["c-002"],
        *garbage,
        honest["c-003"],
        honest["c-004"],
    ]
    await write(bus, stream)
    offsets: dict[str, int] = {}
    tap = await written(bus, len(stream), wait_for)
    for offset, data in tap:
        if data in honest.values():
            offsets[peek_header(data).sender] = offset
    assert len(offsets) == 5

    deliveries: list[int] = []
    flow = asyncio.Event()
    counted(bus, deliveries, flow, free=3)  # the read-ahead stalls in the first garbage
    kept: dict[str, StreamUpdate] = {}
    feed = aggregator_feed(bus, fed, kept)
    await feed.start(offsets["c-000"])
    await wait_for(lambda: len(deliveries) > 3, 10, message="the read-ahead's start")
    far = offsets["c-003"]
    assert not feed.passed(far)
    feed.vouched(Ref("c-003", b"", far))
    await wait_for(lambda: (feed.next_offset or 0) >= far, 10, message="the jump")
    flow.set()
    # vouched after the jump, inside the range it jumped over: read on its own
    feed.vouched(Ref("c-002", b"", offsets["c-002"]))
    assert await feed.wait_past(offsets["c-004"], timeout=20)
    await wait_for(lambda: len(kept) == 5, 20, message="every update in the sink")
    await feed.stop()
    assert {c: u.offset for c, u in kept.items()} == offsets
    # it did not deliver the garbage between c-000 and c-003
    assert len(deliveries) < GARBAGE, len(deliveries)

    # fetch reads far-apart offsets apart, not the flood between them
    deliveries.clear()
    refs = [Ref(c, kept[c].digest, o) for c, o in offsets.items()]
    got = await feed.fetch(1, refs)
    assert {c: u.offset for c, u in got.items()} == offsets
    assert all(np.array_equal(u.tensors["w"], np.full(4, 0.5, np.float32)) for u in got.values())
    assert len(deliveries) < GARBAGE, len(deliveries)


def test_runs_cut_where_offsets_lie_far_apart() -> None:
    refs = [Ref(str(o), b"", o) for o in (1, 2, 300, 301, 900)]
    assert [[r.offset for r in run] for run in _runs(refs, 256)] == [[1, 2], [300, 301], [900]]
    assert _runs([], 256) == []


async def test_a_read_ahead_stops_in_a_flood_until_a_verdict_points_past_it(
    fed: MemoryFederation,
    bus: Bus,
    wait_for: Callable[..., Awaitable[Any]],
) -> None:
    """In order, the read-ahead reads READ_AHEAD_MAX_LAG messages without keeping an update
    (garbage, and forgeries whose headers claim a participant of the round), then stops;
    the verdict for the update behind the flood moves it on, there."""
    await bus.declare_stream(topology.update_stream(JOB))
    deliveries: list[int] = []
    flow = asyncio.Event()
    flow.set()
    counted(bus, deliveries, flow, free=0)
    kept: dict[str, StreamUpdate] = {}
    feed = aggregator_feed(bus, fed, kept)
    await feed.start("next")
    forger = make_federation(clients=2, services=("aggregator",), client_prefix="c")  # another CA
    forged = update(forger, "c-001")
    flood = [forged if i % 10 == 0 else b"\x93flood %d" % i for i in range(GARBAGE)]
    await write(bus, [update(fed, "c-000"), *flood])
    await write(bus, [update(fed, "c-001")])
    await wait_for(lambda: "c-000" in kept, 10, message="the update before the flood")
    await wait_for(lambda: feed._stopped, 10, message="the read-ahead stopping")
    first = kept["c-000"].offset
    behind = first + GARBAGE + 1
    assert not await feed.wait_past(behind, timeout=5)  # at once: it does not move by itself
    read = len(deliveries)
    assert read <= READ_AHEAD_MAX_LAG + 16, read
    feed.vouched(Ref("c-001", b"", behind))
    await wait_for(lambda: "c-001" in kept, 10, message="the update behind the flood")
    assert await feed.wait_past(behind, timeout=5)
    await feed.stop()
    assert kept["c-001"].offset == behind
    assert len(deliveries) - read <= 16, len(deliveries) - read


async def test_a_feed_that_jumps_again_and_again_remembers_only_the_latest_ranges(
    fed: MemoryFederation,
    bus: Bus,
    wait_for: Callable[..., Awaitable[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every jump remembers the range it passed over, for a verdict naming an offset in it
    later; a feed jumps for the whole job, so it keeps only the latest
    MAX_SKIPPED_RANGES. An update in a remembered range is still read on its own when it is
    vouched for; one in a forgotten range is the verdict's fetch to read."""
    monkeypatch.setattr(updates, "READ_AHEAD_MAX_LAG", 4)
    monkeypatch.setattr(updates, "MAX_SKIPPED_RANGES", 3)
    await bus.declare_stream(topology.update_stream(JOB))
    jumps = 8
    # a block: the update a verdict points a jump at, garbage, an update jumped over, garbage
    block = [b"target", b"\x93g", b"\x93g", b"\x93g", b"inner", b"\x93g", b"\x93g", b"\x93g"]
    messages = [
        update(fed, "c-000") if m == b"target" else update(fed, "c-001") if m == b"inner" else m
        for _ in range(jumps + 1)
        for m in block
    ]
    await write(bus, messages)
    tap = await written(bus, len(messages), wait_for)
    targets = [o for o, _ in tap[:: len(block)]]
    inner = [(o, data) for o, data in tap[block.index(b"inner") :: len(block)]]

    deliveries: list[int] = []
    flow = asyncio.Event()
    counted(bus, deliveries, flow, free=1)  # past the first message, every reader stalls
    kept: dict[int, StreamUpdate] = {}

    async def sink(u: StreamUpdate) -> None:
        kept[u.offset] = u

    feed = UpdateFeed(
        bus,
        JOB,
        trust=fed.trust(),
        kem_key=fed["aggregator"].kem,
        wants=lambda round_no, sender: round_no == 1,
        sink=sink,
    )
    await feed.start(targets[0])
    await wait_for(lambda: feed.next_offset == targets[0] + 2, 10, message="the first stall")
    for target in targets[1:]:
        feed.vouched(Ref("c-000", b"", target))
        # the new reader stalls on the target, handed over: the next jump starts after it
        await wait_for(lambda t=target: feed.next_offset == t + 1, 10, message="a jump")
    jumped = [
        (targets[0] + 2, targets[1]),
        *((a + 1, b) for a, b in itertools.pairwise(targets[1:])),
    ]
    assert len(jumped) == jumps
    assert list(feed._skipped) == jumped[-3:]
    flow.set()

    # vouched in the latest range: read on its own, as before
    latest, data = inner[-2]
    assert jumped[-1][0] <= latest < jumped[-1][1]
    feed.vouched(Ref("c-001", peek_header(data).body_digest, latest))
    await wait_for(lambda: latest in kept, 20, message="the update read on its own")
    # vouched in a forgotten range: the read-ahead has passed it; fetch reads it
    oldest, data = inner[0]
    assert jumped[0][0] <= oldest < jumped[0][1]
    assert await feed.wait_past(oldest, timeout=20)
    digest = peek_header(data).body_digest
    got = await feed.fetch(1, [Ref("c-001", digest, oldest)])
    assert got["c-001"].offset == oldest and got["c-001"].digest == digest
    await feed.stop()


async def test_jumped_ranges_that_touch_are_remembered_as_one(
    fed: MemoryFederation, memory_bus: Bus
) -> None:
    """A jump made before the new reader handed anything over starts where the last one
    ended: one range, not two."""
    feed = aggregator_feed(memory_bus, fed, {})
    for start, end in ((2, 8), (8, 16), (17, 30), (30, 31)):
        feed._skip(start, end)
    assert list(feed._skipped) == [(2, 16), (17, 31)]


async def test_fetch_hands_each_update_to_a_sink_and_raises_what_it_raises(
    fed: MemoryFederation, bus: Bus
) -> None:
    """With ``sink`` each update goes to it as it is read and comes back without its
    tensors (one update's tensors in memory at a time); what the sink raises stops the
    read and is raised by fetch, not left to a timeout."""
    await bus.declare_stream(topology.update_stream(JOB))
    await write(bus, [update(fed, c) for c in fed.clients])
    kept: dict[str, StreamUpdate] = {}
    feed = aggregator_feed(bus, fed, kept)
    await feed.start(0)
    assert await feed.wait_past(len(fed.clients) - 1, timeout=20)
    await feed.stop()
    refs = [Ref(c, kept[c].digest, kept[c].offset) for c in fed.clients]
    sunk: list[StreamUpdate] = []

    async def sink(u: StreamUpdate) -> None:
        assert np.array_equal(u.tensors["w"], np.full(4, 0.5, np.float32))
        sunk.append(u)

    got = await feed.fetch(1, refs, sink=sink)
    assert sorted(u.client for u in sunk) == sorted(fed.clients)
    assert sorted(got) == sorted(fed.clients) and all(u.tensors == {} for u in got.values())
    assert {c: u.digest for c, u in got.items()} == {r.client: r.digest for r in refs}

    async def refuse(u: StreamUpdate) -> None:
        raise ValueError(f"no room for {u.client}")

    # without it, the read would end at its timeout and fetch raise UpdateNotFound
    with pytest.raises(ValueError, match="no room"):
        await feed.fetch(1, refs, timeout=5.0, sink=refuse)


async def test_a_feed_whose_first_read_fails_reads_in_the_background(
    fed: MemoryFederation, bus: Bus, wait_for: Callable[..., Awaitable[Any]]
) -> None:
    """The stream exists but reading it fails at ``start`` (the broker away for longer than
    the bus retries an attach): ``start`` returns, the feed tries again in the background
    and reads what was written since the call. Before, ``start`` raised while the service
    kept the feed registered, so the job's updates were never read ahead."""
    await bus.declare_stream(topology.update_stream(JOB))
    real = bus.read_stream
    failures = [BusUnavailable("the broker is away")]

    async def flaky(stream: Any, handler: Any, **kw: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real(stream, handler, **kw)

    bus.read_stream = flaky  # type: ignore[method-assign]
    kept: dict[str, StreamUpdate] = {}
    feed = aggregator_feed(bus, fed, kept)
    await feed.start("next")
    assert not failures, "start read once and failed"
    await write(bus, [update(fed, c) for c in fed.clients])  # before the retry attaches
    try:
        await wait_for(lambda: len(kept) == len(fed.clients), 20, message=f"kept {sorted(kept)}")
    finally:
        await feed.stop()
