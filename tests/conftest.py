"""Shared test configuration: broker fixtures and an event-based wait helper.

Fixtures
  amqp_url      RabbitMQ URL (env QFLARE_TEST_AMQP, default amqp://guest:guest@127.0.0.1:5672/)
  bus_prefix    unique name prefix per test (``t-<uuid8>-``), so runs never collide
  bus_url       parametrised: "memory://" and the RabbitMQ URL (marked ``rabbitmq``)
  bus_factory   ``await bus_factory(**options)`` -> another bus on the same backend and prefix
                (a second "process"); all are closed and the topology deleted afterwards
  bus           the first bus of ``bus_factory``: runs each test on both adapters
  memory_bus / rabbit_bus / rabbit_bus_factory   one adapter only
  wait_for      ``await wait_for(event | predicate | awaitable, timeout=5.0)``

RabbitMQ unreachable: the test is skipped locally, but fails when CI=true.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from qflare.bus import Bus, connect_bus

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "broker_restart: stops and starts the shared RabbitMQ (opt in with "
        "QFLARE_BROKER_RESTART=1; never while others use the broker)",
    )
    config.addinivalue_line(
        "markers",
        "cluster: starts a three-node RabbitMQ cluster of its own (opt in with QFLARE_CLUSTER=1; "
        "on when CI=true)",
    )
    config.addinivalue_line(
        "markers",
        "soak: a long run with faults on a clock (opt in with QFLARE_SOAK=1)",
    )


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 1.0):
            return True
    except OSError:
        return False


def require_rabbitmq(url: str) -> None:
    if _reachable(url):
        return
    message = (
        f"RabbitMQ is not reachable at {urlsplit(url).hostname}:{urlsplit(url).port or 5672} "
        "(start it with `rabbitmq-server -detached`, or set QFLARE_TEST_AMQP)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; CI=true, so this is a failure, not a skip")
    pytest.skip(message)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    return os.environ.get("QFLARE_TEST_AMQP", DEFAULT_AMQP)


@pytest.fixture
def bus_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}-"


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def bus_url(request: pytest.FixtureRequest, amqp_url: str) -> str:
    if request.param == "rabbitmq":
        require_rabbitmq(amqp_url)
        return amqp_url
    return "memory://"


BusFactory = Callable[..., Awaitable[Bus]]


async def _bus_factory(url: str, prefix: str) -> AsyncIterator[BusFactory]:
    buses: list[Bus] = []

    async def make(**options: Any) -> Bus:
        if url.startswith("amqp"):
            options.setdefault("connect_timeout", 5.0)
        bus = await connect_bus(url, prefix=prefix, **options)
        buses.append(bus)
        return bus

    try:
        yield make
    finally:
        # Closing first hands unsettled messages back; then one bus removes the topology.
        for bus in reversed(buses):
            await bus.close(timeout=1.0)
        if buses:
            cleaner = await make()
            await cleaner.delete_all(frozenset().union(*(b.declared_queues for b in buses)))
            await cleaner.close()


@pytest.fixture
async def bus_factory(bus_url: str, bus_prefix: str) -> AsyncIterator[BusFactory]:
    async for make in _bus_factory(bus_url, bus_prefix):
        yield make


@pytest.fixture
async def rabbit_bus_factory(amqp_url: str, bus_prefix: str) -> AsyncIterator[BusFactory]:
    require_rabbitmq(amqp_url)
    async for make in _bus_factory(amqp_url, bus_prefix):
        yield make


@pytest.fixture
async def bus(bus_factory: BusFactory) -> Bus:
    return await bus_factory()


@pytest.fixture
async def memory_bus(bus_prefix: str) -> AsyncIterator[Bus]:
    async for make in _bus_factory("memory://", bus_prefix):
        yield await make()


@pytest.fixture
async def rabbit_bus(amqp_url: str, bus_prefix: str) -> AsyncIterator[Bus]:
    require_rabbitmq(amqp_url)
    async for make in _bus_factory(amqp_url, bus_prefix):
        yield await make()


async def _wait_for(
    condition: asyncio.Event | Callable[[], bool] | Awaitable[Any],
    timeout: float = 5.0,
    *,
    message: str = "",
) -> Any:
    """Wait on an event, an awaitable or a predicate, failing the test after ``timeout``.

    A predicate is re-checked every few milliseconds; prefer events where the code under
    test can set one."""
    try:
        async with asyncio.timeout(timeout):
            if isinstance(condition, asyncio.Event):
                return await condition.wait()
            if inspect.isawaitable(condition):
                return await condition
            while not condition():
                await asyncio.sleep(0.005)
            return True
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {message or condition!r}")


@pytest.fixture
def wait_for() -> Callable[..., Awaitable[Any]]:
    return _wait_for
