"""Embedded in-memory broker with RabbitMQ's semantics, for ``qflare simulate`` and tests.

It models what the services rely on, as the RabbitMQ adapter configures it: durable topic
exchanges, queues with bindings, competing consumers (round-robin), per-consumer prefetch,
manual settlement, redelivery of unsettled messages when a consumer goes away,
single-active-consumer queues, a delivery limit, and dead-lettering with RabbitMQ's
``x-death``/``x-first-death-*`` headers. One broker per (event loop, name): every
``connect_bus("memory://<name>")`` in the same loop shares it, as processes share a
RabbitMQ server. Nothing survives the process.

Streams are an append-only log per stream with offsets 0, 1, 2, ... Retention runs when a
message is appended: the oldest messages go while the log holds more than ``max_bytes`` of
bodies or is older than ``max_age_s``, the newest always stays. Each reader is a task that
walks the log from its own position and waits for appends at its end.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as _dt
import time
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from qflare.bus import port, topology
from qflare.bus.port import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Bus,
    Delivery,
    Handler,
    Outcome,
    QueueSpec,
    Subscription,
    TopologyError,
    check_prefetch,
    finish_tasks,
    log,
    settle_outcome,
    transient_name,
)


@dataclass(slots=True)
class _Message:
    body: bytes
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    deliveries: int = 0


@dataclass(frozen=True, slots=True)
class _QueueArgs:
    # What RabbitMQ would compare on re-declaration (PRECONDITION_FAILED on mismatch).
    single_active: bool
    delivery_limit: int
    dead_letter_exchange: str | None
    transient: bool = False


class _Queue:
    def __init__(self, name: str, args: _QueueArgs, owner: MemoryBus | None = None) -> None:
        self.name = name
        self.args = args
        # A transient queue's bus, as RabbitMQ ties an exclusive queue to its connection.
        self.owner = owner
        self.bindings: set[tuple[str, str]] = set()
        self.ready: deque[_Message] = deque()
        self.consumers: list[_Consumer] = []
        self._next = 0

    def accept(self, message: _Message) -> None:
        self.ready.append(message)
        self.dispatch()

    def dispatch(self) -> None:
        while self.ready:
            consumer = self._pick()
            if consumer is None:
                return
            consumer.deliver(self.ready.popleft())

    def _pick(self) -> _Consumer | None:
        candidates = self.consumers[:1] if self.args.single_active else self.consumers
        n = len(candidates)
        for step in range(n):
            consumer = candidates[(self._next + step) % n]
            if len(consumer.in_flight) < consumer.prefetch:
                self._next = (self._next + step + 1) % max(n, 1)
                return consumer
        return None


@dataclass(frozen=True, slots=True)
class _StreamArgs:
    # What RabbitMQ compares on re-declaration of a stream.
    max_age_s: int
    max_bytes: int


@dataclass(frozen=True, slots=True)
class _Entry:
    offset: int
    written: float  # time.time() at append, the clock RabbitMQ stamps chunks with
    message: _Message


class _Stream:
    def __init__(self, name: str, args: _StreamArgs) -> None:
        self.name = name
        self.args = args
        self.bindings: set[tuple[str, str]] = set()
        self.log: deque[_Entry] = deque()
        self.end = 0  # the offset the next message gets
        self.size = 0
        self.deleted = False
        self._changed = asyncio.Event()

    def accept(self, message: _Message) -> None:
        now = time.time()
        self.log.append(_Entry(self.end, now, message))
        self.end += 1
        self.size += len(message.body)
        horizon = now - self.args.max_age_s
        while len(self.log) > 1 and (
            self.size > self.args.max_bytes or self.log[0].written < horizon
        ):
            self.size -= len(self.log.popleft().message.body)
        self.notify()

    def notify(self) -> None:
        """Wake every reader waiting at the end of the log (append, delete, cancel)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    def position(self, start: port.StreamOffset) -> int:
        """The offset a reader attached at ``start`` looks at first."""
        first = self.log[0].offset if self.log else self.end
        if start == "first":
            return first
        if start == "next":
            return self.end
        if start == "last":
            return max(self.end - 1, first)
        if isinstance(start, int):
            return max(start, first)
        assert isinstance(start, _dt.datetime)
        since = start.timestamp()
        return next((e.offset for e in self.log if e.written >= since), self.end)

    def entry_at(self, offset: int) -> _Entry | None:
        """The entry at ``offset``, or the oldest retained one after it; None at the end."""
        if not self.log or offset >= self.end:
            return None
        return self.log[max(0, offset - self.log[0].offset)]


