"""The transport port: the few names every service uses to talk over a message bus.

Two adapters sit behind it (DESIGN §5): RabbitMQ via aio-pika (``qflare.bus.rabbitmq``) and
an embedded in-memory broker (``qflare.bus.memory``) with the same semantics, so the same
service code runs in ``qflare serve`` and in ``qflare simulate``/tests.

Delivery is at-least-once. A handler ends every delivery in one of three outcomes, decided
in one place (:func:`settle_outcome`), never by scattered ``try/except``:

* ``ACK``    – the effect is durable; forget the message.
* ``REJECT`` – bad input; never retry it. It goes to the dead-letter exchange with reason
  ``rejected``.
* ``RETRY``  – transient fault; deliver it again. After ``QueueSpec.delivery_limit``
  deliveries it goes to the dead-letter exchange with reason ``delivery_limit``.

A handler that raises is treated as ``RETRY`` (bounded by the same limit) and logged; it
never stops the consumer.
"""

from __future__ import annotations

import abc
import asyncio
import datetime as _dt
import decimal
import enum
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qflare.errors import QflareError

log = logging.getLogger("qflare.bus")

#: RabbitMQ's default ``max_message_size`` (FACTS.md). Larger bodies must go as chunks.
DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024


class BusError(QflareError):
    """Root of every transport failure; ``reason`` is a stable code for logs and alerts."""

    reason: str = "BUS_ERROR"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.detail = detail


class MessageTooLarge(BusError):
    """The body exceeds the bus's ``max_message_size``; send it as chunks instead."""

    reason = "TOO_LARGE"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"body of {size} bytes exceeds max_message_size={limit}; split it into chunks"
        )
        self.size = size
        self.limit = limit


class InvalidHeaders(BusError):
    """A header key or value that AMQP tables cannot carry."""

    reason = "BAD_HEADERS"


class BusUnavailable(BusError):
    """The broker could not be reached (first connect, or a publish after its retries)."""

    reason = "UNAVAILABLE"


class PublishFailed(BusError):
    """The broker refused the message (negative confirm) or the channel failed for it."""

    reason = "PUBLISH_FAILED"


class TopologyError(BusError):
    """A declaration conflicts with what exists (other queue arguments) or names a
    missing exchange. Topology is a contract: fix the declaration, do not retry."""

    reason = "TOPOLOGY"


class AccessRefused(BusError):
    """The broker user lacks the permission (configure, write, read, or a topic
    permission) for what was asked. A restricted participant user gets this for a publish
    outside ``qflare.client``/``update.*``. Fix the permissions, do not retry."""

    reason = "ACCESS_REFUSED"


class BusClosed(BusError):
    """The bus was closed by its owner."""

    reason = "CLOSED"


class Outcome(enum.Enum):
    ACK = "ack"
    REJECT = "reject"
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivered message as a handler sees it.

    ``exchange`` and ``death_queue`` are logical names (without the bus prefix).
    ``delivery_count`` is 1 on the first delivery and grows with every redelivery.
    ``death_reason`` is set on messages read from the dead-letter exchange:
    ``"rejected"`` or ``"delivery_limit"``.
    """

    body: bytes
    routing_key: str
    exchange: str
    headers: Mapping[str, Any]
    redelivered: bool
    delivery_count: int
    death_reason: str | None = None
    death_queue: str | None = None


Handler = Callable[[Delivery], Awaitable[Outcome]]


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue and what feeds it.

    ``bindings`` pairs a logical exchange name with a topic pattern (``*`` one word,
    ``#`` zero or more). ``single_active`` lets only one consumer receive at a time (the
    stateful services); the next takes over when it goes away. ``delivery_limit`` counts
    deliveries, the first included. ``dead_letter`` routes rejected/exhausted messages to
    ``qflare.dead``; it is off only for the queue that drains ``qflare.dead`` itself.

    ``transient`` queues belong to the bus (connection) that declared them and vanish
    with its subscription: the broker deletes them when the last consumer is cancelled or
    the connection dies, so a killed console or ingest replica leaves nothing behind.
    Messages published while nobody consumes are lost, also across a reconnect (the
    queue is declared afresh). An empty ``name`` lets the bus pick a unique one
    (``Subscription.queue_name``). Another bus declaring the same transient queue gets
    :class:`TopologyError`. Classic RabbitMQ queues have no delivery limit, so for a
    transient queue the subscription counts retries itself; a message that exhausts
    ``delivery_limit`` is dead-lettered as ``rejected`` (not ``delivery_limit``).
    """

    name: str
    bindings: tuple[tuple[str, str], ...] = ()
    single_active: bool = False
    delivery_limit: int = 5
    dead_letter: bool = True
    retry_delay: float = field(default=0.0)
    transient: bool = False

    def __post_init__(self) -> None:
        if (not self.name and not self.transient) or len(self.name) > 200:
            raise ValueError(f"queue name must be 1..200 characters, got {self.name!r}")
        if self.transient and self.single_active:
            raise ValueError("a transient queue has one owner; single_active makes no sense")
        if not isinstance(self.delivery_limit, int) or self.delivery_limit < 1:
            raise ValueError(
                f"delivery_limit must be an int >= 1 (deliveries, first included), "
                f"got {self.delivery_limit!r}"
            )
        if self.retry_delay < 0:
            raise ValueError(f"retry_delay must be >= 0 seconds, got {self.retry_delay!r}")
        bindings = tuple(tuple(b) for b in self.bindings)
        for binding in bindings:
            if len(binding) != 2 or not all(isinstance(p, str) for p in binding):
                raise TypeError(
                    f"each binding must be (exchange, pattern) strings, got {binding!r}"
                )
            check_routing_key(binding[1], pattern=True)
        object.__setattr__(self, "bindings", bindings)


