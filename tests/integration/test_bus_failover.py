"""Several broker addresses and the replica count, against the one broker of this machine.

A cluster's failover is shown end to end by tests/e2e/test_cluster.py (three nodes of its
own, kill -9 of the one in use). Here the same broker stands in for the other nodes under
other addresses (``localhost`` for ``127.0.0.1``) and a port nobody listens on for a dead
node, so the rotation is checked in the default suite: the first connect passes over a dead
address, and a reconnect after the broker closed our connection goes to the next address.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import pytest

from qflare.bus import (
    Delivery,
    Outcome,
    QueueSpec,
    StreamSpec,
    TopologyError,
    connect_bus,
    topology,
)
from qflare.bus.rabbitmq import stream_arguments

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def amqp(amqp_url: str, rabbit_bus_factory: object) -> str:
    """The broker's URL; like every RabbitMQ test, skipped (failed under CI=true) when it
    is down (``rabbit_bus_factory`` checks)."""
    return amqp_url


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_host(url: str, host: str, port: int | None = None) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}{host}:{port or parts.port or 5672}"))


async def _delivers(bus: Any, wait_for: Any, body: bytes) -> None:
    """A message published through ``bus`` reaches its consumer on ``bus``."""
    seen: list[bytes] = []

    async def on(d: Delivery) -> Outcome:
        seen.append(d.body)
        return Outcome.ACK

    await bus.consume(QueueSpec("q", bindings=((topology.EVENTS, "k"),)), on)
    await bus.publish(topology.EVENTS, "k", body)
    await wait_for(lambda: seen == [body], timeout=10)


async def test_the_first_connect_passes_over_a_dead_address(amqp, wait_for) -> None:
    dead = _with_host(amqp, "127.0.0.1", _dead_port())
    bus = await connect_bus(f"{dead},{amqp}", prefix=f"t-{uuid.uuid4().hex[:8]}-")
    try:
        assert bus.connection.url.port == (urlsplit(amqp).port or 5672)
        await _delivers(bus, wait_for, b"over the second address")
    finally:
        await bus.delete_all()
        await bus.close()


async def test_a_connection_closed_while_its_first_channel_opens_is_one_more_attempt(
    amqp, wait_for, monkeypatch
) -> None:
    """The broker closed a participant's connection (INTERNAL_ERROR: the crash of its
    channel process) while the bus opened its first channel; before, the error went out of
    ``connect_bus`` and the participant died at start (a CI rehearsal, 2026-12-07). The
    first connection is real; its first channel fails as the broker's close made it fail."""
    import qflare.bus.rabbitmq as rabbitmq

    real = aio_pika.connect_robust
    opened: list[aio_pika.abc.AbstractRobustConnection] = []

    async def connect_robust(*args: object, **kwargs: object) -> object:
        connection = await real(*args, **kwargs)
        opened.append(connection)
        if len(opened) == 1:

            async def crashed(*_a: object, **_k: object) -> object:
                raise aiormq.exceptions.ConnectionInternalError("INTERNAL_ERROR")

            connection.channel = crashed  # type: ignore[method-assign]
        return connection

    monkeypatch.setattr(rabbitmq.aio_pika, "connect_robust", connect_robust)
    bus = await connect_bus(amqp, prefix=f"t-{uuid.uuid4().hex[:8]}-")
    try:
        assert len(opened) == 2 and opened[0].is_closed and bus.connection is opened[1]
        await _delivers(bus, wait_for, b"on the second attempt")
    finally:
        await bus.delete_all()
        await bus.close()


async def _ctl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"rabbitmqctl {args} failed: {err.decode()}"
    return out.decode()


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl not installed")
async def test_a_reconnect_goes_to_the_next_address(amqp, wait_for) -> None:
    """The broker closes our connection: the robust connection comes back through the next
    addresses in turn (a dead one, then ``localhost``), with its consumer."""
    dead = _with_host(amqp, "127.0.0.1", _dead_port())
    other = _with_host(amqp, "localhost")
    name = f"qflare-test-{uuid.uuid4().hex[:8]}"
    bus = await connect_bus(
        f"{amqp},{dead},{other}",
        prefix=f"t-{uuid.uuid4().hex[:8]}-",
        connection_name=name,
        reconnect_interval=0.2,
    )
    try:
        connection = bus.connection
        assert connection.url.host == urlsplit(amqp).hostname
        seen: set[int] = set()

        async def on(d: Delivery) -> Outcome:
            seen.add(int(d.body))
            return Outcome.ACK

        await bus.consume(QueueSpec("q", bindings=((topology.EVENTS, "k"),)), on)
        reconnected = asyncio.Event()
        connection.reconnect_callbacks.add(lambda *_a: reconnected.set())
        listing = await _ctl(
            "list_connections", "pid", "client_properties", "-q", "--no-table-headers"
        )
        pids = [line.split("\t")[0] for line in listing.splitlines() if f'"{name}"' in line]
        assert len(pids) == 1, pids
        await _ctl("close_connection", pids[0], "qflare test: the node went away")
        await wait_for(reconnected, timeout=20, message="the reconnect")
        assert connection.url.host == "localhost"
        for i in range(5):
            await bus.publish(topology.EVENTS, "k", str(i).encode())
        await wait_for(lambda: seen == set(range(5)), timeout=10, message="the consumer back")
    finally:
        await bus.delete_all()
        await bus.close()


async def test_replicas_are_declared_and_part_of_the_topology(amqp, bus_prefix) -> None:
    """``replicas`` puts the replica count on every durable queue and stream (a single node
    takes 1); a bus of the same deployment that leaves it unset is refused, not ignored."""
    bus = await connect_bus(amqp, prefix=bus_prefix, replicas=1)
    plain = await connect_bus(amqp, prefix=bus_prefix)
    stream = StreamSpec("s", bindings=((topology.EVENTS, "s"),), max_bytes=1 << 20)
    try:
        await bus.consume(QueueSpec("q", bindings=((topology.EVENTS, "k"),)), _ack)
        await bus.declare_stream(stream)
        admin = await aio_pika.connect(amqp)
        async with admin:
            channel = await admin.channel()
            # the broker refuses a re-declaration with other arguments: these are exactly it
            await channel.declare_queue(
                bus_prefix + "q",
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": 4,
                    "x-dead-letter-exchange": bus_prefix + topology.DEAD,
                    "x-quorum-initial-group-size": 1,
                },
            )
            arguments = stream_arguments(stream, 1)
            assert arguments["x-initial-cluster-size"] == 1
            await channel.declare_queue(bus_prefix + "s", durable=True, arguments=arguments)
        with pytest.raises(TopologyError):
            await plain.consume(QueueSpec("q", bindings=((topology.EVENTS, "k"),)), _ack)
        with pytest.raises(TopologyError):
            await plain.declare_stream(stream)
    finally:
        await plain.close()
        await bus.delete_all()
        await bus.close()


async def _ack(_d: Delivery) -> Outcome:
    return Outcome.ACK
