"""The console's broker side: one private queue on ``qflare.events`` and ``qflare.alerts``.

The console binds one queue of its own to both exchanges, named per console
(``console.<host>.<pid>.<random>``) so several operators each see every message: all of
``qflare.alerts`` and, of ``qflare.events``, the kinds it draws (``<kind>.#``, see
:func:`~qflare.tui.adapter.event_kinds`; raw ``alert.raised`` only with ``raw_alerts``).
The queue is transient (``QueueSpec.transient``: exclusive, auto-delete on RabbitMQ), so the broker
removes it when the console stops, however it stops: a killed console leaves nothing behind.
The queue does not dead-letter: a message the console cannot read is shown as a local
alert and acknowledged, never fed back into ``qflare.dead`` (which the alerting service
turns into alerts for everyone).

Broker drops: the RabbitMQ adapter's connection is robust (it reconnects and declares the
queue and consumer again by itself, docs/architecture.md); the feed only watches it and reports
``LinkChanged`` events, so the screen says "reconnecting" while the link is down and
"connected" when it is back. The transient queue goes with the dropped connection, so what
was published while the link was down is not shown; the feed says so with a local
``console.gap`` alert when the link comes back. A first connection that fails is retried
the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from qflare.bus import (
    Bus,
    BusError,
    Delivery,
    Outcome,
    QueueSpec,
    Subscription,
    connect_bus,
    topology,
)
from qflare.crypto.pki import TrustStore
from qflare.messages import Severity
from qflare.messages.limits import OFF_LOOP_BYTES
from qflare.tui.adapter import decode_delivery, event_kinds
from qflare.tui.events import AlertRaised, Event, Link, LinkChanged

log = logging.getLogger("qflare.tui")

#: The local alert shown after a reconnect: events published meanwhile were missed.
KIND_CONSOLE_GAP = "console.gap"
Sink = Callable[[Sequence[Event]], None]


def console_queue_name() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:40]
    return f"console.{host}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


def describe_source(url: str | None) -> str:
    """Where the feed comes from, without credentials."""
    if url is None:
        return "in-process bus"
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}"


def link_up(bus: Bus) -> bool:
    """Whether the bus's broker connection is up now (the in-memory bus always is)."""
    conn: Any = getattr(bus, "connection", None)
    if conn is None:
        return True
    connected = getattr(conn, "connected", None)
    if isinstance(connected, asyncio.Event):
        return connected.is_set()
    return not getattr(conn, "is_closed", False)


async def delete_queue(bus: Bus, queue: str) -> None:
    """Remove a console queue by name (a durable one left by an older console; the
    console's own queue is transient and goes by itself)."""
    delete = getattr(bus, "delete_queue", None)
    if delete is not None:
        await delete(queue)
        return
    conn: Any = getattr(bus, "connection", None)
    if conn is None or not link_up(bus):
        return  # in-memory broker: the queue goes with the process
    channel = await conn.channel()
    try:
        await channel.queue_delete(bus.name(queue))
    finally:
        await channel.close()


