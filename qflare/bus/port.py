"""The transport port: the few names every service uses to talk over a message bus.

Two adapters sit behind it (docs/architecture.md): RabbitMQ via aio-pika (``qflare.bus.rabbitmq``) and
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

Streams (:class:`StreamSpec`) are the other shape: an append-only log, written once (by
``publish`` through an exchange it is bound to) and read by any number of readers, each from
an offset of its own choosing (:meth:`Bus.read_stream`); it keeps its messages until its
retention drops them, whatever the readers do. Nothing is requeued in a log, so a stream
reader settles differently (:func:`hold_until_settled`):

* the handler is called strictly in offset order, one delivery at a time per reader;
* ``ACK`` and ``REJECT`` both move on to the next offset (the log keeps the message; a
  reader that wants to park bad input records it itself);
* ``RETRY`` calls the handler again with the same message (``delivery_count`` + 1,
  ``redelivered``) after the spec's ``retry_delay``, for as long as it takes: the reader
  holds its position, so a storage fault holds the reader and never drops a message;
* a handler that raises (or returns a non-Outcome) is logged and treated like ``RETRY``.

Offsets are ints that grow with every message of a stream. The in-memory log numbers its
messages 0, 1, 2, ...; RabbitMQ may skip numbers (a new segment takes one), so a reader
stores "the offset it handled + 1", never a count. A reader that the bus re-attaches after a
reconnect resumes after the last offset it handed to its handler: nothing skipped, nothing
handed twice.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import datetime as _dt
import decimal
import enum
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias
from urllib.parse import quote, urlsplit, urlunsplit

from qflare.errors import QflareError

log = logging.getLogger("qflare.bus")

#: RabbitMQ's default ``max_message_size``. Larger bodies go in parts (qflare.messages.parts).
DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024

#: ``read_stream(offset=...)``: a named position, an offset (int >= 0) or an aware datetime.
StreamOffset: TypeAlias = Literal["first", "last", "next"] | int | _dt.datetime
STREAM_POSITIONS = ("first", "last", "next")

#: Stream retention: defaults and the accepted ranges (inclusive).
DEFAULT_STREAM_MAX_AGE_S = 7 * 24 * 3600
DEFAULT_STREAM_MAX_BYTES = 8 * 2**30
STREAM_MAX_AGE_RANGE = (1, 366 * 24 * 3600)
STREAM_MAX_BYTES_RANGE = (4096, 2**40)
#: Seconds between two calls of a stream handler that answered RETRY (or raised).
DEFAULT_STREAM_RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 3600.0


class BusError(QflareError):
    """Root of every transport failure; ``reason`` is a stable code for logs and alerts."""

    reason: str = "BUS_ERROR"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.detail = detail


class MessageTooLarge(BusError):
    """The body exceeds the bus's ``max_message_size``; send it in parts instead."""

    reason = "TOO_LARGE"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"body of {size} bytes exceeds max_message_size={limit}; send it in parts")
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