class _Broker:
    def __init__(self) -> None:
        self.exchanges: set[str] = set()
        self.queues: dict[str, _Queue] = {}
        self.streams: dict[str, _Stream] = {}

    def route(self, exchange: str, message: _Message) -> int:
        routed = 0
        targets: list[_Queue | _Stream] = [*self.queues.values(), *self.streams.values()]
        for target in targets:
            if any(
                bound == exchange and topology.topic_matches(pattern, message.routing_key)
                for bound, pattern in target.bindings
            ):
                target.accept(
                    _Message(message.body, exchange, message.routing_key, dict(message.headers))
                )
                routed += 1
        return routed

    def give_back(self, queue: _Queue, message: _Message) -> None:
        """A delivery came back unsettled-or-retried: requeue it within the limit."""
        if message.deliveries >= queue.args.delivery_limit:
            # A transient (classic) queue has no broker-side limit: its subscription
            # rejects the message, so RabbitMQ records "rejected".
            reason = (
                topology.DEATH_REJECTED if queue.args.transient else topology.DEATH_DELIVERY_LIMIT
            )
            self.dead_letter(queue, message, reason)
        elif queue.name in self.queues:
            queue.ready.appendleft(message)
        queue.dispatch()

    def dead_letter(self, queue: _Queue, message: _Message, reason: str) -> None:
        dlx = queue.args.dead_letter_exchange
        if dlx is None or dlx not in self.exchanges:
            return
        headers = dict(message.headers)
        deaths = [dict(d) for d in headers.get("x-death", [])]
        for death in deaths:
            if death.get("queue") == queue.name and death.get("reason") == reason:
                death["count"] = int(death.get("count", 1)) + 1
                break
        else:
            deaths.insert(
                0,
                {
                    "count": 1,
                    "reason": reason,
                    "queue": queue.name,
                    "exchange": message.exchange,
                    "routing-keys": [message.routing_key],
                    "time": _dt.datetime.now(_dt.UTC).replace(microsecond=0),
                },
            )
        headers["x-death"] = deaths
        headers.setdefault("x-first-death-reason", reason)
        headers.setdefault("x-first-death-queue", queue.name)
        headers.setdefault("x-first-death-exchange", message.exchange)
        headers.pop("x-delivery-count", None)
        self.route(dlx, _Message(message.body, dlx, message.routing_key, headers))


_brokers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Broker]] = (
    weakref.WeakKeyDictionary()
)


def _broker_for(name: str) -> _Broker:
    loop = asyncio.get_running_loop()
    return _brokers.setdefault(loop, {}).setdefault(name, _Broker())


