"""Embedded in-memory broker with RabbitMQ's semantics, for ``qflare simulate`` and tests.

It models what the services rely on, as the RabbitMQ adapter configures it: durable topic
exchanges, queues with bindings, competing consumers (round-robin), per-consumer prefetch,
manual settlement, redelivery of unsettled messages when a consumer goes away,
single-active-consumer queues, a delivery limit, and dead-lettering with RabbitMQ's
``x-death``/``x-first-death-*`` headers. One broker per (event loop, name): every
``connect_bus("memory://<name>")`` in the same loop shares it, as processes share a
RabbitMQ server. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as _dt
import weakref
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qflare.bus import topology
from qflare.bus.port import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Bus,
    Delivery,
    Handler,
    Outcome,
    QueueSpec,
    Subscription,
    TopologyError,
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

    def dispatch(self, broker: _Broker) -> None:
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


class _Broker:
    def __init__(self) -> None:
        self.exchanges: set[str] = set()
        self.queues: dict[str, _Queue] = {}

    def route(self, exchange: str, message: _Message) -> int:
        routed = 0
        for queue in list(self.queues.values()):
            for bound_exchange, pattern in queue.bindings:
                if bound_exchange == exchange and topology.topic_matches(
                    pattern, message.routing_key
                ):
                    queue.ready.append(
                        _Message(message.body, exchange, message.routing_key, dict(message.headers))
                    )
                    queue.dispatch(self)
                    routed += 1
                    break
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
        queue.dispatch(self)

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
            self.queue.dispatch(broker)
        elif outcome is Outcome.REJECT:
            broker.dead_letter(self.queue, message, topology.DEATH_REJECTED)
            self.queue.dispatch(broker)
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
        self.queue.dispatch(broker)


class MemoryBus(Bus):
    """The in-memory adapter. Use :func:`qflare.bus.connect_bus` with ``memory://``."""

    def __init__(
        self,
        broker_name: str = "",
        prefix: str = "",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.prefix = prefix
        self.max_message_size = max_message_size
        self._broker = _broker_for(broker_name)
        self._subscriptions: set[_Consumer] = set()
        self._declared: set[str] = set()
        self._closed = False
        for exchange in topology.EXCHANGES:
            self._broker.exchanges.add(self.name(exchange))

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: Mapping[str, Any] | None = None,
    ) -> bool:
        table = self._check_publish(routing_key, body, headers)
        physical = self.name(exchange)
        if exchange not in topology.EXCHANGES or physical not in self._broker.exchanges:
            raise TopologyError(f"exchange {exchange!r} is not part of QFLARE's topology")
        message = _Message(bytes(body), physical, routing_key, table)
        return self._broker.route(physical, message) > 0

    async def consume(self, spec: QueueSpec, handler: Handler, prefetch: int = 16) -> Subscription:
        self._check_open()
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an int >= 1, got {prefetch!r}")
        queue = self._declare(spec)
        consumer = _Consumer(self, queue, handler, prefetch, spec)
        queue.consumers.append(consumer)
        self._subscriptions.add(consumer)
        queue.dispatch(self._broker)
        return consumer

    def _declare(self, spec: QueueSpec) -> _Queue:
        for exchange, _ in spec.bindings:
            if (
                exchange not in topology.EXCHANGES
                or self.name(exchange) not in self._broker.exchanges
            ):
                raise TopologyError(f"cannot bind {spec.name!r} to unknown exchange {exchange!r}")
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

    async def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        subs = list(self._subscriptions)
        await asyncio.gather(*(s.cancel(timeout) for s in subs))

    @property
    def declared_queues(self) -> frozenset[str]:
        return frozenset(self._declared)

    async def delete_all(self, queues: Iterable[str] = ()) -> None:
        self._check_deletable()
        del queues  # every queue with the prefix goes anyway
        await asyncio.gather(*(s.cancel(timeout=0) for s in list(self._subscriptions)))
        for name in [q for q in self._broker.queues if q.startswith(self.prefix)]:
            queue = self._broker.queues.pop(name)
            for consumer in list(queue.consumers):
                await consumer.cancel(timeout=0)
            queue.ready.clear()
        self._broker.exchanges -= {e for e in self._broker.exchanges if e.startswith(self.prefix)}
        log.debug("deleted in-memory topology with prefix %r", self.prefix)


__all__ = ["MemoryBus"]
