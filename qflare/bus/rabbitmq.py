"""RabbitMQ adapter (aio-pika) for the transport port (DESIGN §5).

Every queue is a durable quorum queue with a dead-letter exchange (``qflare.dead``) and a
delivery limit; stateful consumers get ``x-single-active-consumer``. Publishes are
persistent, mandatory and confirmed. The connection is aio-pika's robust connection: on
reconnect it re-opens channels and re-declares the exchanges, queues, bindings, QoS and
consumers declared through it, so topology survives broker restarts.

What aio-pika leaves to us (FACTS.md): publishes during an outage raise at once and are not
buffered, so :meth:`RabbitBus.publish` retries a bounded time with backoff (a lost confirm
can therefore duplicate a message: consumers are idempotent, delivery is at-least-once);
the first connect does not retry under ``fail_fast``, so :meth:`RabbitBus.connect` does;
and the broker's ``max_message_size`` is only enforced after the whole body was sent, so the
size is checked before sending.

RabbitMQ's ``x-delivery-limit`` counts *returns* (a message is dead-lettered when it was
returned more than that many times); :class:`QueueSpec.delivery_limit` counts deliveries,
hence ``x-delivery-limit = delivery_limit - 1``.

Transient queues (``QueueSpec.transient``) are classic, non-durable, exclusive and
auto-delete: the broker removes them when their consumer is cancelled or the connection
dies. After a reconnect the robust channel declares them again (the old connection is gone,
so its exclusive queue is too and the name is free; should the broker not have noticed the
old connection's death yet, the restore fails with RESOURCE_LOCKED and aio-pika retries the
reconnect). Classic queues have no ``x-delivery-limit``, so the subscription runs RETRY
itself, on the same message, up to the limit, then rejects it.

Restricted broker users (a participant's, DESIGN §4) have no configure permission on the
exchanges: with ``declare="passive"`` the bus only checks, by passive declarations, that the
exchanges and the durable queues it consumes exist (the definitions file creates them), and
binds queues, which needs only write on the queue and read on the exchange. A refused
permission is :class:`AccessRefused`, never retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aio_pika
import aiormq
import aiormq.abc
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from qflare.bus import topology
from qflare.bus.port import (
    DEFAULT_MAX_MESSAGE_SIZE,
    AccessRefused,
    Bus,
    BusClosed,
    BusUnavailable,
    Handler,
    Outcome,
    PublishFailed,
    QueueSpec,
    Subscription,
    TopologyError,
    finish_tasks,
    settle_outcome,
    transient_name,
)

log = logging.getLogger("qflare.bus.rabbitmq")

#: ``declare=`` values: create the topology, or only check that it exists.
DECLARE_MODES = ("full", "passive")

#: Faults that a reconnect can cure; everything else is the caller's problem.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


def _backoff(attempt: int, cap: float = 2.0) -> float:
    return min(cap, 0.1 * 2**attempt)


def _map_leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    if isinstance(value, dict):
        return {k: _map_leaves(v, leaf) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_leaves(v, leaf) for v in value]
    return leaf(value)


def _to_amqp(value: Any) -> Any:
    # pamqp encodes only bytearray as a byte array (type 'x'), not bytes.
    return _map_leaves(value, lambda v: bytearray(v) if isinstance(v, bytes) else v)


def _from_amqp(value: Any) -> Any:
    return _map_leaves(value, lambda v: bytes(v) if isinstance(v, bytearray) else v)


def queue_arguments(spec: QueueSpec, prefix: str) -> dict[str, Any]:
    """The ``x-`` arguments of ``spec``: part of the topology contract (a re-declaration
    with other arguments fails with PRECONDITION_FAILED)."""
    if spec.transient:
        # exclusive/auto-delete queues cannot be quorum queues; say "classic" explicitly
        # so a vhost whose default queue type is quorum does not refuse them
        args: dict[str, Any] = {"x-queue-type": "classic"}
        if spec.dead_letter:
            args["x-dead-letter-exchange"] = prefix + topology.DEAD
        return args
    args = {
        "x-queue-type": "quorum",
        "x-delivery-limit": spec.delivery_limit - 1,
    }
    if spec.dead_letter:
        args["x-dead-letter-exchange"] = prefix + topology.DEAD
    if spec.single_active:
        args["x-single-active-consumer"] = True
    return args


class _RabbitSubscription(Subscription):
    def __init__(
        self,
        bus: RabbitBus,
        spec: QueueSpec,
        handler: Handler,
        channel: AbstractRobustChannel,
        queue: AbstractQueue,
    ) -> None:
        self.bus = bus
        self.spec = spec
        self.handler = handler
        self.channel = channel
        self.queue = queue
        self.queue_name = bus.logical(queue.name) or queue.name
        self.consumer_tag: str | None = None
        self.in_flight: set[asyncio.Task[Any]] = set()
        self._cancelled = False

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.in_flight.add(task)
        try:
            await self._handle(message)
        finally:
            if task is not None:
                self.in_flight.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        headers = _from_amqp(dict(message.headers or {}))
        returns = headers.get("x-delivery-count", 0)
        delivery = self.bus._delivery(
            message.body,
            message.routing_key or "",
            message.exchange,
            headers,
            redelivered=bool(message.redelivered),
            delivery_count=int(returns) + 1 if isinstance(returns, int) else 1,
        )
        outcome = await settle_outcome(self.handler, delivery, self.spec.retry_delay)
        if self.spec.transient:
            # no broker-side count on a classic queue: retry here, then give up
            while outcome is Outcome.RETRY and not self._cancelled:
                if delivery.delivery_count >= self.spec.delivery_limit:
                    outcome = Outcome.REJECT
                    break
                delivery = dataclasses.replace(
                    delivery, redelivered=True, delivery_count=delivery.delivery_count + 1
                )
                outcome = await settle_outcome(self.handler, delivery, self.spec.retry_delay)
        try:
            if outcome is Outcome.ACK:
                await message.ack()
            elif outcome is Outcome.REJECT:
                await message.reject(requeue=False)
            else:
                await message.nack(requeue=True)
        except RETRYABLE_ERRORS as exc:
            # The channel that carried it is gone; the broker redelivers the message.
            log.warning(
                "could not %s a message on %s: %r; it will be redelivered",
                outcome.value,
                self.spec.name,
                exc,
            )

    async def cancel(self, timeout: float = 10.0) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        self.bus._subscriptions.discard(self)
        if self.consumer_tag is not None:
            try:
                await self.queue.cancel(self.consumer_tag)
            except Exception as exc:
                log.debug("basic.cancel on %s failed: %r", self.spec.name, exc)
        await finish_tasks(self.in_flight, timeout)
        # Closing the channel hands every unsettled message back to the broker.
        try:
            await self.channel.close()
        except Exception as exc:
            log.debug("closing the channel of %s failed: %r", self.spec.name, exc)


class RabbitBus(Bus):
    """The RabbitMQ adapter. Use :func:`qflare.bus.connect_bus` with an ``amqp://`` URL."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractRobustChannel,
        prefix: str,
        max_message_size: int,
        publish_timeout: float,
        connection_name: str,
    ) -> None:
        self.prefix = prefix
        self.max_message_size = max_message_size
        self.publish_timeout = publish_timeout
        self.connection_name = connection_name
        self.passive = False
        self._connection = connection
        self._channel = channel
        self._exchanges: dict[str, AbstractExchange] = {}
        self._declared_queues: set[str] = set()
        self._subscriptions: set[_RabbitSubscription] = set()
        self._closed = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        prefix: str = "",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        connect_timeout: float = 30.0,
        publish_timeout: float = 30.0,
        reconnect_interval: float = 1.0,
        connection_name: str | None = None,
        declare: str = "full",
    ) -> RabbitBus:
        """Connect, retrying for up to ``connect_timeout`` seconds, and declare the
        exchanges (``declare="passive"``: check that they exist). Raises
        :class:`BusUnavailable` when the broker stays unreachable, :class:`TopologyError`
        when a passively declared exchange is missing, :class:`AccessRefused` when the user
        may not declare them."""
        if declare not in DECLARE_MODES:
            raise ValueError(f"declare must be one of {DECLARE_MODES}, got {declare!r}")
        name = connection_name or (
            f"qflare:{prefix or '-'}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        deadline = time.monotonic() + connect_timeout
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                connection = await aio_pika.connect_robust(
                    url,
                    client_properties={"connection_name": name},
                    reconnect_interval=reconnect_interval,
                    timeout=max(1.0, min(10.0, remaining)),
                )
                break
            except RETRYABLE_ERRORS as exc:
                attempt += 1
                wait = _backoff(attempt)
                if time.monotonic() + wait >= deadline:
                    raise BusUnavailable(
                        f"cannot reach RabbitMQ at {_redact(url)} after {attempt} attempts "
                        f"in {connect_timeout:.0f}s: {exc!r}. Is it running "
                        f"(rabbitmq-server -detached)?"
                    ) from exc
                log.info("RabbitMQ not reachable yet (%r); retrying in %.1fs", exc, wait)
                await asyncio.sleep(wait)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
            bus = cls(connection, channel, prefix, max_message_size, publish_timeout, name)
            bus.passive = declare == "passive"
            await bus._declare_exchanges()
        except BaseException:
            await connection.close()
            raise
        return bus

    async def _declare_exchanges(self) -> None:
        # Declared through the robust channel, so they are declared again on reconnect.
        for logical in topology.EXCHANGES:
            try:
                self._exchanges[logical] = await self._channel.declare_exchange(
                    self.name(logical),
                    aio_pika.ExchangeType.TOPIC,
                    durable=True,
                    passive=self.passive,
                )
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise TopologyError(
                    f"exchange {self.name(logical)!r} exists but is not a durable topic "
                    f"exchange: {exc}"
                ) from exc
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                raise TopologyError(
                    f"exchange {self.name(logical)!r} does not exist; with declare='passive' "
                    f"the broker's definitions must create it (qflare broker-definitions): {exc}"
                ) from exc
            except aiormq.exceptions.ChannelAccessRefused as exc:
                raise AccessRefused(
                    f"may not declare exchange {self.name(logical)!r} (a restricted broker "
                    f"user connects with declare='passive'): {exc}"
                ) from exc

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: Mapping[str, Any] | None = None,
    ) -> bool:
        table = self._check_publish(routing_key, body, headers)
        target = self._exchanges.get(exchange)
        if target is None:
            raise TopologyError(f"exchange {exchange!r} is not part of QFLARE's topology")
        message = aio_pika.Message(
            body if isinstance(body, bytes) else bytes(body),
            headers=_to_amqp(table),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        deadline = time.monotonic() + self.publish_timeout
        attempt = 0
        while True:
            try:
                result = await target.publish(
                    message,
                    routing_key,
                    mandatory=True,
                    timeout=max(0.5, deadline - time.monotonic()),
                )
            except aio_pika.exceptions.DeliveryError as exc:
                raise PublishFailed(
                    f"broker refused the message to {exchange}/{routing_key}: {exc!r}"
                ) from exc
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise PublishFailed(
                    f"broker refused the message to {exchange}/{routing_key}: {exc!r}"
                ) from exc
            except aiormq.exceptions.ChannelAccessRefused as exc:
                # before RETRYABLE_ERRORS: a missing permission does not heal by retrying
                raise AccessRefused(
                    f"this broker user may not publish to {exchange}/{routing_key}: {exc}"
                ) from exc
            except RETRYABLE_ERRORS as exc:
                if self._closed:
                    raise BusClosed("the bus was closed during publish") from exc
                attempt += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BusUnavailable(
                        f"publish to {exchange}/{routing_key} failed {attempt} times in "
                        f"{self.publish_timeout:.0f}s: {exc!r}"
                    ) from exc
                log.info("publish failed (%r); retry %d", exc, attempt)
                await asyncio.sleep(min(_backoff(attempt), remaining))
                await self._wait_ready(deadline)
                continue
            return not isinstance(result, aiormq.abc.DeliveredMessage)

    async def _wait_ready(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            await asyncio.wait_for(self._channel.ready(), remaining)
        except (TimeoutError, *RETRYABLE_ERRORS):
            pass

    async def consume(self, spec: QueueSpec, handler: Handler, prefetch: int = 16) -> Subscription:
        self._check_open()
        if not isinstance(prefetch, int) or not 1 <= prefetch <= 65535:
            raise ValueError(f"prefetch must be an int in 1..65535, got {prefetch!r}")
        for exchange, _ in spec.bindings:
            if exchange not in self._exchanges:
                raise TopologyError(f"cannot bind {spec.name!r} to unknown exchange {exchange!r}")
        # One channel per subscription: QoS is per channel, and closing it is how a
        # consumer hands its unsettled messages back (single-active takeover).
        channel = await self._connection.channel(publisher_confirms=False)
        logical = spec.name or transient_name()
        # a transient queue cannot pre-exist, so even a passive bus declares it
        passive = self.passive and not spec.transient
        try:
            await channel.set_qos(prefetch_count=prefetch)
            try:
                queue = await channel.declare_queue(
                    self.name(logical),
                    durable=not spec.transient,
                    exclusive=spec.transient,
                    auto_delete=spec.transient,
                    arguments=queue_arguments(spec, self.prefix),
                    passive=passive,
                )
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise TopologyError(
                    f"queue {logical!r} exists with other arguments than "
                    f"{queue_arguments(spec, self.prefix)}: {exc}"
                ) from exc
            except aiormq.exceptions.ChannelLockedResource as exc:
                raise TopologyError(
                    f"transient queue {logical!r} belongs to another connection: {exc}"
                ) from exc
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                raise TopologyError(
                    f"queue {logical!r} does not exist; with declare='passive' the broker's "
                    f"definitions must create it: {exc}"
                ) from exc
            if not spec.transient:
                # transient queues clean up after themselves; delete_all must not touch
                # another connection's exclusive queue (RESOURCE_LOCKED)
                self._declared_queues.add(logical)
            for exchange, pattern in spec.bindings:
                await queue.bind(self.name(exchange), pattern)
            sub = _RabbitSubscription(self, spec, handler, channel, queue)
            sub.consumer_tag = await queue.consume(sub.on_message, no_ack=False)
        except aiormq.exceptions.ChannelAccessRefused as exc:
            if not channel.is_closed:
                await channel.close()
            raise AccessRefused(
                f"this broker user may not declare, bind or read {logical!r}: {exc}"
            ) from exc
        except BaseException:
            if not channel.is_closed:
                await channel.close()
            raise
        self._subscriptions.add(sub)
        return sub

    async def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(
            *(s.cancel(timeout) for s in list(self._subscriptions)), return_exceptions=True
        )
        try:
            await self._connection.close()
        except Exception as exc:
            log.debug("closing the connection failed: %r", exc)

    @property
    def declared_queues(self) -> frozenset[str]:
        return frozenset(self._declared_queues)

    async def delete_all(self, queues: Iterable[str] = ()) -> None:
        # AMQP cannot list queues by prefix, so the bus deletes what it knows of.
        self._check_deletable()
        self._check_open()
        await asyncio.gather(
            *(s.cancel(1.0) for s in list(self._subscriptions)), return_exceptions=True
        )
        channel = await self._connection.channel()
        try:
            for logical in sorted(self._declared_queues | set(queues)):
                await channel.queue_delete(self.name(logical))
            for logical in topology.EXCHANGES:
                await channel.exchange_delete(self.name(logical))
        finally:
            await channel.close()

    @property
    def connection(self) -> AbstractRobustConnection:
        return self._connection


def _redact(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


__all__ = ["DECLARE_MODES", "RETRYABLE_ERRORS", "RabbitBus", "queue_arguments"]
