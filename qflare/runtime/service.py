"""The Service base and the ONE handler wrapper every QFLARE service goes through.

A service is a domain core plus a thin shell (after cosmicpython's
``service_layer/handlers.py``). A consumer declares a map from message kind (body type) to
its handler; the runtime opens and verifies each envelope, rejects a kind the map does not
name, and hands the handler the typed envelope (``Envelope[UpdateAccepted]``, ...): no
service parses routing keys. A handler calls the core, persists, publishes, and ends. How a
delivery is settled is decided here only (after aio-pika ``patterns/master.py`` and
FastStream ``exceptions.py``):

* the handler returns ``None`` or ``Outcome.ACK``         -> ACK (its effect is durable)
* it raises :class:`~qflare.messages.MessageRejected`      -> an ``alert.raised`` is published
  (reason code, detail, routing key), then REJECT (no requeue: to the dead-letter exchange)
* it raises one of :data:`STORAGE_ERRORS` (its own disk or database fails: full, read-only,
  I/O error, locked)                                       -> HOLD: the message is kept (not
  settled), one critical ``storage.fault`` alert goes out for the episode, and the handler is
  called again with a growing back-off until the store works; nothing accepted reaches the
  dead-letter queue because of a local fault, and a held delivery occupies its prefetch slot,
  so a service whose store is down stops taking new messages
* it raises one of :data:`TRANSIENT_ERRORS`                -> RETRY (bounded by the queue's
  delivery limit, then dead-lettered)
* it returns ``Outcome.RETRY`` itself                      -> RETRY (e.g. "wait for the rest")
* anything else propagates to the bus's ``settle_outcome``, which logs it with the traceback
  and retries within the delivery limit: a handler bug never stops a consumer.

Each attempt is observed here too (:mod:`qflare.runtime.metrics`): its time as
``qflare_handler_seconds{service, kind, outcome}`` (``ack``, ``reject``, ``retry``, ``held``,
``error``), a rejection by its reason code, a storage fault, the deliveries in flight, and
the age of each envelope the dispatcher opens (the queue's lag).
"""

from __future__ import annotations

import abc
import asyncio
import errno
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from qflare.bus import (
    Bus,
    BusClosed,
    BusUnavailable,
    Delivery,
    Outcome,
    PublishFailed,
    QueueSpec,
    Subscription,
    topology,
)
from qflare.crypto.keystore import Identity
from qflare.crypto.pki import TrustStore
from qflare.messages import Body, Envelope
from qflare.messages.envelope import by_kind
from qflare.messages.errors import MessageRejected
from qflare.runtime import metrics
from qflare.runtime.config import Settings
from qflare.runtime.envelopes import emit, open_delivery
from qflare.runtime.logging import event

#: Faults that may clear by themselves: the broker is away, the disk or DB is busy.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    BusUnavailable,
    PublishFailed,
    BusClosed,
    sqlite3.OperationalError,
    ConnectionError,
    TimeoutError,
    OSError,
)

#: A service's own store failing (docs/architecture.md, "Exactly-once effects"): the
#: message is held, never dropped, while the store is retried.
#: (SQLite's "disk I/O error", "database or disk is full", "attempt to write a readonly
#: database", "database is locked"; an OSError counts when its errno says the disk refused.)
STORAGE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)
#: Back-off between attempts while a store fails: doubling from the first to the cap.
STORAGE_RETRY_S = (0.2, 5.0)

ServiceHandler = Callable[[Delivery], Awaitable[Outcome | None]]
#: A handler of one message kind: receives the opened, verified envelope of that kind.
EnvelopeHandler = Callable[[Envelope[Any]], Awaitable[Outcome | None]]
#: A consumer's message map: body type (its ``KIND``) -> the handler of that kind.
Routes = Mapping[type[Body], EnvelopeHandler]

#: The ``kind`` label of the delivery being settled (``qflare_handler_seconds``): the queue's
#: or stream's name until the dispatcher has opened the envelope, then the envelope's kind.
#: A context variable: the dispatcher runs in the task (the context) of ``Service._settle``.
_KIND: ContextVar[str] = ContextVar("qflare_handler_kind", default="-")


@dataclass
class ServiceContext:
    """What bootstrap hands a service: settings, the bus, its identity and trust store,
    its own data folder, and a clock (tests pass a fake one through the same bootstrap)."""

    name: str
    settings: Settings
    bus: Bus
    identity: Identity | None = None  # None only in pure-bus tests
    trust: TrustStore | None = None
    data_dir: Path = field(default_factory=lambda: Path("."))
    clock: Callable[[], float] = time.time


@dataclass(frozen=True)
class Consumer:
    """One queue a service consumes, and what handles its deliveries: either ``routes``, a
    map from body type to the handler of that kind (the runtime opens and verifies each
    envelope against the kinds the map names, rejects any other kind as ``WRONG_KIND``
    before verifying a signature, and calls the kind's handler with the typed envelope), or
    ``handler`` for raw deliveries (client traffic that ingest must bound before opening it,
    dead letters)."""

    spec: QueueSpec
    handler: ServiceHandler | None = None
    routes: Routes = field(default_factory=dict)
    prefetch: int = 16

    def __post_init__(self) -> None:
        if (self.handler is None) == (not self.routes):
            raise TypeError(f"consumer of {self.spec.name!r}: give routes or a handler, not both")