class Subscription(abc.ABC):
    """A running consumer. ``cancel`` stops new deliveries, lets in-flight handlers finish
    for up to ``timeout`` seconds, then abandons the rest; abandoned (unacked) messages are
    delivered again to another consumer (a transient queue is deleted instead).
    ``queue_name`` is the logical name of the queue (generated for a nameless transient
    spec)."""

    queue_name: str

    @abc.abstractmethod
    async def cancel(self, timeout: float = 10.0) -> None: ...


class Bus(abc.ABC):
    """The port. ``prefix`` is prepended to every exchange and queue name (test isolation,
    several federations on one broker)."""

    prefix: str
    max_message_size: int
    _closed: bool

    @abc.abstractmethod
    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: Mapping[str, Any] | None = None,
    ) -> bool:
        """Publish durably and wait for the broker to take it.

        Returns True when at least one queue took the message and False when no binding
        matched: for topic fan-out an unroutable message is a normal event (nobody
        listens yet), not an error. Raises :class:`MessageTooLarge` before sending,
        :class:`BusUnavailable` after bounded retries, :class:`PublishFailed` on a
        negative confirm, :class:`TopologyError` for an undeclared exchange.
        """

    @abc.abstractmethod
    async def consume(self, spec: QueueSpec, handler: Handler, prefetch: int = 16) -> Subscription:
        """Declare ``spec`` (idempotently) and start delivering to ``handler`` with at
        most ``prefetch`` unsettled messages at a time."""

    @abc.abstractmethod
    async def close(self, timeout: float = 5.0) -> None:
        """Cancel every subscription, letting in-flight handlers finish for up to
        ``timeout`` seconds (unsettled messages are redelivered), and disconnect."""

    @abc.abstractmethod
    async def delete_all(self, queues: Iterable[str] = ()) -> None:
        """Cancel this bus's subscriptions and delete its prefixed exchanges, the queues it
        declared and the logical ``queues`` named (declared by other buses with the same
        prefix). Refuses an empty prefix. For tests and teardown."""

    @property
    @abc.abstractmethod
    def declared_queues(self) -> frozenset[str]:
        """Logical names of the queues this bus declared."""

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def name(self, logical: str) -> str:
        return self.prefix + logical

    def logical(self, physical: str | None) -> str | None:
        if physical is not None and self.prefix and physical.startswith(self.prefix):
            return physical[len(self.prefix) :]
        return physical

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed("this bus was closed")

    def _check_publish(
        self, routing_key: str, body: bytes, headers: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """Refuse, before anything is sent, what either adapter would refuse, so both
        accept exactly the same messages; returns the checked header table."""
        self._check_open()
        check_body(body, self.max_message_size)
        check_routing_key(routing_key)
        return check_headers(headers)

    def _check_deletable(self) -> None:
        if not self.prefix:
            raise ValueError("delete_all needs a non-empty prefix; it would delete everything")

    def _delivery(
        self,
        body: bytes,
        routing_key: str,
        physical_exchange: str | None,
        headers: Mapping[str, Any],
        *,
        redelivered: bool,
        delivery_count: int,
    ) -> Delivery:
        """A :class:`Delivery` with logical names and the dead-lettering facts read from
        the broker's ``x-first-death-*`` headers."""
        reason, death_queue = death_info(headers)
        return Delivery(
            body=body,
            routing_key=routing_key,
            exchange=self.logical(physical_exchange) or "",
            headers=headers,
            redelivered=redelivered,
            delivery_count=delivery_count,
            death_reason=reason,
            death_queue=self.logical(death_queue),
        )


def transient_name() -> str:
    """A unique logical name for a nameless transient queue. Not server-named
    (``amq.gen-*``): the client cannot declare such a name again after a reconnect."""
    return f"transient.{uuid.uuid4().hex}"


def check_body(body: bytes, limit: int) -> None:
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise TypeError(f"body must be bytes, got {type(body).__name__}")
    size = body.nbytes if isinstance(body, memoryview) else len(body)
    if size > limit:
        raise MessageTooLarge(size, limit)


def check_routing_key(key: str, *, pattern: bool = False) -> None:
    what = "binding pattern" if pattern else "routing key"
    if not isinstance(key, str):
        raise TypeError(f"{what} must be str, got {type(key).__name__}")
    if len(key.encode()) > 255:
        raise ValueError(f"{what} longer than 255 bytes (AMQP shortstr): {key[:40]!r}...")


# Only what crosses an AMQP table unchanged: pamqp sends floats as 32-bit and timestamps
# in whole seconds, so those would come back different from what was sent.
_HEADER_SCALARS = (str, bytes, bool, int, type(None))


def check_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a private copy of ``headers`` after checking that an AMQP table carries it
    unchanged, so both adapters accept exactly the same headers: str keys; str, bytes,
    bool, 64-bit int, None, and lists/dicts of those."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidHeaders(f"headers must be a mapping, got {type(headers).__name__}")
    return _check_table(headers, depth=0)


def _check_table(table: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    if depth > 8:
        raise InvalidHeaders("headers nested deeper than 8 levels")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if not isinstance(key, str) or not key or len(key.encode()) > 128:
            raise InvalidHeaders(f"header keys must be non-empty str <= 128 bytes, got {key!r}")
        out[key] = _check_value(key, value, depth)
    return out


def _check_value(key: str, value: Any, depth: int) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise InvalidHeaders(f"header {key!r}: int {value} does not fit 64 bits")
    if isinstance(value, (float, decimal.Decimal, _dt.datetime)):
        raise InvalidHeaders(
            f"header {key!r}: {type(value).__name__} does not survive AMQP tables exactly; "
            "send it as str or int"
        )
    if isinstance(value, _HEADER_SCALARS):
        return value
    if isinstance(value, Mapping):
        return _check_table(value, depth + 1)
    if isinstance(value, (list, tuple)):
        return [_check_value(key, v, depth + 1) for v in value]
    raise InvalidHeaders(f"header {key!r}: type {type(value).__name__} cannot travel in AMQP")


async def settle_outcome(handler: Handler, delivery: Delivery, retry_delay: float = 0.0) -> Outcome:
    """Run ``handler`` and turn anything it does into exactly one outcome; a RETRY is
    returned only after ``retry_delay`` seconds (``QueueSpec.retry_delay``)."""
    outcome = await _outcome_of(handler, delivery)
    if outcome is Outcome.RETRY and retry_delay:
        await asyncio.sleep(retry_delay)
    return outcome


async def _outcome_of(handler: Handler, delivery: Delivery) -> Outcome:
    try:
        outcome = await handler(delivery)
    except Exception:
        log.exception(
            "handler failed on %s/%s (delivery %d); retrying within the delivery limit",
            delivery.exchange,
            delivery.routing_key,
            delivery.delivery_count,
        )
        return Outcome.RETRY
    if not isinstance(outcome, Outcome):
        log.error(
            "handler returned %r instead of an Outcome for %s/%s; retrying",
            outcome,
            delivery.exchange,
            delivery.routing_key,
        )
        return Outcome.RETRY
    return outcome


async def finish_tasks(tasks: Iterable[asyncio.Task[Any]], timeout: float) -> None:
    """Let ``tasks`` (in-flight handlers) finish for up to ``timeout`` seconds, then cancel
    the rest and wait until they have unwound."""
    pending = set(tasks)
    if pending and timeout > 0:
        _, pending = await asyncio.wait(pending, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


def death_info(headers: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(reason, physical queue) of the first dead-lettering, from RabbitMQ's headers."""
    reason = headers.get("x-first-death-reason")
    queue = headers.get("x-first-death-queue")
    if isinstance(reason, bytes):
        reason = reason.decode(errors="replace")
    if isinstance(queue, bytes):
        queue = queue.decode(errors="replace")
    return reason, queue
