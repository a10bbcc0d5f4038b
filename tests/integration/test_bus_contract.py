"""One contract for the transport port, run against the in-memory bus and RabbitMQ.

Each test gets a fresh prefix, so queue names below are local to the test.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
from collections import Counter

import pytest

from qflare.bus import (
    Bus,
    BusClosed,
    Delivery,
    InvalidHeaders,
    MessageTooLarge,
    Outcome,
    QueueSpec,
    StreamNotFound,
    StreamSpec,
    TopologyError,
    topology,
)
from qflare.bus.topology import ALERTS, BROADCAST, CLIENT, DEAD, EVENTS


class Recorder:
    """A handler that records deliveries and answers with a fixed outcome."""

    def __init__(self, outcome: Outcome = Outcome.ACK) -> None:
        self.outcome = outcome
        self.seen: list[Delivery] = []
        self.changed = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> Outcome:
        self.seen.append(delivery)
        self.changed.set()
        return self.outcome

    @property
    def bodies(self) -> list[bytes]:
        return [d.body for d in self.seen]


async def test_exchanges_are_declared_idempotently(bus: Bus, bus_factory, wait_for) -> None:
    again = await bus_factory()  # declares the same exchanges a second time
    rec = Recorder()
    spec = QueueSpec("all", bindings=tuple((e, "#") for e in (CLIENT, EVENTS, BROADCAST, ALERTS)))
    await again.consume(spec, rec)
    for exchange in (CLIENT, EVENTS, BROADCAST, ALERTS, DEAD):
        await bus.publish(exchange, "x.y", exchange.encode())
    await wait_for(lambda: len(rec.seen) == 4)
    assert sorted(rec.bodies) == sorted(e.encode() for e in (CLIENT, EVENTS, BROADCAST, ALERTS))
    assert {d.exchange for d in rec.seen} == {CLIENT, EVENTS, BROADCAST, ALERTS}


async def test_topic_wildcards(bus: Bus, wait_for) -> None:
    rec = Recorder()
    await bus.consume(
        QueueSpec("wild", bindings=((EVENTS, "round.*"), (EVENTS, "alert.#.job1"))), rec
    )
    keys = [
        "round.opened",
        "round.closed.x",
        "round",
        "alert.job1",
        "alert.hi.kind.job1",
        "alert.job2",
        "other",
    ]
    routed = {k: await bus.publish(EVENTS, k, k.encode()) for k in keys}
    await bus.publish(EVENTS, "round.end", b"end")
    await wait_for(lambda: b"end" in rec.bodies)
    assert sorted(rec.bodies) == sorted(
        [b"round.opened", b"alert.job1", b"alert.hi.kind.job1", b"end"]
    )
    assert routed == {
        "round.opened": True,
        "round.closed.x": False,
        "round": False,
        "alert.job1": True,
        "alert.hi.kind.job1": True,
        "alert.job2": False,
        "other": False,
    }


async def test_competing_consumers_share_a_queue(bus: Bus, bus_factory, wait_for) -> None:
    other = await bus_factory()
    spec = QueueSpec("work", bindings=((CLIENT, "update.#"),))
    a, b = Recorder(), Recorder()
    await bus.consume(spec, a, prefetch=1)
    await other.consume(spec, b, prefetch=1)
    n = 40
    await asyncio.gather(*(bus.publish(CLIENT, "update.j1", str(i).encode()) for i in range(n)))
    await wait_for(lambda: len(a.seen) + len(b.seen) == n)
    assert sorted(a.bodies + b.bodies) == sorted(str(i).encode() for i in range(n))
    assert a.seen and b.seen, "both consumers should get a share"


async def test_fan_out_to_every_bound_queue(bus: Bus, wait_for) -> None:
    recs = [Recorder() for _ in range(3)]
    for i, rec in enumerate(recs):
        await bus.consume(QueueSpec(f"fan{i}", bindings=((BROADCAST, "round.opened.*"),)), rec)
    assert await bus.publish(BROADCAST, "round.opened.j1", b"model")
    for rec in recs:
        await wait_for(rec.changed)
        assert rec.bodies == [b"model"]


async def test_headers_are_preserved(bus: Bus, wait_for) -> None:
    rec = Recorder()
    await bus.consume(QueueSpec("hdr", bindings=((EVENTS, "#"),)), rec)
    headers = {
        "kind": "update",
        "round": 7,
        "neg": -3,
        "big": 2**62,
        "flag": True,
        "raw": b"\x00\xff",
        "nested": {"a": "b", "n": 1, "b": b"\x01"},
        "list": ["x", 2, b"y"],
        "none": None,
        "utf8": "pr\u00fcfung",
    }
    await bus.publish(EVENTS, "h", b"body", headers)
    await wait_for(rec.changed)
    got = dict(rec.seen[0].headers)
    assert {k: got.get(k) for k in headers} == headers
    assert rec.seen[0].delivery_count == 1 and not rec.seen[0].redelivered


async def test_acked_message_is_gone(bus: Bus, wait_for) -> None:
    spec = QueueSpec("acked", bindings=((EVENTS, "#"),))
    first = Recorder()
    sub = await bus.consume(spec, first)
    await bus.publish(EVENTS, "k", b"once")
    await wait_for(first.changed)
    await sub.cancel()
    second = Recorder()
    await bus.consume(spec, second)
    await bus.publish(EVENTS, "k", b"sentinel")
    await wait_for(second.changed)
    assert second.bodies == [b"sentinel"]


async def test_reject_dead_letters_with_reason(bus: Bus, wait_for) -> None:
    dead = Recorder()
    await bus.consume(topology.dead_letters(), dead)
    bad = Recorder(Outcome.REJECT)
    await bus.consume(QueueSpec("strict", bindings=((CLIENT, "update.*"),)), bad)
    await bus.publish(CLIENT, "update.j9", b"garbage", {"sender": "c1"})
    await wait_for(dead.changed)
    (d,) = dead.seen
    assert (d.body, d.routing_key, d.exchange) == (b"garbage", "update.j9", DEAD)
    assert (d.death_reason, d.death_queue) == ("rejected", "strict")
    assert d.headers["sender"] == "c1"
    assert len(bad.seen) == 1, "a rejected message is never redelivered"


@pytest.mark.parametrize("limit", [1, 3])
async def test_retry_is_bounded_then_dead_letters(bus: Bus, wait_for, limit: int) -> None:
    dead = Recorder()
    await bus.consume(topology.dead_letters(), dead)
    flaky = Recorder(Outcome.RETRY)
    await bus.consume(QueueSpec("flaky", bindings=((EVENTS, "#"),), delivery_limit=limit), flaky)
    await bus.publish(EVENTS, "r.k", b"poison")
    await wait_for(dead.changed)
    assert [d.delivery_count for d in flaky.seen] == list(range(1, limit + 1))
    assert [d.redelivered for d in flaky.seen] == [False] + [True] * (limit - 1)
    assert dead.seen[0].death_reason == "delivery_limit"
    assert dead.seen[0].death_queue == "flaky"


async def test_handler_exception_is_a_bounded_retry_and_consumer_survives(
    bus: Bus, wait_for, caplog: pytest.LogCaptureFixture
) -> None:
    dead, done = Recorder(), Recorder()

    async def handler(delivery: Delivery) -> Outcome:
        if delivery.body == b"boom":
            raise RuntimeError("handler bug")
        if delivery.body == b"weird":
            return "ack"  # type: ignore[return-value]  # not an Outcome: a bug, retried
        return await done(delivery)

    await bus.consume(topology.dead_letters(), dead)
    await bus.consume(QueueSpec("buggy", bindings=((EVENTS, "#"),), delivery_limit=2), handler)
    for body in (b"boom", b"weird", b"good"):
        await bus.publish(EVENTS, "b", body)
    await wait_for(lambda: len(dead.seen) == 2 and done.seen)
    assert sorted(dead.bodies) == [b"boom", b"weird"]
    assert {d.death_reason for d in dead.seen} == {"delivery_limit"}
    assert done.bodies == [b"good"]
    assert "handler bug" in caplog.text


async def test_prefetch_bounds_unsettled_deliveries(bus: Bus, wait_for) -> None:
    release = asyncio.Event()
    in_flight, peak, done = 0, 0, []

    async def slow(delivery: Delivery) -> Outcome:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await release.wait()
        in_flight -= 1
        done.append(delivery.body)
        return Outcome.ACK

    await bus.consume(QueueSpec("pf", bindings=((EVENTS, "#"),)), slow, prefetch=3)
    for i in range(10):
        await bus.publish(EVENTS, "p", bytes([i]))
    await wait_for(lambda: in_flight == 3)
    # Give the broker every chance to over-deliver before checking it did not.
    await bus.publish(EVENTS, "p", b"late")
    await asyncio.sleep(0.2)
    assert in_flight == 3
    release.set()
    await wait_for(lambda: len(done) == 11)
    assert peak == 3


async def test_single_active_consumer_and_takeover(bus: Bus, bus_factory, wait_for) -> None:
    other = await bus_factory()
    spec = QueueSpec("agg.j1", bindings=((EVENTS, "round.#"),), single_active=True)
    first, second = Recorder(), Recorder()
    sub1 = await bus.consume(spec, first)
    await other.consume(spec, second)
    for i in range(6):
        await bus.publish(EVENTS, "round.x", f"a{i}".encode())
    await wait_for(lambda: len(first.seen) == 6)
    assert second.seen == []
    await sub1.cancel()
    for i in range(3):
        await bus.publish(EVENTS, "round.x", f"b{i}".encode())
    await wait_for(lambda: len(second.seen) == 3)
    assert second.bodies == [b"b0", b"b1", b"b2"]
    assert len(first.seen) == 6


async def test_unsettled_messages_are_redelivered_when_consumer_goes_away(
    bus: Bus, bus_factory, wait_for
) -> None:
    spec = QueueSpec("crashy", bindings=((EVENTS, "#"),))
    stuck = asyncio.Event()

    async def hangs(delivery: Delivery) -> Outcome:
        stuck.set()
        await asyncio.Event().wait()  # never settles: a consumer that dies mid-message
        return Outcome.ACK

    sub = await bus.consume(spec, hangs)
    await bus.publish(EVENTS, "k", b"important", {"id": 1})
    await wait_for(stuck)
    await sub.cancel(timeout=0)
    survivor = Recorder()
    other = await bus_factory()
    await other.consume(spec, survivor)
    await wait_for(survivor.changed)
    (d,) = survivor.seen
    assert d.body == b"important" and d.redelivered and d.headers["id"] == 1
    # RabbitMQ 3.x quorum queues count a return on consumer loss as a delivery attempt.
    assert d.delivery_count == 2


async def test_close_hands_unsettled_messages_back(bus: Bus, bus_factory, wait_for) -> None:
    spec = QueueSpec("closing", bindings=((EVENTS, "#"),))
    gone = await bus_factory()
    stuck = asyncio.Event()

    async def hangs(delivery: Delivery) -> Outcome:
        stuck.set()
        await asyncio.Event().wait()
        return Outcome.ACK

    await gone.consume(spec, hangs)
    await bus.publish(EVENTS, "k", b"m")
    await wait_for(stuck)
    await gone.close(timeout=0)
    with pytest.raises(BusClosed):
        await gone.publish(EVENTS, "k", b"after close")
    rec = Recorder()
    await bus.consume(spec, rec)
    await wait_for(rec.changed)
    assert rec.bodies == [b"m"]


async def test_large_body_round_trip_is_bit_exact(bus: Bus, wait_for) -> None:
    rec = Recorder()
    await bus.consume(QueueSpec("big", bindings=((CLIENT, "#"),)), rec, prefetch=1)
    body = os.urandom(8 * 1024 * 1024)
    await bus.publish(CLIENT, "update.big", body)
    await wait_for(rec.changed, timeout=20)
    assert rec.seen[0].body == body


async def test_oversized_body_is_refused_before_sending(bus_factory, wait_for) -> None:
    small = await bus_factory(max_message_size=1024)
    rec = Recorder()
    await small.consume(QueueSpec("cap", bindings=((EVENTS, "#"),)), rec)
    with pytest.raises(MessageTooLarge) as info:
        await small.publish(EVENTS, "k", b"x" * 1025)
    assert info.value.reason == "TOO_LARGE" and info.value.size == 1025
    assert await small.publish(EVENTS, "k", b"x" * 1024)  # the bus still works
    await wait_for(rec.changed)
    assert rec.bodies == [b"x" * 1024]


async def test_bad_requests_get_typed_errors(bus: Bus) -> None:
    with pytest.raises(TopologyError):
        await bus.publish("no.such.exchange", "k", b"")
    with pytest.raises(InvalidHeaders):
        await bus.publish(EVENTS, "k", b"", {"when": object()})
    with pytest.raises(InvalidHeaders):
        await bus.publish(EVENTS, "k", b"", {"huge": 2**64})
    with pytest.raises(InvalidHeaders):
        await bus.publish(EVENTS, "k", b"", {"lossy": 0.1})
    with pytest.raises(TypeError):
        await bus.publish(EVENTS, "k", "text, not bytes")  # type: ignore[arg-type]
    with pytest.raises(TopologyError):
        await bus.consume(QueueSpec("q", bindings=(("nope", "#"),)), Recorder())
    with pytest.raises(ValueError):
        await bus.consume(QueueSpec("q"), Recorder(), prefetch=0)
    with pytest.raises(ValueError):
        QueueSpec("q", delivery_limit=0)


async def test_redeclaring_with_other_arguments_is_a_topology_error(bus: Bus, wait_for) -> None:
    rec = Recorder()
    await bus.consume(QueueSpec("contract", bindings=((EVENTS, "#"),), delivery_limit=5), rec)
    with pytest.raises(TopologyError):
        await bus.consume(QueueSpec("contract", delivery_limit=6), Recorder())
    with pytest.raises(TopologyError):
        await bus.consume(QueueSpec("contract", single_active=True), Recorder())
    # The bus is still usable after the refused declarations.
    await bus.consume(QueueSpec("contract", bindings=((EVENTS, "#"),), delivery_limit=5), rec)
    await bus.publish(EVENTS, "k", b"ok")
    await wait_for(rec.changed)


async def test_dead_letter_headers_match_rabbitmq_shape(bus: Bus, wait_for) -> None:
    dead = Recorder()
    await bus.consume(topology.dead_letters(pattern="update.#"), dead)
    await bus.consume(QueueSpec("shape", bindings=((CLIENT, "#"),)), Recorder(Outcome.REJECT))
    await bus.publish(CLIENT, "update.j1", b"x")
    await bus.publish(CLIENT, "other.j1", b"filtered out by the dead-letter pattern")
    await bus.publish(CLIENT, "update.j2", b"y")
    await wait_for(lambda: len(dead.seen) == 2)
    assert dead.bodies == [b"x", b"y"]
    death = dead.seen[0].headers["x-death"][0]
    assert death["reason"] == "rejected" and death["count"] == 1
    assert death["routing-keys"] == ["update.j1"]
    assert death["queue"].endswith("shape") and death["exchange"].endswith(CLIENT)
    assert isinstance(death["time"], dt.datetime)


async def test_many_messages_are_each_delivered_once_when_all_ack(
    bus: Bus, bus_factory, wait_for
) -> None:
    spec = QueueSpec("bulk", bindings=((CLIENT, "#"),))
    recs = [Recorder() for _ in range(3)]
    for rec in recs:
        await (await bus_factory()).consume(spec, rec, prefetch=8)
    n = 300
    await asyncio.gather(*(bus.publish(CLIENT, "u", str(i).encode()) for i in range(n)))
    await wait_for(lambda: sum(len(r.seen) for r in recs) >= n)
    counts = Counter(b for r in recs for b in r.bodies)
    assert len(counts) == n and set(counts.values()) == {1}


async def test_retry_delay_spaces_redeliveries(bus: Bus, wait_for) -> None:
    times: list[float] = []

    async def flaky(delivery: Delivery) -> Outcome:
        times.append(asyncio.get_running_loop().time())
        return Outcome.RETRY if len(times) < 3 else Outcome.ACK

    spec = QueueSpec("slow-retry", bindings=((EVENTS, "#"),), delivery_limit=3, retry_delay=0.1)
    await bus.consume(spec, flaky)
    await bus.publish(EVENTS, "k", b"m")
    await wait_for(lambda: len(times) == 3)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.09, gaps


async def test_handler_may_publish_while_handling(bus: Bus, wait_for) -> None:
    out = Recorder()
    await bus.consume(QueueSpec("out", bindings=((ALERTS, "#"),)), out)

    async def relay(delivery: Delivery) -> Outcome:
        await bus.publish(ALERTS, "info.relay.j1", delivery.body[::-1])
        return Outcome.ACK

    await bus.consume(QueueSpec("relay", bindings=((EVENTS, "#"),)), relay)
    await bus.publish(EVENTS, "k", b"abc")
    await wait_for(out.changed)
    assert out.bodies == [b"cba"] and out.seen[0].exchange == ALERTS


async def test_every_message_ends_exactly_once_under_mixed_outcomes(
    bus: Bus, bus_factory, wait_for
) -> None:
    """Random but reproducible outcomes over competing consumers: each message is settled
    for good exactly once (acked, or dead-lettered with the right reason), and no message
    is ever in two handlers at the same time."""
    import random

    n, limit = 150, 3
    plan = random.Random(7)
    # Per message: the outcome of each delivery attempt (the last one always applies).
    script = {
        str(i).encode(): [plan.choice(["ack", "retry", "reject", "raise"]) for _ in range(limit)]
        for i in range(n)
    }
    acked: Counter[bytes] = Counter()
    active: set[bytes] = set()
    overlaps: list[bytes] = []

    async def handler(delivery: Delivery) -> Outcome:
        if delivery.body in active:
            overlaps.append(delivery.body)
        active.add(delivery.body)
        try:
            await asyncio.sleep(0)
            step = script[delivery.body][delivery.delivery_count - 1]
            if step == "raise":
                raise RuntimeError("scripted failure")
            if step == "ack":
                acked[delivery.body] += 1
                return Outcome.ACK
            return Outcome.REJECT if step == "reject" else Outcome.RETRY
        finally:
            active.discard(delivery.body)

    dead = Recorder()
    await bus.consume(topology.dead_letters(), dead, prefetch=64)
    spec = QueueSpec("mixed", bindings=((CLIENT, "#"),), delivery_limit=limit)
    for _ in range(3):
        await (await bus_factory()).consume(spec, handler, prefetch=8)
    await asyncio.gather(*(bus.publish(CLIENT, "u", body) for body in script))

    def expected_end(steps: list[str]) -> str:
        for step in steps:
            if step in ("ack", "reject"):
                return step
        return "delivery_limit"

    want = {body: expected_end(steps) for body, steps in script.items()}
    await wait_for(lambda: len(acked) + len(dead.seen) >= n, timeout=30)
    await asyncio.sleep(0.2)  # room for any duplicate settlement to show up
    assert not overlaps
    assert set(acked.values()) == {1}
    assert {b for b, end in want.items() if end == "ack"} == set(acked)
    got_dead = {d.body: d.death_reason for d in dead.seen}
    assert len(got_dead) == len(dead.seen), "a message was dead-lettered twice"
    assert got_dead == {
        b: ("rejected" if e == "reject" else e) for b, e in want.items() if e != "ack"
    }


async def test_one_consumer_sees_publish_order(bus: Bus, wait_for) -> None:
    rec = Recorder()
    await bus.consume(QueueSpec("fifo", bindings=((EVENTS, "#"),)), rec, prefetch=1)
    bodies = [str(i).encode() for i in range(100)]
    for body in bodies:
        await bus.publish(EVENTS, "o", body)
    await wait_for(lambda: len(rec.seen) == len(bodies))
    assert rec.bodies == bodies


# -- transient queues: owned by one bus, gone with its subscription -------------------------


async def test_transient_queue_receives_and_vanishes_on_cancel(bus: Bus, wait_for) -> None:
    rec = Recorder()
    sub = await bus.consume(QueueSpec("viewer", bindings=((EVENTS, "t.#"),), transient=True), rec)
    assert sub.queue_name == "viewer"
    assert "viewer" not in bus.declared_queues, "it cleans up after itself"
    assert await bus.publish(EVENTS, "t.1", b"one") is True
    await wait_for(rec.changed)
    assert rec.bodies == [b"one"]
    await sub.cancel()
    # nothing is bound any more: the broker deleted the queue with its consumer
    assert await bus.publish(EVENTS, "t.2", b"two") is False


async def test_nameless_transient_queue_gets_a_unique_name(bus: Bus, wait_for) -> None:
    a, b = Recorder(), Recorder()
    spec = QueueSpec("", bindings=((ALERTS, "#"),), transient=True)
    sub_a = await bus.consume(spec, a)
    sub_b = await bus.consume(spec, b)
    assert sub_a.queue_name and sub_a.queue_name != sub_b.queue_name
    await bus.publish(ALERTS, "critical.x.j1", b"both")
    await wait_for(lambda: a.bodies == [b"both"] and b.bodies == [b"both"])
    with pytest.raises(ValueError):
        QueueSpec("", bindings=((ALERTS, "#"),))  # only a transient queue may be nameless


async def test_transient_queue_vanishes_when_its_bus_closes(
    bus: Bus, bus_factory, wait_for
) -> None:
    owner = await bus_factory()
    rec = Recorder()
    await owner.consume(QueueSpec("", bindings=((EVENTS, "c.#"),), transient=True), rec)
    assert await bus.publish(EVENTS, "c.1", b"seen") is True
    await wait_for(rec.changed)
    await owner.close()
    assert await bus.publish(EVENTS, "c.2", b"unseen") is False


async def test_transient_queue_belongs_to_its_bus(bus: Bus, bus_factory) -> None:
    other = await bus_factory()
    spec = QueueSpec("mine", bindings=((EVENTS, "#"),), transient=True)
    await bus.consume(spec, Recorder())
    with pytest.raises(TopologyError):
        await other.consume(spec, Recorder())
    with pytest.raises(TopologyError):  # nor can it be taken over as a durable queue
        await bus.consume(QueueSpec("mine", bindings=((EVENTS, "#"),)), Recorder())


async def test_transient_retry_is_bounded_then_dead_letters_as_rejected(bus: Bus, wait_for) -> None:
    dead = Recorder()
    await bus.consume(topology.dead_letters(), dead)
    flaky = Recorder(Outcome.RETRY)
    await bus.consume(
        QueueSpec("", bindings=((EVENTS, "#"),), delivery_limit=3, transient=True), flaky
    )
    await bus.publish(EVENTS, "r.k", b"poison")
    await wait_for(dead.changed)
    assert [d.delivery_count for d in flaky.seen] == [1, 2, 3]
    assert [d.redelivered for d in flaky.seen] == [False, True, True]
    assert dead.seen[0].death_reason == "rejected"


# -- streams: one write, many readers, each from its own offset -----------------------------


def _stream(name: str = "log", pattern: str = "update.j1.#", **retention) -> StreamSpec:
    return StreamSpec(name, bindings=((CLIENT, pattern),), retry_delay=0.05, **retention)


class StreamRecorder(Recorder):
    """A stream handler: records deliveries, fails if two calls ever overlap, and can
    wait until it has seen a given body."""

    def __init__(self, outcome: Outcome = Outcome.ACK) -> None:
        super().__init__(outcome)
        self.active = 0
        self.overlaps = 0

    async def __call__(self, delivery: Delivery) -> Outcome:
        self.active += 1
        self.overlaps += self.active > 1
        try:
            await asyncio.sleep(0)  # let any second call in, if the reader allowed one
            return await super().__call__(delivery)
        finally:
            self.active -= 1

    @property
    def offsets(self) -> list[int]:
        return [d.offset for d in self.seen]  # type: ignore[misc]

    def has(self, body: bytes) -> bool:
        return body in self.bodies


async def _write(bus: Bus, bodies: list[bytes], key: str = "update.j1.c1") -> None:
    for body in bodies:
        assert await bus.publish(CLIENT, key, body, {"n": int(body) if body.isdigit() else -1})


async def _read_all(bus: Bus, name: str, last: bytes, wait_for, **kwargs) -> list[Delivery]:
    """Everything a new reader gets, up to and including the body ``last``."""
    rec = StreamRecorder()
    sub = await bus.read_stream(name, rec, **kwargs)
    await wait_for(lambda: rec.has(last), timeout=10, message=f"{last[:8]!r} in {name}")
    await sub.cancel()
    return rec.seen


def _numbers(n: int, start: int = 0) -> list[bytes]:
    return [str(i).encode() for i in range(start, start + n)]


async def test_stream_one_write_is_read_by_readers_at_different_offsets(
    bus: Bus, bus_factory, wait_for
) -> None:
    await bus.declare_stream(_stream())
    await _write(bus, _numbers(10))
    first = StreamRecorder()
    await bus.read_stream("log", first, offset="first")
    await wait_for(lambda: len(first.seen) == 10)
    assert first.bodies == _numbers(10)
    assert first.offsets == sorted(set(first.offsets)), "offsets grow with every message"
    middle, last, new = StreamRecorder(), StreamRecorder(), StreamRecorder()
    other = await bus_factory()  # readers on another bus (process) read the same log
    await other.read_stream("log", middle, offset=first.offsets[6])
    await other.read_stream("log", last, offset="last")
    await bus.read_stream("log", new, offset="next")
    await wait_for(lambda: len(middle.seen) == 4 and len(last.seen) == 1)
    await _write(bus, _numbers(3, start=10))
    await wait_for(lambda: all(r.has(b"12") for r in (first, middle, last, new)))
    assert first.bodies == _numbers(13)
    assert middle.bodies == _numbers(7, start=6)
    assert last.bodies == _numbers(4, start=9)
    assert new.bodies == _numbers(3, start=10)
    assert [d.offset for d in middle.seen] == first.offsets[6:]
    d = first.seen[3]
    assert (d.exchange, d.routing_key, d.headers["n"], d.delivery_count) == (
        CLIENT,
        "update.j1.c1",
        3,
        1,
    )
    assert "x-stream-offset" not in d.headers and not d.redelivered
    assert not any(r.overlaps for r in (first, middle, last, new))


async def test_stream_reader_resumes_from_a_stored_offset(bus: Bus, wait_for) -> None:
    await bus.declare_stream(_stream())
    await _write(bus, _numbers(20))
    k, handled, stuck = 7, [], asyncio.Event()

    async def crashes_after_k(delivery: Delivery) -> Outcome:
        if len(handled) == k:
            stuck.set()
            await asyncio.Event().wait()  # dies mid-message: it never settles
        handled.append(delivery)
        return Outcome.ACK

    sub = await bus.read_stream("log", crashes_after_k, offset="first")
    await wait_for(stuck)
    await sub.cancel(timeout=0)
    stored = handled[-1].offset + 1  # what a service commits with its state
    rest = StreamRecorder()
    await bus.read_stream("log", rest, offset=stored)
    await wait_for(lambda: rest.has(b"19"))
    assert [d.body for d in handled] + rest.bodies == _numbers(20)


async def test_stream_reader_sees_write_order_one_message_at_a_time(bus: Bus, wait_for) -> None:
    await bus.declare_stream(_stream())
    rec = StreamRecorder()
    await bus.read_stream("log", rec, offset="first", prefetch=8)
    await _write(bus, _numbers(100))
    await wait_for(lambda: rec.has(b"99"))
    assert rec.bodies == _numbers(100)
    assert rec.offsets == sorted(set(rec.offsets))
    assert rec.overlaps == 0


async def test_stream_retry_holds_the_position_and_other_readers_move_on(
    bus: Bus, wait_for, caplog: pytest.LogCaptureFixture
) -> None:
    await bus.declare_stream(_stream())
    calls: list[tuple[bytes, int, bool, float]] = []

    async def flaky(delivery: Delivery) -> Outcome:
        calls.append(
            (
                delivery.body,
                delivery.delivery_count,
                delivery.redelivered,
                asyncio.get_running_loop().time(),
            )
        )
        if delivery.body == b"1" and delivery.delivery_count < 3:
            return Outcome.RETRY
        if delivery.body == b"2" and delivery.delivery_count == 1:
            raise RuntimeError("storage fault")
        if delivery.body == b"3":
            return Outcome.REJECT  # bad input: moves on, never offered again
        return Outcome.ACK

    free = StreamRecorder()
    await bus.read_stream("log", flaky, offset="first")
    await bus.read_stream("log", free, offset="first")
    await _write(bus, _numbers(5))
    await wait_for(lambda: any(c[0] == b"4" for c in calls) and free.has(b"4"))
    assert [(b, n, r) for b, n, r, _ in calls] == [
        (b"0", 1, False),
        (b"1", 1, False),
        (b"1", 2, True),
        (b"1", 3, True),
        (b"2", 1, False),
        (b"2", 2, True),
        (b"3", 1, False),
        (b"4", 1, False),
    ]
    times = [t for _, _, _, t in calls]
    assert times[2] - times[1] >= 0.045 and times[5] - times[4] >= 0.045, "retry_delay"
    assert free.bodies == _numbers(5)
    assert "storage fault" in caplog.text


async def test_stream_retention_drops_the_oldest_bytes(bus: Bus, wait_for) -> None:
    max_bytes = 64 * 1024
    await bus.declare_stream(_stream(max_bytes=max_bytes))
    bodies = [i.to_bytes(4, "big") * 256 for i in range(160)]  # 1 KiB each, 2.5x max_bytes
    await _write(bus, bodies)
    kept = await _read_all(bus, "log", bodies[-1], wait_for, offset="first")
    assert [d.body for d in kept] == bodies[-len(kept) :], "a contiguous tail stays"
    assert kept[0].offset > 0
    # RabbitMQ drops whole segments (a quarter of max_bytes): between half and all of it stays
    assert max_bytes // 2 <= sum(len(d.body) for d in kept) <= max_bytes
    # An offset that retention dropped starts at the oldest retained message.
    again = await _read_all(bus, "log", bodies[-1], wait_for, offset=0)
    assert [d.offset for d in again] == [d.offset for d in kept]


async def test_stream_retention_drops_what_is_older_than_max_age(bus: Bus, wait_for) -> None:
    # 600 KiB bodies fill a segment each (max_bytes / 4), so RabbitMQ can drop them singly.
    await bus.declare_stream(_stream(max_age_s=1, max_bytes=2 * 2**20))
    old = [bytes([i]) * 600 * 1024 for i in range(2)]
    await _write(bus, old)
    await asyncio.sleep(2.1)  # the clock is what is tested here
    new = b"n" * 600 * 1024
    await _write(bus, [new])

    async def only_new() -> None:
        while [d.body for d in await _read_all(bus, "log", new, wait_for, offset="first")] != [new]:
            await asyncio.sleep(0.2)  # RabbitMQ applies retention just after the write

    await wait_for(only_new(), timeout=15, message="messages older than max_age dropped")


async def test_stream_bound_to_an_exchange_with_topic_patterns(bus: Bus, wait_for) -> None:
    spec = StreamSpec("models", bindings=((CLIENT, "update.j1.*"), (EVENTS, "model.j1.#")))
    await bus.declare_stream(spec)
    await bus.declare_stream(spec)  # idempotent
    routed = {
        (CLIENT, "update.j1.c1"): True,
        (CLIENT, "update.j2.c1"): False,
        (CLIENT, "update.j1"): False,
        (EVENTS, "model.j1"): True,
        (EVENTS, "model.j1.v2.chunk3"): True,
        (ALERTS, "model.j1"): False,
    }
    for (exchange, key), expected in routed.items():
        assert await bus.publish(exchange, key, key.encode(), {"via": exchange}) is expected
    await bus.publish(EVENTS, "model.j1.end", b"end")
    seen = await _read_all(bus, "models", b"end", wait_for, offset="first")
    assert [(d.exchange, d.routing_key, d.headers["via"]) for d in seen[:-1]] == [
        (exchange, key, exchange) for (exchange, key), ok in routed.items() if ok
    ]


async def test_stream_from_a_timestamp(bus: Bus, wait_for) -> None:
    await bus.declare_stream(_stream())
    await _write(bus, _numbers(3))
    now = dt.datetime.now(dt.UTC)
    # Both adapters round a timestamp down to the second: start B in a second of its own.
    await asyncio.sleep(1.05 - now.microsecond / 1e6)
    since = dt.datetime.now(dt.UTC)
    await _write(bus, _numbers(3, start=3))
    seen = await _read_all(bus, "log", b"5", wait_for, offset=since)
    assert [d.body for d in seen] == _numbers(3, start=3)
    seen = await _read_all(bus, "log", b"5", wait_for, offset=since - dt.timedelta(hours=1))
    assert [d.body for d in seen] == _numbers(6)
    later = StreamRecorder()
    await bus.read_stream("log", later, offset=since + dt.timedelta(days=1))
    await _write(bus, [b"6"])
    await wait_for(lambda: later.has(b"6"))
    assert later.bodies == [b"6"], "a future timestamp reads only new messages"


async def test_stream_reader_never_gets_offsets_before_its_start(bus: Bus, wait_for) -> None:
    """Over AMQP 0.9.1 a stream consumer attached at offset N may be sent the start of the
    chunk holding N; concurrent publishes make chunks of many messages."""
    await bus.declare_stream(_stream())
    bodies = _numbers(600)
    await asyncio.gather(*(bus.publish(CLIENT, "update.j1.c1", b) for b in bodies))
    first = StreamRecorder()
    await bus.read_stream("log", first, offset="first", prefetch=64)
    await wait_for(lambda: len(first.seen) == len(bodies), timeout=10)
    offsets = first.offsets
    for i in (1, 150, 151, 299, 450, len(offsets) - 2, len(offsets) - 1):
        rec = StreamRecorder()
        sub = await bus.read_stream("log", rec, offset=offsets[i], prefetch=64)
        await wait_for(lambda rec=rec, i=i: len(rec.seen) >= len(offsets) - i, timeout=10)
        await asyncio.sleep(0.05)  # room for anything extra to show up
        await sub.cancel()
        assert rec.offsets == offsets[i:], f"attached at {offsets[i]}"


async def test_stream_delete(bus: Bus, bus_factory, wait_for) -> None:
    other = await bus_factory()
    await bus.declare_stream(_stream())
    mine, theirs = StreamRecorder(), StreamRecorder()
    await bus.read_stream("log", mine, offset="first")
    await other.read_stream("log", theirs, offset="first")
    await _write(bus, [b"0"])
    await wait_for(lambda: mine.has(b"0") and theirs.has(b"0"))
    await bus.delete_stream("log")
    await bus.delete_stream("log")  # a missing stream is not an error
    assert "log" not in bus.declared_queues
    assert await bus.publish(CLIENT, "update.j1.c1", b"1") is False
    with pytest.raises(StreamNotFound):
        await other.read_stream("log", StreamRecorder())
    await bus.declare_stream(_stream())  # a new, empty stream of the same name
    await _write(bus, [b"2"])
    fresh = await _read_all(bus, "log", b"2", wait_for, offset="first")
    assert [d.body for d in fresh] == [b"2"]
    assert mine.bodies == [b"0"] and theirs.bodies == [b"0"], "readers of the old one stopped"


async def test_queue_deliveries_have_no_offset(bus: Bus, wait_for) -> None:
    rec = Recorder()
    await bus.consume(QueueSpec("plain", bindings=((EVENTS, "#"),)), rec)
    await bus.publish(EVENTS, "k", b"m")
    await wait_for(rec.changed)
    assert rec.seen[0].offset is None


@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [
        ({"name": ""}, ValueError, "''"),
        ({"name": 7}, TypeError, "int"),
        ({"name": "x" * 201}, ValueError, "1..200"),
        ({"max_age_s": 0}, ValueError, "0"),
        ({"max_age_s": 1.5}, TypeError, "1.5"),
        ({"max_age_s": 400 * 24 * 3600}, ValueError, "34560000"),
        ({"max_bytes": 100}, ValueError, "100"),
        ({"max_bytes": True}, TypeError, "True"),
        ({"max_bytes": 2**41}, ValueError, str(2**41)),
        ({"retry_delay": 0}, ValueError, "0"),
        ({"retry_delay": "1"}, TypeError, "'1'"),
        ({"bindings": (("qflare.client",),)}, TypeError, "qflare.client"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_stream_specs_name_the_value(kwargs: dict, error: type, named: str) -> None:
    args = {"name": "s", **kwargs}
    with pytest.raises(error) as info:
        StreamSpec(**args)
    assert named in str(info.value)


async def test_bad_stream_requests_get_typed_errors(bus: Bus) -> None:
    with pytest.raises(StreamNotFound) as info:
        await bus.read_stream("never-declared", StreamRecorder())
    assert info.value.reason == "NO_STREAM" and isinstance(info.value, TopologyError)
    await bus.declare_stream(_stream())
    for offset, error in [
        ("middle", ValueError),
        (-1, ValueError),
        (2**63, ValueError),
        (True, TypeError),
        (1.5, TypeError),
        (dt.datetime(2026, 1, 1), ValueError),  # naive: which zone?
    ]:
        with pytest.raises(error, match="offset"):
            await bus.read_stream("log", StreamRecorder(), offset=offset)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefetch"):
        await bus.read_stream("log", StreamRecorder(), prefetch=0)
    with pytest.raises(TypeError):
        await bus.read_stream(7, StreamRecorder())  # type: ignore[arg-type]
    with pytest.raises(TopologyError):
        await bus.declare_stream(StreamSpec("elsewhere", bindings=(("nope", "#"),)))
    with pytest.raises(TopologyError):  # other retention: the topology is a contract
        await bus.declare_stream(_stream(max_bytes=2**20))
    with pytest.raises(TopologyError):  # a stream is not a queue
        await bus.consume(QueueSpec("log"), Recorder())
    await bus.consume(QueueSpec("work", bindings=((EVENTS, "w"),)), Recorder())
    with pytest.raises(TopologyError):  # nor a queue a stream
        await bus.declare_stream(StreamSpec("work"))
    with pytest.raises(StreamNotFound):
        await bus.read_stream("work", StreamRecorder())
    # The bus still works after every refusal.
    await _write(bus, [b"ok"])
    rec = StreamRecorder()
    await bus.read_stream("log", rec, offset="first")
    assert await bus.publish(EVENTS, "w", b"") is True


async def test_oversized_body_into_a_stream_is_refused_before_sending(
    bus_factory, wait_for
) -> None:
    small = await bus_factory(max_message_size=1024)
    await small.declare_stream(_stream())
    with pytest.raises(MessageTooLarge) as info:
        await small.publish(CLIENT, "update.j1.c1", b"x" * 1025)
    assert info.value.size == 1025
    assert await small.publish(CLIENT, "update.j1.c1", b"x" * 1024)
    seen = await _read_all(small, "log", b"x" * 1024, wait_for, offset="first")
    assert [len(d.body) for d in seen] == [1024]


async def test_read_stream_declares_a_spec_it_is_given(bus: Bus, wait_for) -> None:
    rec = StreamRecorder()
    await bus.read_stream(_stream(), rec, offset="first")
    assert "log" in bus.declared_queues
    await _write(bus, [b"0"])
    await wait_for(lambda: rec.has(b"0"))