def event_bindings(kinds: Iterable[type[Body]]) -> tuple[tuple[str, str], ...]:
    """Bindings to ``<kind>.<job>`` on ``qflare.events`` for each body type of ``kinds``."""
    return tuple((topology.EVENTS, f"{kind.KIND}.*") for kind in kinds)


def stateful_queue(name: str, kinds: Iterable[type[Body]]) -> QueueSpec:
    """The work queue of a stateful service (aggregator, detector, accountant): bound to
    ``<kind>.*`` on ``qflare.events`` for each body type of ``kinds``, one active consumer at
    a time, a failed delivery retried 0.2 s later, dead-lettered after 20 deliveries."""
    return QueueSpec(
        name,
        bindings=event_bindings(kinds),
        single_active=True,
        delivery_limit=20,
        retry_delay=0.2,
    )


def stateful_consumer(name: str, routes: Routes, *, prefetch: int = 16) -> Consumer:
    """A stateful service's one consumer: its :func:`stateful_queue` ``name`` (the
    service's name), bound to exactly the kinds ``routes`` handles."""
    return Consumer(stateful_queue(name, routes), routes=routes, prefetch=prefetch)


class Service(abc.ABC):
    """Base of every service. Subclasses set ``name``, return their :class:`Consumer` list
    from :meth:`consumers`, and may override :meth:`open` (stores), :meth:`started`
    (timers, start-up publishes) and :meth:`close`."""

    name: ClassVar[str]

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.settings = ctx.settings
        self.log = logging.getLogger(f"qflare.services.{self.name}")
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running = False
        self._storage_down = False

    # -- life cycle ---------------------------------------------------------------------
    @abc.abstractmethod
    def consumers(self) -> list[Consumer]: ...

    async def open(self) -> None:  # noqa: B027  (an optional hook)
        """Open stores and rebuild in-flight state, before any delivery arrives."""

    async def started(self) -> None:  # noqa: B027
        """Called once consumers run: start timers, publish start-up messages."""

    async def close(self) -> None:  # noqa: B027
        """Close stores (after consumers and background tasks stopped)."""

    async def start(self) -> None:
        await self.open()
        self._running = True
        for consumer in self.consumers():
            handler = consumer.handler or self._dispatcher(consumer.routes)
            sub = await self.bus.consume(
                consumer.spec,
                self._wrap(handler, kind=consumer.spec.name),
                prefetch=consumer.prefetch,
            )
            self._subs.append(sub)
        await self.started()
        event(self.log, "service.started", queues=[c.spec.name for c in self.consumers()])

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop consuming (in-flight handlers finish), stop background work, close stores."""
        self._running = False
        for sub in self._subs:
            await sub.cancel(timeout)
        self._subs.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.close()
        event(self.log, "service.stopped")

    @property
    def running(self) -> bool:
        return self._running

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run background work owned by the service; cancelled at :meth:`stop`; a crash
        is logged, not swallowed."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)

        def _done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.log.error("background task %s failed", t.get_name(), exc_info=t.exception())

        task.add_done_callback(_done)
        return task

    # -- dispatch by kind and the one handler wrapper -------------------------------------
    def _dispatcher(self, routes: Routes) -> ServiceHandler:
        table = by_kind(routes)

        async def dispatch(delivery: Delivery) -> Outcome | None:
            env = await open_delivery(self, delivery, expect_kind=table.keys())
            _KIND.set(env.kind)
            metrics.message_age(self.name, env.kind, env.ts)
            return await table[env.kind](env)

        return dispatch

    def _wrap(
        self, handler: ServiceHandler, kind: str = "-"
    ) -> Callable[[Delivery], Awaitable[Outcome]]:
        """The bus handler of ``handler``: settles each delivery (:meth:`handle`). ``kind``
        labels its metrics until the dispatcher knows the envelope's kind (a queue's or a
        stream's name; ingest's update stream: ``update``)."""

        async def settle(delivery: Delivery) -> Outcome:
            with metrics.in_flight(self.name):
                return await self.handle(handler, delivery, kind)

        return settle

    async def handle(self, handler: ServiceHandler, delivery: Delivery, kind: str = "-") -> Outcome:
        delay = STORAGE_RETRY_S[0]
        held = False
        while True:
            try:
                outcome = await self._timed_settle(handler, delivery, kind)
            except (sqlite3.OperationalError, OSError) as exc:  # STORAGE_ERRORS or the disk
                if not _is_storage_fault(exc):
                    raise
                held = True
                await self._storage_fault(exc, delivery)
                if not self._running:
                    return Outcome.RETRY  # stopping: give the message back, unharmed
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORAGE_RETRY_S[1])
                continue
            if held:
                self._storage_recovered()
            return outcome

    def _storage_recovered(self) -> None:
        """A held message went through: the store takes writes again, the episode ends.
        Only a held message's success says so: a handler that writes nothing can succeed
        while the disk is still full (and, with several deliveries in flight, often does)."""
        if self._storage_down:
            self._storage_down = False
            event(self.log, "storage.recovered")

    async def _storage_fault(self, exc: BaseException, delivery: Delivery) -> None:
        """Log every failed attempt; alert once per episode (until a held message goes
        through: :meth:`_storage_recovered`)."""
        self._delivery_event("storage.fault", logging.ERROR, delivery, error=repr(exc))
        metrics.storage_fault(self.name)
        if self._storage_down:
            return
        self._storage_down = True
        try:
            await self.alert(
                kind="storage.fault",
                severity="critical",
                job="-",
                round=0,
                reason="storage",
                detail=f"{self.name} cannot write its store ({exc!r}); holding messages until "
                "it works again",
            )
        except TRANSIENT_ERRORS:
            event(self.log, "alert.deferred", logging.WARNING, error=repr(exc))

    async def _timed_settle(
        self, handler: ServiceHandler, delivery: Delivery, kind: str
    ) -> Outcome:
        """One attempt, observed as ``qflare_handler_seconds{service, kind, outcome}``."""
        token = _KIND.set(kind)
        start = time.perf_counter()
        outcome = "error"
        try:
            result = await self._settle(handler, delivery)
            outcome = result.value
            return result
        except (sqlite3.OperationalError, OSError):
            outcome = "held"  # its store failed: handle() holds the message and retries
            raise
        finally:
            metrics.handled(self.name, _KIND.get(), outcome, time.perf_counter() - start)
            _KIND.reset(token)

    async def _settle(self, handler: ServiceHandler, delivery: Delivery) -> Outcome:
        try:
            result = await handler(delivery)
        except MessageRejected as exc:
            metrics.rejected(self.name, exc.reason.value)
            self._delivery_event(
                "message.rejected",
                logging.WARNING,
                delivery,
                reason=exc.reason.value,
                detail=exc.detail,
                exchange=delivery.exchange,
            )
            try:
                await self.on_rejected(delivery, exc)
            except TRANSIENT_ERRORS as err:
                # The alert could not go out; keep the message so the rejection is reported.
                event(self.log, "alert.deferred", logging.WARNING, error=repr(err))
                return Outcome.RETRY
            return Outcome.REJECT
        except TRANSIENT_ERRORS as exc:
            if _is_storage_fault(exc):
                raise
            self._delivery_event(
                "handler.transient",
                logging.WARNING,
                delivery,
                error=repr(exc),
                delivery_count=delivery.delivery_count,
            )
            return Outcome.RETRY
        if result is None:
            return Outcome.ACK
        return result

    def _delivery_event(self, name: str, level: int, delivery: Delivery, **fields: Any) -> None:
        """Log ``name`` about a delivery that did not go through, with its routing key."""
        event(self.log, name, level, routing_key=delivery.routing_key, **fields)

    async def on_rejected(self, delivery: Delivery, exc: MessageRejected) -> None:
        """Report a rejected message. Default: an ``alert.raised`` naming the reason.
        Services that answer bad input themselves (ingest's ``update.rejected``) override."""
        job = _job_of(delivery.routing_key)
        await self.alert(
            kind="message.rejected",
            severity="warning",
            job=job,
            round=0,
            reason=exc.reason.value,
            detail=f"{delivery.exchange}/{delivery.routing_key}: {exc.detail or exc}",
        )

    # -- publishing -----------------------------------------------------------------------
    async def alert(
        self,
        *,
        kind: str,
        severity: str,
        job: str,
        round: int,
        reason: str = "",
        detail: str = "",
        client: str | None = None,
    ) -> None:
        """Publish an ``alert.raised`` (signed) on ``qflare.events`` (``alert.raised.<job>``);
        alerting stores, deduplicates and republishes it on ``qflare.alerts``."""
        body: dict[str, Any] = {
            "severity": severity,
            "alert_kind": kind,
            "client": client,
            "reason": reason or kind,
            "detail": detail[:4000],
        }
        await emit(self, "alert.raised", body, job=job or "-", round=max(0, int(round)))


#: errno values that mean "the local disk cannot take the write".
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT, errno.EACCES})


def _is_storage_fault(exc: BaseException) -> bool:
    """The service's own store failed (:data:`STORAGE_ERRORS`, or an OSError whose errno
    says the local disk refused the write): the message is held, not retried or dropped."""
    return isinstance(exc, STORAGE_ERRORS) or (
        isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS
    )


def _job_of(routing_key: str) -> str:
    # events are `<kind>.<job>`: the job is the last word (a routing-key word is a valid id).
    word = routing_key.rsplit(".", 1)[-1] if routing_key else ""
    return word if word and len(word) <= 64 else "-"
