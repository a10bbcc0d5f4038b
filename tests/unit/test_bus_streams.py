"""The RabbitMQ stream reader's own rules, fed synthetic deliveries (no broker needed).

RabbitMQ 3.10.8 filters an int start offset itself in the cases measured here, so the
reader's skip of offsets before its start (the AMQP 0.9.1 chunk-start pitfall), its drop of
read-ahead messages from a channel that is gone, its choice of where to resume, and the
"last" settlement are checked here where they certainly run.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any, ClassVar

import pytest

from qflare.bus import Delivery, Outcome, connect_bus
from qflare.bus import rabbitmq as rabbit_adapter
from qflare.bus.port import StreamRead
from qflare.bus.rabbitmq import _RabbitStreamReader


class FakeMessage:
    #: every fake delivery, in delivery-tag order (a multiple ack covers those before it)
    sent: ClassVar[list[FakeMessage]] = []

    def __init__(self, offset: int) -> None:
        self.headers: dict[str, Any] = {"x-stream-offset": offset, "n": offset}
        self.body = str(offset).encode()
        self.routing_key = "update.j1"
        self.exchange = "p-qflare.client"
        self.acked = False
        FakeMessage.sent.append(self)

    async def ack(self, multiple: bool = False) -> None:
        if not multiple:
            assert not self.acked, "acked twice: a channel error on the broker"
            self.acked = True
            return
        for message in FakeMessage.sent[: FakeMessage.sent.index(self) + 1]:
            message.acked = True
        FakeMessage.multiple_acks += 1

    multiple_acks: ClassVar[int] = 0


class FakeChannel:
    def __init__(self) -> None:
        self.reopen_callbacks: set[Any] = set()
        self.closed = False

    async def close(self) -> None:
        self.closed = True


class Handler:
    def __init__(self) -> None:
        self.seen: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> Outcome:
        self.seen.append(delivery)
        return Outcome.ACK

    @property
    def offsets(self) -> list[int | None]:
        return [d.offset for d in self.seen]


async def _reader(start: Any, handler: Handler) -> _RabbitStreamReader:
    bus = await connect_bus("memory://unit", prefix="p-")  # only for _delivery's names
    read = StreamRead("log", handler, start, prefetch=16, retry_delay=0.01)
    return _RabbitStreamReader(bus, read, FakeChannel(), None)  # type: ignore[arg-type]


async def _settle(reader: _RabbitStreamReader, handler: Handler, count: int) -> None:
    async with asyncio.timeout(2):
        while len(handler.seen) < count:
            await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)  # room for anything extra


async def test_offsets_before_the_start_are_skipped_but_acked() -> None:
    handler = Handler()
    reader = await _reader(5, handler)
    messages = [FakeMessage(o) for o in (3, 4, 5, 6, 7)]  # a chunk that starts before 5
    for message in messages:
        await reader._on_message(reader._generation, message)  # type: ignore[arg-type]
    await _settle(reader, handler, 3)
    assert handler.offsets == [5, 6, 7]
    assert all(m.acked for m in messages), "skipped ones still return their credit"
    d = handler.seen[0]
    assert (d.exchange, d.body, d.headers) == ("qflare.client", b"5", {"n": 5})
    assert reader.next_offset == 8
    await reader.cancel()


async def test_credit_goes_back_in_batches_of_half_the_prefetch() -> None:
    """20 messages waiting (prefetch 16): acked 8 at a time with one multiple ack, the rest
    at once when nothing else waits; every one acked."""
    handler = Handler()
    reader = await _reader(0, handler)
    before = FakeMessage.multiple_acks
    messages = [FakeMessage(o) for o in range(20)]
    for message in messages:
        await reader._on_message(reader._generation, message)  # type: ignore[arg-type]
    await _settle(reader, handler, 20)
    assert handler.offsets == list(range(20))
    assert all(m.acked for m in messages)
    assert FakeMessage.multiple_acks - before == 3  # 0-7, 8-15, 16-19
    await reader.cancel()


async def test_read_ahead_from_a_closed_channel_is_dropped_and_resume_is_after_handed() -> None:
    handler = Handler()
    reader = await _reader("first", handler)
    assert reader._resume_at() == "first", "nothing handed yet: the original start"
    await reader._on_message(reader._generation, FakeMessage(0))  # type: ignore[arg-type]
    await _settle(reader, handler, 1)
    gate = asyncio.Event()

    async def blocks(delivery: Delivery) -> Outcome:
        await gate.wait()
        return await handler(delivery)

    reader.handler = blocks
    for offset in (1, 2, 3):
        await reader._on_message(reader._generation, FakeMessage(offset))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)  # offset 1 is in the handler, 2 and 3 wait in the buffer
    reader._generation += 1  # what a re-attach does: the old channel's messages are stale
    assert reader._resume_at() == 2
    for offset in (2, 3, 4):  # the resumed consumer sends them again
        await reader._on_message(reader._generation, FakeMessage(offset))  # type: ignore[arg-type]
    gate.set()
    await _settle(reader, handler, 5)
    assert handler.offsets == [0, 1, 2, 3, 4], "nothing skipped, nothing repeated"
    await reader.cancel()


@pytest.mark.parametrize("start", ["next", "last"])
async def test_a_reader_that_handed_nothing_resumes_from_its_attach_second(start: str) -> None:
    reader = await _reader(start, Handler())
    resume = reader._resume_at()
    assert isinstance(resume, dt.datetime) and resume.microsecond == 0
    assert 0 <= reader._attached_at - resume.timestamp() < 1
    await reader.cancel()


async def test_last_keeps_only_the_newest_message_of_the_last_chunk(monkeypatch) -> None:
    monkeypatch.setattr(rabbit_adapter, "LAST_FIRST_WAIT", 0.2)
    monkeypatch.setattr(rabbit_adapter, "LAST_QUIET", 0.02)
    handler = Handler()
    reader = await _reader("last", handler)
    reader._settling = True
    chunk = [FakeMessage(o) for o in (10, 12, 11)]
    settling = asyncio.create_task(reader._settle_last())
    for message in chunk:
        await reader._on_message(reader._generation, message)  # type: ignore[arg-type]
    await settling
    await _settle(reader, handler, 1)
    assert handler.offsets == [12] and reader.next_offset == 13
    await reader._on_message(reader._generation, FakeMessage(13))  # type: ignore[arg-type]
    await _settle(reader, handler, 2)
    assert handler.offsets == [12, 13]
    assert chunk[0].acked and chunk[2].acked
    await reader.cancel()


async def test_last_on_an_empty_stream_hands_over_everything_new(monkeypatch) -> None:
    monkeypatch.setattr(rabbit_adapter, "LAST_FIRST_WAIT", 0.02)
    handler = Handler()
    reader = await _reader("last", handler)
    reader._settling = True
    await reader._settle_last()
    assert reader.next_offset is None
    for offset in (0, 1):
        await reader._on_message(reader._generation, FakeMessage(offset))  # type: ignore[arg-type]
    await _settle(reader, handler, 2)
    assert handler.offsets == [0, 1]
    await reader.cancel()


async def test_retry_is_not_bounded_and_cancel_stops_it() -> None:
    calls: list[int] = []

    async def always_retry(delivery: Delivery) -> Outcome:
        calls.append(delivery.delivery_count)
        return Outcome.RETRY

    reader = await _reader("first", Handler())
    reader.handler = always_retry
    await reader._on_message(reader._generation, FakeMessage(0))  # type: ignore[arg-type]
    async with asyncio.timeout(2):
        while len(calls) < 8:  # far past any queue's delivery limit
            await asyncio.sleep(0.005)
    await reader.cancel(timeout=1)
    assert calls == list(range(1, len(calls) + 1))
    assert reader.channel.closed  # type: ignore[attr-defined]
