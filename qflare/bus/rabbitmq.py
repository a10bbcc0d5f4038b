"""RabbitMQ adapter (aio-pika) for the transport port (docs/architecture.md).

Every queue is a durable quorum queue with a dead-letter exchange (``qflare.dead``) and a
delivery limit; stateful consumers get ``x-single-active-consumer``. Publishes are
persistent, mandatory and confirmed. The connection is aio-pika's robust connection: on
reconnect it re-opens channels and re-declares the exchanges, queues, bindings, QoS and
consumers declared through it, so topology survives broker restarts.

What aio-pika leaves to us (measured here; docs/CONTRACTS.md, "qflare.bus"): publishes during an outage raise at once and are not
buffered, so :meth:`RabbitBus.publish` retries a bounded time with backoff (a lost confirm
can therefore duplicate a message: consumers are idempotent, delivery is at-least-once);
the first connect does not retry under ``fail_fast``, so :meth:`RabbitBus.connect` does;
and the broker's ``max_message_size`` is only enforced after the whole body was sent, so the
size is checked before sending. A nack (a queue of the fan-out refused the message; others may
have taken it) is retried like an outage, until ``publish_timeout``, on a renewed publishing
channel (:meth:`RabbitBus._renew_channel`): on a cluster a quorum queue refuses until a new
leader is elected, and a channel reopened after a node died can refuse everything it is given.

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

Streams (``StreamSpec``) are stream queues (``x-queue-type: stream``) with ``x-max-age``,
``x-max-length-bytes`` and a segment size of a quarter of ``max_bytes`` (at most RabbitMQ's
500 MB default), since the broker drops whole segments only, and only when a new one starts.
They are declared through one robust channel of the bus, so a reconnect declares them and
their bindings again. Each reader has its own channel (a prefetch is required for a stream
consumer) and consumes with ``x-stream-offset``; the delivery's ``x-stream-offset`` header is
its offset. One worker task per reader hands messages over in order, one at a time; acks
only return credit. Over AMQP 0.9.1 a consumer attached at offset N may get the start of
the chunk that holds N, and one attached at ``"last"`` gets the whole last chunk: the reader
skips what lies before N, and for ``"last"`` keeps only the newest message of the burst that
arrives in the first moments (``LAST_FIRST_WAIT``, ``LAST_QUIET``). Stream consumers are not
registered with aio-pika's channel (it would consume again at the original offset): after a
reconnect the reader consumes again itself, after the last offset it handed over; if it had
handed nothing yet, from the original offset, or for "next"/"last" from the second it was
attached (at least everything that is new to it).

A RabbitMQ cluster: ``url`` may name several nodes, comma-separated
(:func:`qflare.bus.port.broker_addresses`). The bus connects to the first that answers, and
when the node in use goes away (killed, partitioned) each reconnect attempt goes to the next
address in the list, round robin, so the robust connection restores its channels, queues,
bindings and consumers (and the stream readers theirs) on a node that is up. Quorum queues
and streams are replicated by the broker: RabbitMQ 3.x places a replica of each on every node
of the cluster by default, and ``replicas`` (``[qflare] broker_replicas``) sets the count
explicitly (``x-quorum-initial-group-size``, ``x-initial-cluster-size``). That argument is
part of the topology contract like every other: every service of a deployment must use the
same value, and a queue declared with another one is a :class:`TopologyError`. Unset (the
default) declares no such argument, which is what a single node needs.

Restricted broker users (a participant's and each service role's: docs/CONTRACTS.md, broker
set-up) have no configure permission on the exchanges: with ``declare="passive"`` the bus only
checks, by passive declarations, that the exchanges and the durable queues it consumes exist
(the definitions file creates them), and binds queues, which needs only write on the queue and
read on the exchange. What no definitions file can hold is still declared: transient queues
(they belong to a connection) and job streams (the aggregator declares a job's streams at
submission and deletes them when it ends; its user has configure on them). A refused
permission is :class:`AccessRefused`, never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as _dt
import functools
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
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
    AbstractRobustQueue,
)
from yarl import URL

from qflare.bus import port, topology
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
    broker_addresses,
    check_prefetch,
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


#: What a publish is tried again after, until ``publish_timeout``: a nack, or an outage.
PUBLISH_AGAIN: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.DeliveryError,
    *RETRYABLE_ERRORS,
)

#: The least time between two renewals of a bus's publishing channel after a nack (seconds).
RENEW_MIN_S = 1.0

#: The most replicas ``replicas=`` accepts (RabbitMQ recommends 3 or 5 for quorum queues).
MAX_REPLICAS = 9
#: aio-pika's method that makes one connection attempt (name-mangled; see _FailoverConnection).
FAILOVER_HOOK = "_RobustConnection__connect_transport"
#: A login the broker refuses: the user is gone (revoked), its password changed, or it may
#: no longer use the virtual host.
LOGIN_REFUSED: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.AuthenticationError,
    aiormq.exceptions.ConnectionNotAllowed,
)

#: RabbitMQ's default stream segment size; smaller segments make retention finer.
MAX_SEGMENT_BYTES = 500_000_000
#: ``offset="last"``: how long to wait for the last chunk, and the gap that ends it.
LAST_FIRST_WAIT = 0.5
LAST_QUIET = 0.1


def _backoff(attempt: int, cap: float = 2.0) -> float:
    return min(cap, 0.1 * 2.0**attempt)


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


def queue_arguments(spec: QueueSpec, prefix: str, replicas: int | None = None) -> dict[str, Any]:
    """The ``x-`` arguments of ``spec``: part of the topology contract (a re-declaration
    with other arguments fails with PRECONDITION_FAILED). ``replicas``: the quorum queue's
    replica count on a cluster (None: the broker's default; transient queues have one)."""
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
    if replicas is not None:
        args["x-quorum-initial-group-size"] = check_replicas(replicas)
    return args


def stream_arguments(spec: port.StreamSpec, replicas: int | None = None) -> dict[str, Any]:
    """The ``x-`` arguments of a stream: part of the topology contract, as for queues.
    ``replicas``: its replica count on a cluster (None: the broker's default)."""
    args: dict[str, Any] = {
        "x-queue-type": "stream",
        "x-max-age": f"{spec.max_age_s}s",
        "x-max-length-bytes": spec.max_bytes,
        "x-stream-max-segment-size-bytes": min(MAX_SEGMENT_BYTES, spec.max_bytes // 4),
    }
    if replicas is not None:
        args["x-initial-cluster-size"] = check_replicas(replicas)
    return args


def check_replicas(replicas: int) -> int:
    """A replica count: an int from 1 to :data:`MAX_REPLICAS`."""
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise TypeError(f"replicas must be an int, got {replicas!r}")
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas must be 1..{MAX_REPLICAS}, got {replicas}")
    return replicas


class _FailoverConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection over several broker addresses (a cluster's nodes): the
    first attempt goes to the first address, every later one (a failed attempt, or the
    reconnect after the node in use went away) to the next, round robin. Everything else
    (restoring channels, topology and consumers) is aio-pika's.

    aio-pika reads ``self.url`` in each attempt, which starts in its private
    ``__connect_transport``; :data:`FAILOVER_HOOK` names it, and :meth:`RabbitBus.connect`
    refuses several addresses when the installed aio-pika has no such method (a test
    connects through a dead address first, so a silent change cannot pass)."""

    def __init__(
        self,
        url: Any,
        *args: Any,
        addresses: tuple[str, ...],
        refused: list[Callable[[str], None]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(url, *args, **kwargs)
        self.refused = refused if refused is not None else []
        first = self.url
        # the parameters aio-pika added to the first URL (connection name, reconnect
        # interval) go to every address; an address's own query parameters win
        self.addresses = tuple(
            URL(a).with_query({**first.query, **URL(a).query}) for a in addresses
        ) or (first,)
        self.attempts = 0

    async def _RobustConnection__connect_transport(self) -> None:
        self.url = self.addresses[self.attempts % len(self.addresses)]
        self.attempts += 1
        hook = getattr(super(), FAILOVER_HOOK)
        try:
            await hook()
        except LOGIN_REFUSED as exc:
            # aio-pika logs it and retries; the bus's owner is told (Bus.on_refused)
            for callback in self.refused:
                callback(f"RabbitMQ refused the login of {self.url.user!r}: {exc}")
            raise


#: The broker's refusals of a declaration, each with what it means for QFLARE's topology.
_DECLARE_REFUSALS: tuple[tuple[type[Exception], str], ...] = (
    (
        aiormq.exceptions.ChannelPreconditionFailed,
        "{what} {logical!r} exists with other arguments than {arguments}",
    ),
    (
        aiormq.exceptions.ChannelLockedResource,
        "transient {what} {logical!r} belongs to another connection",
    ),
    (
        aiormq.exceptions.ChannelNotFoundEntity,
        "{what} {logical!r} does not exist; with declare='passive' the broker's "
        "definitions must create it",
    ),
)


@contextlib.contextmanager
def _declaring(what: str, logical: str, arguments: dict[str, Any]) -> Iterator[None]:
    """Turn the broker's refusals of a declaration into :class:`TopologyError`."""
    try:
        yield
    except tuple(cls for cls, _ in _DECLARE_REFUSALS) as exc:
        text = next(t for cls, t in _DECLARE_REFUSALS if isinstance(exc, cls))
        meaning = text.format(what=what, logical=logical, arguments=arguments)
        raise TopologyError(f"{meaning}: {exc}") from exc


async def _ack(message: AbstractIncomingMessage, *, multiple: bool = False) -> None:
    # On a stream an ack only returns credit; one that fails (channel gone) loses nothing.
    try:
        await message.ack(multiple=multiple)
    except Exception as exc:
        log.debug("ack on a stream failed: %r", exc)


async def _close_connection(connection: aio_pika.abc.AbstractRobustConnection) -> None:
    try:
        await connection.close()
    except Exception as exc:
        log.debug("closing a connection that failed to set up failed: %r", exc)


async def _close_quietly(channel: AbstractRobustChannel, what: str) -> None:
    try:
        await channel.close()
    except Exception as exc:
        log.debug("closing the channel of %s failed: %r", what, exc)


@dataclasses.dataclass(eq=False)  # subscriptions live in sets: hash by identity
class _RabbitSubscription(Subscription):
    bus: RabbitBus
    spec: QueueSpec
    handler: Handler
    channel: AbstractRobustChannel
    queue: AbstractQueue
    consumer_tag: str | None = None
    in_flight: set[asyncio.Task[Any]] = dataclasses.field(default_factory=set)
    _cancelled: bool = False

    def __post_init__(self) -> None:
        self.queue_name = self.bus.logical(self.queue.name) or self.queue.name

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
        await _close_quietly(self.channel, self.spec.name)


class _RabbitStreamReader(port.StreamReader):
    def __init__(
        self,
        bus: RabbitBus,
        read: port.StreamRead,
        channel: AbstractRobustChannel,
        queue: AbstractRobustQueue,
    ) -> None:
        super().__init__(read)
        self.bus = bus
        self.channel = channel
        self.queue = queue
        self.consumer_tag: str | None = None
        self._attached_at = time.time()
        self._attached_to: object = None  # the underlying channel the consumer lives on
        self._generation = 0
        self._stale: set[str] = set()  # earlier consumers on the live channel, cancelled
        self._buffer: asyncio.Queue[tuple[int, AbstractIncomingMessage | None]] = asyncio.Queue()
        self._settling = False
        self._latest: AbstractIncomingMessage | None = None
        self._arrived = asyncio.Event()
        self._ended = False
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._spawn(self._run())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def attach(self) -> None:
        """Start consuming at the offset asked for; for "last", wait for the last chunk
        and keep only its newest message."""
        # The reopen hook first: a channel that reopens during the attach (the connection
        # dropped while the reader waited for the last chunk) must still be read again.
        # Its resumption waits for the lock, then consumes again unless this attach's
        # consume already went to the reopened channel.
        self.channel.reopen_callbacks.add(self._on_reopen)
        async with self._lock:
            self._settling = self.read.start == "last"
            try:
                await self._consume(self.read.start)
                if self._settling:
                    await self._settle_last()
            finally:
                self._settling = False

    async def _settle_last(self) -> None:
        wait = LAST_FIRST_WAIT
        while True:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except TimeoutError:
                break
            wait = LAST_QUIET
        self._settling = False
        if self._latest is not None:
            # the position is known now, so a reconnect before the hand-over resumes here
            self.next_offset = _offset_of(self._latest)
            self._buffer.put_nowait((self._generation, self._latest))
            self._latest = None

    async def _consume(self, offset: port.StreamOffset) -> None:
        self._generation += 1
        underlay = await self.channel.get_underlay_channel()
        self.consumer_tag = await self.queue.consume(
            functools.partial(self._on_message, self._generation),
            no_ack=False,
            arguments={"x-stream-offset": offset},
            robust=False,  # aio-pika would consume again at the original offset
        )
        self._attached_to = underlay
        underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)

    async def _on_message(self, generation: int, message: AbstractIncomingMessage) -> None:
        if generation != self._generation or self._cancelled:
            # an earlier consume's: the resumed consumer reads it again
            self._cancel_stale(message)
            return
        if not self._settling:
            self._buffer.put_nowait((generation, message))
            return
        # Only the newest message of the last chunk is handed over; ack the rest at once so
        # the broker sends the whole chunk.
        drop = self._latest
        if drop is not None and _offset_of(message) < _offset_of(drop):
            drop, message = message, drop
        self._latest = message
        self._arrived.set()
        if drop is not None:
            await _ack(drop)

    def _cancel_stale(self, message: AbstractIncomingMessage) -> None:
        """A delivery for an earlier consumer of this reader that still lives: a reopen
        between :meth:`_consume`'s channel lookup and its ``basic.consume`` put that consume
        on the new channel, where the resumption consumed again. Cancel it, or it would
        keep its prefetch window filled with deliveries nobody takes."""
        tag = message.consumer_tag
        if self._cancelled or not tag or tag == self.consumer_tag or tag in self._stale:
            return
        self._stale.add(tag)
        self._spawn(self._cancel_consumer(tag))

    async def _cancel_consumer(self, tag: str) -> None:
        try:
            await self.queue.cancel(tag)
            log.info("stream reader %s: earlier consumer %s cancelled", self.queue_name, tag)
        except Exception as exc:
            log.debug("basic.cancel of %s on stream %s failed: %r", tag, self.queue_name, exc)

    async def _run(self) -> None:
        # Credit goes back in batches: one ack (multiple) for up to half the prefetch, sent
        # at once when nothing else is waiting. An ack is a frame and a write each; a flood
        # of small messages would pay for as many acks as messages. The reader has a channel
        # of its own, so a multiple ack covers its deliveries only.
        batch = max(1, self.read.prefetch // 2)
        unacked = 0
        while True:
            generation, message = await self._buffer.get()
            if self._cancelled or message is None:
                return
            if generation != self._generation:
                unacked = 0  # its channel is gone, and the credit with it
                continue
            headers = _from_amqp(dict(message.headers or {}))
            offset = headers.pop("x-stream-offset", None)
            if not isinstance(offset, int):
                log.error("a delivery from stream %s has no offset; skipped", self.queue_name)
            else:
                delivery = self.bus._delivery(
                    message.body,
                    message.routing_key or "",
                    message.exchange,
                    headers,
                    redelivered=False,
                    delivery_count=1,
                    offset=offset,
                )
                await self._hand_over(delivery)
            unacked += 1
            if unacked >= batch or self._buffer.empty():
                await _ack(message, multiple=unacked > 1)
                unacked = 0

    def _resume_at(self) -> port.StreamOffset:
        if self.next_offset is not None:
            return self.next_offset
        if self.read.start in ("next", "last"):
            # Nothing handed yet: all that was written since the attach is new to it.
            return _dt.datetime.fromtimestamp(math.floor(self._attached_at), _dt.UTC)
        return self.read.start

    def _on_reopen(self, *_: object) -> None:
        self._spawn(self._reattach())

    async def _reattach(self) -> None:
        attempt = 0
        missing_since: float | None = None
        while not (self._cancelled or self._ended):
            async with self._lock:
                try:
                    if await self.channel.get_underlay_channel() is self._attached_to:
                        return  # another reopen got here first
                    offset = self._resume_at()
                    await self._consume(offset)
                    log.info("stream reader %s resumed at %r", self.queue_name, offset)
                    return
                except aiormq.exceptions.ChannelNotFoundEntity:
                    # Right after a broker restart a durable stream answers NOT_FOUND until its
                    # replica is up again: only a stream missing for a while is gone.
                    now = time.monotonic()
                    missing_since = missing_since if missing_since is not None else now
                    if now - missing_since > STREAM_GONE_AFTER_S:
                        self._end("the stream is gone")
                        return
                    attempt += 1
                except Exception as exc:
                    attempt += 1
                    log.warning(
                        "stream reader %s could not resume (%r); retry %d",
                        self.queue_name,
                        exc,
                        attempt,
                    )
            await asyncio.sleep(_backoff(attempt))

    def _on_broker_cancel(self, frame: Any) -> None:
        if getattr(frame, "consumer_tag", None) == self.consumer_tag:
            self._end("the broker cancelled its consumer (stream deleted?)")

    def _end(self, why: str) -> None:
        if not self._ended:
            self._ended = True
            log.warning("stream reader %s stops: %s", self.queue_name, why)

    async def cancel(self, timeout: float = 10.0) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        self.bus._subscriptions.discard(self)
        self.channel.reopen_callbacks.discard(self._on_reopen)
        if self.consumer_tag is not None and not self._ended:
            try:
                await self.queue.cancel(self.consumer_tag)
            except Exception as exc:
                log.debug("basic.cancel on stream %s failed: %r", self.queue_name, exc)
        self._buffer.put_nowait((-1, None))
        await finish_tasks(self._tasks, timeout)
        await _close_quietly(self.channel, self.queue_name)


def _offset_of(message: AbstractIncomingMessage) -> int:
    offset = (message.headers or {}).get("x-stream-offset")
    return offset if isinstance(offset, int) else -1


#: How long a stream may answer NOT_FOUND after a reconnect before its reader stops.
STREAM_GONE_AFTER_S = 30.0


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
        replicas: int | None = None,
    ) -> None:
        super().__init__(prefix, max_message_size)
        self.publish_timeout = publish_timeout
        self.connection_name = connection_name
        self.replicas = replicas
        self.passive = False
        self._connection = connection
        self._channel = channel
        self._exchanges: dict[str, AbstractExchange] = {}
        self._streams_channel: AbstractRobustChannel | None = None
        self._renewing = asyncio.Lock()
        self._renewed_at = -math.inf
        self._retiring: set[asyncio.Task[None]] = set()
        self._drops = 0  # how often the connection was lost (each before a reconnect)
        connection.close_callbacks.add(self._dropped)

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
        replicas: int | None = None,
    ) -> RabbitBus:
        """Connect, retrying for up to ``connect_timeout`` seconds, and declare the
        exchanges (``declare="passive"``: check that they exist). ``url`` may name several
        nodes of a cluster, comma-separated: each attempt, and each reconnect, goes to the
        next (module docstring); ``replicas`` is the replica count of the quorum queues and
        streams this bus declares (None: the broker's default). Raises
        :class:`BusUnavailable` when the broker stays unreachable, :class:`TopologyError`
        when a passively declared exchange is missing, :class:`AccessRefused` when the user
        may not declare them."""
        if declare not in DECLARE_MODES:
            raise ValueError(f"declare must be one of {DECLARE_MODES}, got {declare!r}")
        if replicas is not None:
            check_replicas(replicas)
        addresses = broker_addresses(url)
        if len(addresses) > 1 and not hasattr(aio_pika.RobustConnection, FAILOVER_HOOK):
            raise BusUnavailable(
                f"this aio-pika ({aio_pika.__version__}) has no {FAILOVER_HOOK}: it cannot "
                "fail over between several broker addresses; give one"
            )
        name = connection_name or (
            f"qflare:{prefix or '-'}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        deadline = time.monotonic() + connect_timeout
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            # each attempt starts at the next address, and fails over from there
            turn = attempt % len(addresses)
            order = (*addresses[turn:], *addresses[:turn])
            refused: list[Callable[[str], None]] = []  # the bus's, once it exists
            connection: aio_pika.abc.AbstractRobustConnection | None = None
            try:
                connection = await aio_pika.connect_robust(
                    order[0],
                    client_properties={"connection_name": name},
                    reconnect_interval=reconnect_interval,
                    timeout=max(1.0, min(10.0, remaining)),
                    connection_class=functools.partial(
                        _FailoverConnection, addresses=order, refused=refused
                    ),
                )
                # the first channel and the exchanges in the same attempt: a connection the
                # broker closes while they open (INTERNAL_ERROR when a channel process
                # crashes) is one more failed attempt, not a participant that dies at start
                channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
                bus = cls(
                    connection, channel, prefix, max_message_size, publish_timeout, name, replicas
                )
                bus.passive = declare == "passive"
                refused.append(bus._refused)
                await bus._declare_exchanges()
                return bus
            except RETRYABLE_ERRORS as exc:
                if connection is not None:
                    await _close_connection(connection)
                attempt += 1
                wait = 0.0 if attempt % len(addresses) else _backoff(attempt // len(addresses))
                if time.monotonic() + wait >= deadline:
                    raise BusUnavailable(
                        f"cannot reach RabbitMQ at {_redact(url)} after {attempt} attempts "
                        f"in {connect_timeout:.0f}s: {exc!r}. Is it running "
                        f"(rabbitmq-server -detached)?"
                    ) from exc
                log.info("RabbitMQ not reachable yet (%r); retrying in %.1fs", exc, wait)
                await asyncio.sleep(wait)
            except BaseException:
                if connection is not None:
                    await _close_connection(connection)
                raise

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
                    f"user connects with declare='passive'; a service: [qflare] "
                    f"broker_declare = 'passive' or QFLARE_BROKER_DECLARE=passive): {exc}"
                ) from exc

    async def _publish(
        self, exchange: str, routing_key: str, body: bytes, table: dict[str, Any]
    ) -> bool:
        if exchange not in self._exchanges:
            raise TopologyError(f"exchange {exchange!r} is not part of QFLARE's topology")
        message = aio_pika.Message(
            body,
            headers=_to_amqp(table),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        deadline = time.monotonic() + self.publish_timeout
        attempt = 0
        while True:
            channel, target = self._channel, self._exchanges[exchange]
            try:
                result = await target.publish(
                    message,
                    routing_key,
                    mandatory=True,
                    timeout=max(0.5, deadline - time.monotonic()),
                )
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise PublishFailed(
                    f"broker refused the message to {exchange}/{routing_key}: {exc!r}"
                ) from exc
            except aiormq.exceptions.ChannelAccessRefused as exc:
                # before RETRYABLE_ERRORS: a missing permission does not heal by retrying
                raise AccessRefused(
                    f"this broker user may not publish to {exchange}/{routing_key}: {exc}"
                ) from exc
            except PUBLISH_AGAIN as exc:
                # A nack (DeliveryError): a queue it was routed to did not take it, while the
                # others may have (a fan-out is confirmed as a whole). Refusals pass like
                # outages: a quorum queue whose leader died refuses until another is elected,
                # and a channel can go on refusing everything after a cluster node died. So
                # both are published again until publish_timeout, a refused one on a fresh
                # channel (at most one a RENEW_MIN_S): a queue that took it gets it twice,
                # and every consumer is idempotent. Giving up at the first refusal left the
                # queues that refused without it while the others moved on
                # (tests/e2e/test_cluster.py: round.closed reached the detector and ingest
                # but never the console's queue).
                if self._closed:
                    raise BusClosed("the bus was closed during publish") from exc
                nacked = isinstance(exc, aio_pika.exceptions.DeliveryError)
                attempt += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    what = (
                        f"{exchange}/{routing_key} {attempt} times in {self.publish_timeout:.0f}s"
                    )
                    if nacked:
                        raise PublishFailed(
                            f"broker refused the message to {what}: {exc!r}"
                        ) from exc
                    raise BusUnavailable(f"publish to {what} failed: {exc!r}") from exc
                if nacked:
                    with contextlib.suppress(*RETRYABLE_ERRORS):  # the next attempt tries again
                        await self._renew_channel(channel, exc)
                else:
                    log.info("publish failed (%r); retry %d", exc, attempt)
                await asyncio.sleep(min(_backoff(attempt), remaining))
                if not nacked:
                    await self._wait_ready(deadline)
                continue
            return not isinstance(result, aiormq.abc.DeliveredMessage)

    async def _renew_channel(self, nacked: AbstractRobustChannel, why: BaseException) -> bool:
        """Publish on a fresh channel from now on, the one that refused a message closed;
        True when the channel was renewed (by this call or another since). At most once per
        :data:`RENEW_MIN_S` seconds: a queue that refuses every message (a full one with
        ``reject-publish``) costs a channel now and then, not one per message.

        Measured on a three-node RabbitMQ 3.10.8 cluster (tests/e2e/test_cluster.py): after
        ``kill -9`` of the node in use, a publishing channel reopened on another node was
        nacked on every publish for minutes while a new channel on the same connection had
        every publish confirmed by the same queues."""
        async with self._renewing:
            if self._channel is not nacked:
                return True  # another publish renewed it
            if self._closed or time.monotonic() - self._renewed_at < RENEW_MIN_S:
                return False
            self._renewed_at = time.monotonic()
            try:
                fresh = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=False
                )
            except RETRYABLE_ERRORS as exc:
                log.warning("could not open a fresh publishing channel: %r", exc)
                return False
            self._channel = fresh
            try:
                await self._declare_exchanges()
            except BaseException:
                self._channel = nacked
                await _close_quietly(fresh, "a fresh publishing channel")
                raise
            log.warning("the broker refused a message (%r); publishing on a fresh channel", why)
        # closed once what is in flight on it had its time: closing it now would cancel
        # the confirms other publishes are waiting for
        task = asyncio.get_running_loop().create_task(self._retire(nacked))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return True

    async def _retire(self, channel: AbstractRobustChannel) -> None:
        try:
            await asyncio.sleep(self.publish_timeout)
        finally:
            await _close_quietly(channel, "a publishing channel it replaced")

    async def _wait_ready(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        with contextlib.suppress(*RETRYABLE_ERRORS):  # asyncio.TimeoutError among them
            await asyncio.wait_for(self._channel.ready(), remaining)

    def _check_bindable(self, name: str, bindings: Iterable[tuple[str, str]]) -> None:
        for exchange, _ in bindings:
            if exchange not in self._exchanges:
                raise TopologyError(f"cannot bind {name!r} to unknown exchange {exchange!r}")

    async def consume(self, spec: QueueSpec, handler: Handler, prefetch: int = 16) -> Subscription:
        self._check_open()
        check_prefetch(prefetch)
        self._check_bindable(spec.name, spec.bindings)
        # One channel per subscription: QoS is per channel, and closing it is how a
        # consumer hands its unsettled messages back (single-active takeover).
        channel = await self._connection.channel(publisher_confirms=False)
        logical = spec.name or transient_name()
        # a transient queue cannot pre-exist, so even a passive bus declares it
        passive = self.passive and not spec.transient
        try:
            await channel.set_qos(prefetch_count=prefetch)
            arguments = queue_arguments(
                spec, self.prefix, None if spec.transient else self.replicas
            )
            with _declaring("queue", logical, arguments):
                queue = await channel.declare_queue(
                    self.name(logical),
                    durable=not spec.transient,
                    exclusive=spec.transient,
                    auto_delete=spec.transient,
                    arguments=arguments,
                    passive=passive,
                )
            if not spec.transient:
                # transient queues clean up after themselves; delete_all must not touch
                # another connection's exclusive queue (RESOURCE_LOCKED)
                self._declared.add(logical)
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

    async def _streams(self) -> AbstractRobustChannel:
        """The robust channel that declares this bus's streams, again after a reconnect."""
        if self._streams_channel is None or self._streams_channel.is_closed:
            self._streams_channel = await self._connection.channel(publisher_confirms=False)
        return self._streams_channel

    async def declare_stream(self, spec: port.StreamSpec) -> None:
        self._check_open()
        self._check_bindable(spec.name, spec.bindings)
        arguments = stream_arguments(spec, self.replicas)
        physical = self.name(spec.name)
        # A refused declaration closes its channel: try it on a channel of its own first,
        # so that the channel which re-declares the streams on reconnect never sees one.
        # Declared even by a passive bus: a job's streams exist only from its submission on,
        # so no definitions file creates them (a user without configure on them is refused).
        probe = await self._connection.channel(publisher_confirms=False)
        try:
            with self._access(spec.name), _declaring("stream", spec.name, arguments):
                await probe.declare_queue(physical, durable=True, arguments=arguments, robust=False)
        finally:
            await _close_quietly(probe, spec.name)
        channel = await self._streams()
        with self._access(spec.name):
            queue = await channel.declare_queue(physical, durable=True, arguments=arguments)
            self._declared.add(spec.name)
            for exchange, pattern in spec.bindings:
                await queue.bind(self.name(exchange), pattern)

    @contextlib.contextmanager
    def _access(self, logical: str) -> Iterator[None]:
        try:
            yield
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise AccessRefused(
                f"this broker user may not declare, bind, read or delete {logical!r}: {exc}"
            ) from exc

    async def _read_stream(self, read: port.StreamRead) -> port.StreamReader:
        """Attach a reader; an attach that fails because the connection is down or dropped
        meanwhile (a channel that could not open, a consume cut off: aio-pika and aiormq
        raise RuntimeError for a connection being replaced) is tried again once the
        connection is back, until ``publish_timeout``, then :class:`BusUnavailable`. Other
        refusals (a missing stream, a missing permission) are raised at once."""
        deadline = time.monotonic() + self.publish_timeout
        attempt = 0
        while True:
            drops = self._drops
            try:
                return await self._attach_reader(read)
            except Exception as exc:
                if self._closed:
                    raise BusClosed("the bus was closed while a stream reader attached") from exc
                lost = self._drops != drops or self._connection_down()
                if not (isinstance(exc, RETRYABLE_ERRORS) or lost):
                    raise
                attempt += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BusUnavailable(
                        f"could not start reading stream {read.name!r}: the connection "
                        f"failed {attempt} times in {self.publish_timeout:.0f}s: {exc!r}"
                    ) from exc
                log.info("reading stream %s failed (%r); retry %d", read.name, exc, attempt)
                await asyncio.sleep(min(_backoff(attempt), remaining))
                await self._wait_ready(deadline)

    def _dropped(self, *_: object) -> None:
        self._drops += 1

    def _connection_down(self) -> bool:
        """The connection is lost and not yet back (aio-pika is reconnecting)."""
        transport = self._connection.transport
        return (
            transport is None
            or transport.connection.is_closed
            or not self._connection.connected.is_set()
        )

    async def _attach_reader(self, read: port.StreamRead) -> port.StreamReader:
        name = read.name
        channel = await self._connection.channel(publisher_confirms=False)
        try:
            with self._access(name):
                await channel.set_qos(prefetch_count=read.prefetch)
                try:
                    queue = await channel.declare_queue(self.name(name), passive=True, robust=False)
                except aiormq.exceptions.ChannelNotFoundEntity as exc:
                    raise port.StreamNotFound(
                        f"stream {name!r} does not exist; declare it with declare_stream: {exc}"
                    ) from exc
        except BaseException:
            await _close_quietly(channel, name)
            raise
        reader = _RabbitStreamReader(self, read, channel, queue)
        try:
            with self._access(name):
                await reader.attach()
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            await reader.cancel(0)
            raise port.StreamNotFound(f"{name!r} is a queue, not a stream: {exc}") from exc
        except BaseException:
            await reader.cancel(0)
            raise
        self._subscriptions.add(reader)
        return reader

    async def delete_stream(self, name: str) -> None:
        self._check_open()
        mine = [
            s
            for s in self._subscriptions
            if isinstance(s, _RabbitStreamReader) and s.queue_name == name
        ]
        await asyncio.gather(*(s.cancel(1.0) for s in mine), return_exceptions=True)
        channel = await self._streams()
        with self._access(name):
            await channel.queue_delete(self.name(name))
        self._declared.discard(name)

    async def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(
            *(s.cancel(timeout) for s in list(self._subscriptions)), return_exceptions=True
        )
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        try:
            await self._connection.close()
        except Exception as exc:
            log.debug("closing the connection failed: %r", exc)

    async def delete_all(self, queues: Iterable[str] = ()) -> None:
        # AMQP cannot list queues by prefix, so the bus deletes what it knows of.
        self._check_deletable()
        self._check_open()
        await asyncio.gather(
            *(s.cancel(1.0) for s in list(self._subscriptions)), return_exceptions=True
        )
        channel = await self._connection.channel()
        try:
            for logical in sorted(self._declared | set(queues)):
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

    def one(address: str) -> str:
        parts = urlsplit(address)
        if parts.password:
            netloc = f"{parts.username}:***@{parts.hostname}" + (
                f":{parts.port}" if parts.port else ""
            )
            parts = parts._replace(netloc=netloc)
        return urlunsplit(parts)

    return ",".join(one(a) for a in broker_addresses(url))


__all__ = [
    "DECLARE_MODES",
    "MAX_REPLICAS",
    "RETRYABLE_ERRORS",
    "RabbitBus",
    "check_replicas",
    "queue_arguments",
    "stream_arguments",
]