class _Consumer(Subscription):
    def __init__(
        self, bus: MemoryBus, queue: _Queue, handler: Handler, prefetch: int, spec: QueueSpec
    ) -> None:
        self.bus = bus
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch
        self.spec = spec
        self.queue_name = bus.logical(queue.name) or queue.name
        self.in_flight: dict[asyncio.Task[None], _Message] = {}
        self._cancelled = False

    def deliver(self, message: _Message) -> None:
        message.deliveries += 1
        headers = copy.deepcopy(message.headers)
        if message.deliveries > 1:
            # Quorum queues count returns in this header; the first delivery has none.
            headers["x-delivery-count"] = message.deliveries - 1
        delivery = self.bus._delivery(
            message.body,
            message.routing_key,
            message.exchange,
            headers,
            redelivered=message.deliveries > 1,
            delivery_count=message.deliveries,
        )
        task = asyncio.get_running_loop().create_task(self._handle(delivery, message))
        self.in_flight[task] = message

    async def _handle(self, delivery: Delivery, message: _Message) -> None:
        broker = self.bus._broker
        try:
            outcome = await settle_outcome(self.handler, delivery, self.spec.retry_delay)
        except asyncio.CancelledError:
            # Abandoned mid-handler (consumer cancelled or bus closed): the broker takes
            # the message back, exactly as RabbitMQ does when a channel closes.
            self.in_flight.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            broker.give_back(self.queue, message)
            raise
        self.in_flight.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
        if outcome is Outcome.ACK:
            self.queue.dispatch()
        elif outcome is Outcome.REJECT:
            broker.dead_letter(self.queue, message, topology.DEATH_REJECTED)
            self.queue.dispatch()
        else:
            broker.give_back(self.queue, message)

    async def cancel(self, timeout: float = 10.0) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        if self in self.queue.consumers:
            self.queue.consumers.remove(self)
        self.bus._subscriptions.discard(self)
        await finish_tasks(self.in_flight, timeout)
        broker = self.bus._broker
        if self.queue.args.transient and not self.queue.consumers:
            # auto-delete: the last consumer of a transient queue takes it with it
            if broker.queues.get(self.queue.name) is self.queue:
                del broker.queues[self.queue.name]
            self.queue.ready.clear()
            return
        # Another consumer (e.g. the next single-active one) takes over what is queued.
        self.queue.dispatch()


class _MemoryStreamReader(port.StreamReader):
    def __init__(self, bus: MemoryBus, stream: _Stream, read: port.StreamRead) -> None:
        super().__init__(read)
        self.bus = bus
        self.stream = stream
        self._position = stream.position(read.start)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not (self._cancelled or self.stream.deleted):
            entry = self.stream.entry_at(self._position)
            if entry is None:
                await self.stream.changed()
                continue
            self._position = entry.offset + 1
            message = entry.message
            delivery = self.bus._delivery(
                message.body,
                message.routing_key,
                message.exchange,
                copy.deepcopy(message.headers),
                redelivered=False,
                delivery_count=1,
                offset=entry.offset,
            )
            await self._hand_over(delivery)

    async def cancel(self, timeout: float = 10.0) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        self.bus._subscriptions.discard(self)
        self.stream.notify()
        await finish_tasks([self._task], timeout)


