"""One contract for the transport port, run against the in-memory bus and RabbitMQ.

Each test gets a fresh prefix, so queue names below are local to the test.
"""

from __future__ import annotations

import asyncio
import datetime as dt
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
    gaps = [b - a for a, b in zip(times, times[1:])]
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