class StreamNotFound(TopologyError):
    """A read of a stream that does not exist (never declared, or deleted). Declare it
    first (``declare_stream``, or pass the :class:`StreamSpec` to ``read_stream``), or
    check the name (it may name a queue that is not a stream)."""

    reason = "NO_STREAM"


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
    ``"rejected"`` or ``"delivery_limit"``. ``offset`` is the message's place in its
    stream (store ``offset + 1`` to resume after it); None for queue deliveries.
    """

    body: bytes
    routing_key: str
    exchange: str
    headers: Mapping[str, Any]
    redelivered: bool
    delivery_count: int
    death_reason: str | None = None
    death_queue: str | None = None
    offset: int | None = None


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
        object.__setattr__(self, "bindings", check_bindings(self.bindings))


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """An append-only log and what feeds it (RabbitMQ: a stream queue).

    ``bindings`` work as for :class:`QueueSpec`: ``publish`` to a bound exchange with a
    matching key appends the message. Retention is required and bounded: the log drops its
    oldest messages once they are older than ``max_age_s`` seconds or once it holds more
    than ``max_bytes``; the newest message is always kept. Retention is applied when a
    message is written, and RabbitMQ drops whole segments (a quarter of ``max_bytes`` each,
    at most 500 MB): a reader may rely on neither more data being kept nor old data being
    gone earlier. ``retry_delay`` (> 0, seconds) spaces the calls of a handler that answers
    RETRY; a reader that names the stream by its name alone gets
    ``DEFAULT_STREAM_RETRY_DELAY``. Re-declaring a stream with other retention is a
    :class:`TopologyError`.
    """

    name: str
    bindings: tuple[tuple[str, str], ...] = ()
    max_age_s: int = DEFAULT_STREAM_MAX_AGE_S
    max_bytes: int = DEFAULT_STREAM_MAX_BYTES
    retry_delay: float = DEFAULT_STREAM_RETRY_DELAY

    def __post_init__(self) -> None:
        check_stream_name(self.name)
        check_int_range("max_age_s", self.max_age_s, STREAM_MAX_AGE_RANGE, "seconds")
        check_int_range("max_bytes", self.max_bytes, STREAM_MAX_BYTES_RANGE, "bytes")
        delay = self.retry_delay
        if isinstance(delay, bool) or not isinstance(delay, (int, float)):
            raise TypeError(f"retry_delay must be a number of seconds, got {delay!r}")
        if not 0 < delay <= MAX_RETRY_DELAY:
            raise ValueError(
                f"retry_delay must be in (0, {MAX_RETRY_DELAY:.0f}] seconds (a stream retries "
                f"until the handler settles, so 0 would spin), got {delay!r}"
            )
        object.__setattr__(self, "bindings", check_bindings(self.bindings))


class Subscription(abc.ABC):
    """A running consumer. ``cancel`` stops new deliveries, lets in-flight handlers finish
    for up to ``timeout`` seconds, then abandons the rest; abandoned (unacked) messages are
    delivered again to another consumer (a transient queue is deleted instead).
    ``queue_name`` is the logical name of the queue (generated for a nameless transient
    spec)."""

    queue_name: str

    @abc.abstractmethod
    async def cancel(self, timeout: float = 10.0) -> None: ...


@dataclass(frozen=True, slots=True)
class StreamRead:
    """What ``read_stream`` was asked for, checked: the stream's logical name, the handler,
    the start offset, the read-ahead bound and the pause between RETRY calls."""

    name: str
    handler: Handler
    start: StreamOffset
    prefetch: int
    retry_delay: float


class StreamReader(Subscription):
    """A running stream reader; ``queue_name`` is the logical stream name.

    The adapters share the hand-over rules here (:meth:`_hand_over`); they only differ in
    where messages come from. ``next_offset`` is the lowest offset the reader will still
    hand to its handler: the start offset when attached at an int, else None until the
    first hand-over; afterwards the last handed offset + 1.
    """

    def __init__(self, read: StreamRead) -> None:
        self.read = read
        self.queue_name = read.name
        self.handler = read.handler
        self.next_offset = read.start if isinstance(read.start, int) else None
        self._cancelled = False

    async def _hand_over(self, delivery: Delivery) -> Outcome | None:
        """Hand ``delivery`` to the handler unless it lies before ``next_offset`` (a
        RabbitMQ consumer may get the start of the chunk holding its offset, or messages it
        handled before a reconnect). None: skipped, or the reader was cancelled while the
        handler kept answering RETRY."""
        offset = delivery.offset
        if offset is None:
            raise TypeError("a stream delivery needs an offset")
        if self.next_offset is not None and offset < self.next_offset:
            return None
        self.next_offset = offset + 1
        return await hold_until_settled(
            self.handler, delivery, self.read.retry_delay, lambda: self._cancelled
        )


class Bus(abc.ABC):
    """The port. ``prefix`` is prepended to every exchange and queue name (test isolation,
    several federations on one broker)."""

    def __init__(self, prefix: str, max_message_size: int) -> None:
        self.prefix = prefix
        self.max_message_size = max_message_size
        self._closed = False
        self._subscriptions: set[Subscription] = set()
        self._declared: set[str] = set()  # logical names of durable queues and streams
        self.refused: str | None = None  # why the broker refused a login (set once)
        self._on_refused: list[Callable[[str], None]] = []

    def on_refused(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(detail)`` when the broker refuses this bus's login on a reconnect
        (the user was deleted or lost the virtual host: a revoked participant). The bus goes
        on retrying; what to do is the caller's decision."""
        self._on_refused.append(callback)
        if self.refused is not None:
            callback(self.refused)

    def _refused(self, detail: str) -> None:
        first = self.refused is None
        self.refused = detail
        if first:
            for callback in self._on_refused:
                callback(detail)

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: Mapping[str, Any] | None = None,
    ) -> bool:
        """Publish durably and wait for the broker to take it.

        Returns True when at least one queue or stream took the message and False when no
        binding matched: for topic fan-out an unroutable message is a normal event (nobody
        listens yet), not an error. Raises :class:`MessageTooLarge` before sending,
        :class:`BusUnavailable` after bounded retries, :class:`PublishFailed` when the
        broker goes on refusing it (negative confirms, retried for a bounded time: a queue
        that took it meanwhile may get it twice), :class:`TopologyError` for an undeclared
        exchange.
        """
        table = self._check_publish(routing_key, body, headers)
        return await self._publish(
            exchange, routing_key, body if isinstance(body, bytes) else bytes(body), table
        )

    @abc.abstractmethod
    async def _publish(
        self, exchange: str, routing_key: str, body: bytes, table: dict[str, Any]
    ) -> bool:
        """``publish`` after the checks every adapter shares."""

    @abc.abstractmethod
    async def consume(self, spec: QueueSpec, handler: Handler, prefetch: int = 16) -> Subscription:
        """Declare ``spec`` (idempotently) and start delivering to ``handler`` with at
        most ``prefetch`` unsettled messages at a time."""

    @abc.abstractmethod
    async def declare_stream(self, spec: StreamSpec) -> None:
        """Create the stream and its bindings, or check that it exists with the same
        retention (idempotent; other retention: :class:`TopologyError`, as is a queue of
        that name). Bindings add up over declarations, as for queues. On RabbitMQ the
        stream and its bindings are declared again after a reconnect, also with
        ``declare="passive"`` (no definitions file holds a job's streams: the user that
        declares them needs configure on them)."""

    async def read_stream(
        self,
        stream: StreamSpec | str,
        handler: Handler,
        *,
        offset: StreamOffset = "next",
        prefetch: int = 16,
    ) -> StreamReader:
        """Start handing the stream's messages to ``handler``, in offset order, one at a
        time, with the stream semantics of this module's docstring.

        ``offset``: ``"first"`` (the oldest retained message), ``"last"`` (the newest
        message, then new ones; new ones only if the stream is empty), ``"next"`` (only
        messages written from now on), an int (that offset, or the oldest retained one if
        it is gone; never anything before it), or an aware datetime (the first message
        written at or after it; AMQP carries whole seconds, so both adapters round it down
        to the second). ``prefetch`` (1..65535) bounds the messages read ahead of the
        handler. A :class:`StreamSpec` is declared first (idempotently); a bare name must
        exist, else :class:`StreamNotFound`. Readers of a stream that is deleted stop.
        On RabbitMQ ``"last"`` takes a fraction of a second: the broker starts a reader at
        the last chunk, and the reader hands over only its newest message.
        """
        self._check_open()
        start = check_stream_offset(offset)
        check_prefetch(prefetch)
        if isinstance(stream, StreamSpec):
            await self.declare_stream(stream)
            name, retry_delay = stream.name, stream.retry_delay
        elif isinstance(stream, str):
            check_stream_name(stream)
            name, retry_delay = stream, DEFAULT_STREAM_RETRY_DELAY
        else:
            raise TypeError(f"stream must be a StreamSpec or a name, got {type(stream).__name__}")
        return await self._read_stream(StreamRead(name, handler, start, prefetch, retry_delay))

    @abc.abstractmethod
    async def _read_stream(self, read: StreamRead) -> StreamReader:
        """``read_stream`` after the checks every adapter shares."""

    @abc.abstractmethod
    async def delete_stream(self, name: str) -> None:
        """Delete the stream with its messages (a missing one is not an error); this bus's
        readers of it are cancelled, other buses' readers stop."""

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
    def declared_queues(self) -> frozenset[str]:
        """Logical names of the durable queues and the streams this bus declared (and did
        not delete)."""
        return frozenset(self._declared)

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
        offset: int | None = None,
    ) -> Delivery:
        """A :class:`Delivery` with logical names and the dead-lettering facts read from
        the broker's ``x-first-death-*`` headers."""
        reason, death_queue = death_info(headers)
        return Delivery(
            body=body,
            offset=offset,
            routing_key=routing_key,
            exchange=self.logical(physical_exchange) or "",
            headers=headers,
            redelivered=redelivered,
            delivery_count=delivery_count,
            death_reason=reason,
            death_queue=self.logical(death_queue),
        )


