"""A real broker drop between the console and RabbitMQ: the console says "reconnecting"
while the link is down and recovers by itself. Its queue is transient (gone with the
dropped connection), so what was published meanwhile is missed, and the console says so
with a local ``console.gap`` alert.

The drop is made by a TCP relay the console connects through (cutting every connection and
refusing new ones), so the shared RabbitMQ itself is never stopped."""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit, urlunsplit

import aiormq
import pytest

from qflare.tui import events as ev
from qflare.tui.console import build_console
from qflare.tui.feed import delete_queue
from qflare.tui.table import RowTable

from .test_app import SIZE, banner, cells, keys, until
from .wire import Publisher, federation

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


class Relay:
    """127.0.0.1:<port> -> the broker, with a switch."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()

    async def close(self) -> None:
        if self.server is not None and self.server.is_serving():
            await self.cut()


async def test_broker_drop_shows_reconnecting_then_recovers(
    amqp_url, bus_prefix, rabbit_bus_factory
) -> None:
    fed = federation(2)
    direct = await rabbit_bus_factory()
    pub = Publisher(direct, fed, "j")
    target = urlsplit(amqp_url)
    relay = Relay(target.hostname or "127.0.0.1", target.port or 5672)
    await relay.start()
    via_relay = urlunsplit(
        target._replace(netloc=f"{target.username}:{target.password}@127.0.0.1:{relay.port}")
    )
    app = build_console(url=via_relay, prefix=bus_prefix, trust=fed.trust())
    t = time.time()
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "● connected" in banner(app), timeout=15)
            rounds = app.query_one("#rounds", RowTable)
            await pub.round_opened(1, t, ["client-000", "client-001"], deadline=t + 60)
            await until(pilot, lambda: "j:1" in keys(rounds))

            await relay.cut()
            down_at = time.monotonic()
            await until(pilot, lambda: "reconnecting" in banner(app), timeout=10)
            assert app.state.link is ev.Link.RECONNECTING
            # Published while the console is away: its transient queue went with the
            # connection, so nobody keeps this for it.
            await pub.accepted(1, t + 1, "client-000")
            await pilot.pause(1.5)
            assert "reconnecting for" in banner(app) and cells(rounds, "j:1")[3] == "0/2"

            await relay.start()
            await until(pilot, lambda: "● connected" in banner(app), timeout=20)
            await until(
                pilot, lambda: any(a.kind == "console.gap" for a in app.state.alerts), timeout=10
            )
            assert time.monotonic() - down_at > 1.5
            await pub.accepted(1, t + 2, "client-001")
            await until(pilot, lambda: cells(rounds, "j:1")[3] == "1/2", timeout=10)
            queue = app.feed.queue
            await pilot.press("q")
        # The broker removed the console's queue when the console went.
        channel = await direct.connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(direct.name(queue), passive=True)
    finally:
        if app.feed is not None and app.feed.bus is not None:
            await delete_queue(direct, app.feed.queue)
        await relay.close()