class MemoryBus(Bus):
    """The in-memory adapter. Use :func:`qflare.bus.connect_bus` with ``memory://``."""

    def __init__(
        self,
        broker_name: str = "",
        prefix: str = "",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        super().__init__(prefix, max_message_size)
        self._broker = _broker_for(broker_name)
        for exchange in topology.EXCHANGES:
            self._broker.exchanges.add(self.name(exchange))

    async def _publish(
        self, exchange: str, routing_key: str, body: bytes, table: dict[str, Any]
    ) -> bool:
        physical = self.name(exchange)
        if exchange not in topology.EXCHANGES or physical not in self._broker.exchanges:
            raise TopologyError(f"exchange {exchange!r} is not part of QFLARE's topology")
        return self._broker.route(physical, _Message(body, physical, routing_key, table)) > 0

    async def consume(self, spec: QueueSpec, handler: Handler, prefetch: int = 16) -> Subscription:
        self._check_open()
        check_prefetch(prefetch)
        queue = self._declare(spec)
        consumer = _Consumer(self, queue, handler, prefetch, spec)
        queue.consumers.append(consumer)
        self._subscriptions.add(consumer)
        queue.dispatch()
        return consumer

    def _check_bindable(self, name: str, bindings: Iterable[tuple[str, str]]) -> None:
        for exchange, _ in bindings:
            if (
                exchange not in topology.EXCHANGES
                or self.name(exchange) not in self._broker.exchanges
            ):
                raise TopologyError(f"cannot bind {name!r} to unknown exchange {exchange!r}")

    def _declare(self, spec: QueueSpec) -> _Queue:
        self._check_bindable(spec.name, spec.bindings)
        if self.name(spec.name) in self._broker.streams:
            raise TopologyError(f"{spec.name!r} is a stream; read it with read_stream")
        args = _QueueArgs(
            single_active=spec.single_active,
            delivery_limit=spec.delivery_limit,
            dead_letter_exchange=self.name(topology.DEAD) if spec.dead_letter else None,
            transient=spec.transient,
        )
        logical = spec.name or transient_name()
        name = self.name(logical)
        queue = self._broker.queues.get(name)
        if queue is None:
            queue = self._broker.queues[name] = _Queue(
                name, args, owner=self if spec.transient else None
            )
        elif queue.args != args:
            raise TopologyError(
                f"queue {logical!r} exists with {queue.args}, declared again with {args}"
            )
        elif queue.owner is not None and queue.owner is not self:
            # RabbitMQ answers RESOURCE_LOCKED for another connection's exclusive queue.
            raise TopologyError(f"transient queue {logical!r} belongs to another bus")
        if not spec.transient:
            self._declared.add(logical)
        for exchange, pattern in spec.bindings:
            queue.bindings.add((self.name(exchange), pattern))
        return queue

    async def declare_stream(self, spec: port.StreamSpec) -> None:
        self._check_open()
        self._check_bindable(spec.name, spec.bindings)
        physical = self.name(spec.name)
        if physical in self._broker.queues:
            raise TopologyError(f"{spec.name!r} is a queue; a stream needs a name of its own")
        args = _StreamArgs(max_age_s=spec.max_age_s, max_bytes=spec.max_bytes)
        stream = self._broker.streams.get(physical)
        if stream is None:
            stream = self._broker.streams[physical] = _Stream(physical, args)
        elif stream.args != args:
            raise TopologyError(
                f"stream {spec.name!r} exists with {stream.args}, declared again with {args}"
            )
        self._declared.add(spec.name)
        for exchange, pattern in spec.bindings:
            stream.bindings.add((self.name(exchange), pattern))

    async def _read_stream(self, read: port.StreamRead) -> port.StreamReader:
        # the log is in memory: nothing is read ahead, so read.prefetch has nothing to bound
        name = read.name
        stream = self._broker.streams.get(self.name(name))
        if stream is None:
            what = "a queue, not a stream" if self.name(name) in self._broker.queues else "missing"
            raise port.StreamNotFound(f"stream {name!r} is {what}; declare it with declare_stream")
        reader = _MemoryStreamReader(self, stream, read)
        self._subscriptions.add(reader)
        return reader

    async def delete_stream(self, name: str) -> None:
        self._check_open()
        stream = self._broker.streams.pop(self.name(name), None)
        self._declared.discard(name)
        if stream is None:
            return
        stream.deleted = True
        stream.notify()
        mine = [
            s
            for s in self._subscriptions
            if isinstance(s, _MemoryStreamReader) and s.stream is stream
        ]
        await asyncio.gather(*(s.cancel(1.0) for s in mine))

    async def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        subs = list(self._subscriptions)
        await asyncio.gather(*(s.cancel(timeout) for s in subs))

    async def delete_all(self, queues: Iterable[str] = ()) -> None:
        self._check_deletable()
        del queues  # every queue with the prefix goes anyway
        await asyncio.gather(*(s.cancel(timeout=0) for s in list(self._subscriptions)))
        for name in [q for q in self._broker.queues if q.startswith(self.prefix)]:
            queue = self._broker.queues.pop(name)
            for consumer in list(queue.consumers):
                await consumer.cancel(timeout=0)
            queue.ready.clear()
        for name in [s for s in self._broker.streams if s.startswith(self.prefix)]:
            stream = self._broker.streams.pop(name)
            stream.deleted = True
            stream.notify()
        self._broker.exchanges -= {e for e in self._broker.exchanges if e.startswith(self.prefix)}
        log.debug("deleted in-memory topology with prefix %r", self.prefix)


__all__ = ["MemoryBus"]