#: Where one broker address ends and the next begins in a list of them.
_ADDRESS_SEPARATOR = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def broker_addresses(url: str) -> tuple[str, ...]:
    """The broker addresses in ``url``: one URL, or the URLs of a RabbitMQ cluster's nodes
    separated by commas (``amqp://u:p@node1:5672/,amqp://u:p@node2:5672/``). A comma splits
    only where a URL (``scheme://``) follows, so one inside a URL's query stays.
    Raises :class:`ValueError` for an empty list, an empty item, or a list whose items are
    not all ``amqp``/``amqps`` URLs (only RabbitMQ has several nodes)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("a broker URL is required")
    parts = tuple(_ADDRESS_SEPARATOR.split(url.strip()))
    if len(parts) == 1:
        return parts
    for part in parts:
        if not part or not re.match(r"^amqps?://[^/,]", part):
            raise ValueError(
                f"{part!r} in a list of broker addresses: each must be an amqp:// or amqps:// URL"
            )
    return parts


#: The file beside a kit's or a service's keys that holds its broker password (``qflare
#: broker-definitions --kit`` writes it, mode 0600).
PASSWORD_FILE = "broker_password"


def with_login(url: str, user: str, password: str | None) -> str:
    """``url`` with ``user`` and ``password`` filled in when it names no user
    (``amqp://host:5672/qflare`` -> ``amqp://<user>:<password>@host:5672/qflare``), in each
    URL of a cluster's comma-separated list; unchanged when it names one, when ``password``
    is None, or for a scheme other than ``amqp``/``amqps``. The one place a kit's or a
    service's own broker login (``qflare broker-definitions --kit``) joins a URL."""
    addresses = broker_addresses(url) if url.strip() else (url,)
    if len(addresses) > 1:
        return ",".join(with_login(a, user, password) for a in addresses)
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps") or parts.username or password is None:
        return url
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.netloc}"
    return urlunsplit(parts._replace(netloc=netloc))