class Feed:
    """Deliveries -> console events, handed to ``sink`` on the event loop.

    Give ``bus`` to share one that is already connected (``qflare simulate --tui``), or
    ``url`` (+ ``prefix``) to own a connection. ``trust`` verifies every envelope.
    ``declare`` (RabbitMQ): ``"passive"`` only checks that the exchanges exist, as the
    operator's broker user from ``qflare broker-definitions`` must (it may configure its
    console queues only); ``"full"`` declares them.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        url: str | None = None,
        bus: Bus | None = None,
        prefix: str = "",
        trust: TrustStore | None = None,
        raw_alerts: bool = False,
        queue: str | None = None,
        clock: Callable[[], float] = time.time,
        probe_interval: float = 0.25,
        retry_interval: float = 1.0,
        declare: str = "full",
    ) -> None:
        if (url is None) == (bus is None):
            raise ValueError("give exactly one of url= (own connection) or bus= (shared)")
        self.sink = sink
        self.url = url
        self.prefix = prefix
        self.bus = bus
        self.owns_bus = bus is None
        self.trust = trust
        self.raw_alerts = raw_alerts
        self.queue = queue or console_queue_name()
        self.clock = clock
        self.probe_interval = probe_interval
        self.retry_interval = retry_interval
        self.declare = declare
        self._sub: Subscription | None = None
        self._closed = False
        self._down_since: float | None = None

    @property
    def source(self) -> str:
        return describe_source(self.url)

    def _link(self, link: Link, detail: str = "") -> None:
        self.sink([LinkChanged(link, self.clock(), detail)])

    def _on_reconnect(self, *_: object) -> None:
        # Called by the robust connection once the queue is declared again; the probe
        # may miss a drop shorter than its interval, this callback does not.
        now = self.clock()
        down = f" for about {now - self._down_since:.0f}s" if self._down_since else ""
        self._down_since = None
        self.sink(
            [
                AlertRaised(
                    job="-",
                    round=0,
                    ts=now,
                    severity=Severity.WARNING,
                    kind=KIND_CONSOLE_GAP,
                    reason="RECONNECTED",
                    detail=f"the broker link was down{down}; events published meanwhile were not "
                    "received (the console's queue is transient)",
                    source="console",
                )
            ]
        )

    async def _handle(self, delivery: Delivery) -> Outcome:
        args = (delivery.body, delivery.exchange, delivery.routing_key, self.trust, self.clock())
        if len(delivery.body) > OFF_LOOP_BYTES:
            events = await asyncio.to_thread(decode_delivery, *args, raw_alerts=self.raw_alerts)
        else:
            events = decode_delivery(*args, raw_alerts=self.raw_alerts)
        if events:
            self.sink(events)
        return Outcome.ACK

    async def _connect(self) -> Bus:
        attempt = 0
        while True:
            try:
                options: dict[str, Any] = (
                    {"connect_timeout": 2.0, "declare": self.declare}
                    if not (self.url or "").startswith("memory")
                    else {}
                )
                return await connect_bus(self.url, prefix=self.prefix, **options)
            except BusError as exc:
                attempt += 1
                self._link(Link.RECONNECTING, f"{exc.reason}: broker unreachable (try {attempt})")
                await asyncio.sleep(self.retry_interval)

    async def run(self) -> None:
        """Subscribe and watch the link until cancelled or :meth:`close`d."""
        self._link(Link.CONNECTING)
        try:
            if self.bus is None:
                self.bus = await self._connect()
            kinds = event_kinds(raw_alerts=self.raw_alerts)
            spec = QueueSpec(
                self.queue,
                bindings=(
                    *((topology.EVENTS, f"{kind}.#") for kind in kinds),
                    (topology.ALERTS, "#"),
                ),
                dead_letter=False,
                transient=True,
            )
            while self._sub is None:
                try:
                    self._sub = await self.bus.consume(spec, self._handle, prefetch=256)
                except BusError as exc:
                    self._link(Link.RECONNECTING, f"{exc.reason}: {exc.detail[:120]}")
                    await asyncio.sleep(self.retry_interval)
            up = True
            self._link(Link.CONNECTED)
            callbacks: Any = getattr(
                getattr(self.bus, "connection", None), "reconnect_callbacks", None
            )
            if callbacks is not None:
                callbacks.add(self._on_reconnect)
            while not self._closed:
                await asyncio.sleep(self.probe_interval)
                now_up = link_up(self.bus)
                if now_up != up:
                    up = now_up
                    if not up:
                        self._down_since = self.clock()
                    self._link(
                        Link.CONNECTED if up else Link.RECONNECTING,
                        "" if up else "broker connection lost",
                    )
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop consuming (the broker deletes the transient queue) and close an owned
        connection."""
        if self._closed and self._sub is None:
            return
        self._closed = True
        sub, self._sub = self._sub, None
        bus = self.bus
        callbacks: Any = getattr(getattr(bus, "connection", None), "reconnect_callbacks", None)
        if callbacks is not None:
            callbacks.discard(self._on_reconnect)
        try:
            if sub is not None:
                await asyncio.wait_for(sub.cancel(timeout=1.0), 3.0)
        except Exception as exc:
            log.warning("console queue %s: cancel failed: %r", self.queue, exc)
        finally:
            if bus is not None and self.owns_bus:
                await bus.close(timeout=1.0)
            self._link(Link.CLOSED)