def transient_name() -> str:
    """A unique logical name for a nameless transient queue. Not server-named
    (``amq.gen-*``): the client cannot declare such a name again after a reconnect."""
    return f"transient.{uuid.uuid4().hex}"


def check_bindings(bindings: Iterable[Iterable[str]]) -> tuple[tuple[str, str], ...]:
    """``bindings`` as a tuple of (exchange, topic pattern) pairs, each checked."""
    checked = tuple(tuple(b) for b in bindings)
    for binding in checked:
        if len(binding) != 2 or not all(isinstance(p, str) for p in binding):
            raise TypeError(f"each binding must be (exchange, pattern) strings, got {binding!r}")
        check_routing_key(binding[1], pattern=True)
    return checked  # type: ignore[return-value]  # pairs, checked just above


def check_stream_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"stream name must be str, got {type(name).__name__}")
    if not 1 <= len(name) <= 200:
        raise ValueError(f"stream name must be 1..200 characters, got {name!r}")


def check_int_range(what: str, value: int, bounds: tuple[int, int], unit: str) -> None:
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int ({unit}), got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be in {low}..{high} {unit}, got {value!r}")


def check_prefetch(prefetch: int) -> None:
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 1 <= prefetch <= 65535:
        raise ValueError(f"prefetch must be an int in 1..65535, got {prefetch!r}")


def check_stream_offset(offset: StreamOffset) -> StreamOffset:
    """``offset`` as both adapters take it; a datetime comes back in UTC, whole seconds."""
    if isinstance(offset, str):
        if offset not in STREAM_POSITIONS:
            raise ValueError(
                f"offset must be one of {STREAM_POSITIONS}, an int >= 0 or an aware datetime, "
                f"got {offset!r}"
            )
        return offset
    if isinstance(offset, bool):
        raise TypeError(f"offset must be a position name, an int or a datetime, got {offset!r}")
    if isinstance(offset, int):
        if not 0 <= offset < 2**63:
            raise ValueError(f"an int offset must be in 0..2**63-1, got {offset!r}")
        return offset
    if isinstance(offset, _dt.datetime):
        if offset.utcoffset() is None:
            raise ValueError(
                f"a timestamp offset must be timezone-aware (e.g. tzinfo=datetime.UTC), "
                f"got the naive {offset!r}"
            )
        return offset.astimezone(_dt.UTC).replace(microsecond=0)
    raise TypeError(
        f"offset must be a position name, an int or a datetime, got {type(offset).__name__}"
    )


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


async def hold_until_settled(
    handler: Handler, delivery: Delivery, retry_delay: float, stopped: Callable[[], bool]
) -> Outcome | None:
    """A stream reader's settlement: call ``handler`` until it answers ACK or REJECT,
    ``retry_delay`` seconds apart, each call with ``delivery_count`` one higher. There is no
    limit: the reader holds its position rather than drop the message. None when
    ``stopped()`` turns true between two calls (the reader was cancelled)."""
    while True:
        outcome = await _outcome_of(handler, delivery)
        if outcome is not Outcome.RETRY:
            return outcome
        await asyncio.sleep(retry_delay)
        if stopped():
            return None
        delivery = dataclasses.replace(
            delivery, redelivered=True, delivery_count=delivery.delivery_count + 1
        )


async def _outcome_of(handler: Handler, delivery: Delivery) -> Outcome:
    try:
        outcome = await handler(delivery)
    except Exception:
        log.exception(
            "handler failed on %s/%s (delivery %d, offset %s); treated as RETRY",
            delivery.exchange,
            delivery.routing_key,
            delivery.delivery_count,
            delivery.offset,
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
