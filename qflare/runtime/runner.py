"""Running services: one per OS process (``qflare serve``), or all on one bus in-process.

``run_service`` is the process entry point: checks first (identity, data folder, the
broker's answer to its login: each a one-line error before anything starts), then the
health endpoint (:mod:`qflare.runtime.health`: ``/readyz`` turns 200 once the service
consumes), structured logging, the service on its own bus connection, and a clean stop on
SIGTERM/SIGINT (consumers cancelled so in-flight handlers finish and unacked messages go
back to the queue, stores closed). A signal during start-up abandons the start and stops
what had started. SIGTERM ends with exit code 0; SIGINT raises ``KeyboardInterrupt`` once
everything is stopped, which the command line turns into exit code 130.

``run_in_process`` starts every service on one bus (``memory://`` by default) for
``qflare up`` on the embedded bus, ``qflare simulate`` and tests; the same code runs in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from qflare.bus import Bus, connect_bus
from qflare.errors import QflareError
from qflare.messages.jobs import JobSpec
from qflare.runtime.bootstrap import SERVICES, build_service
from qflare.runtime.config import Settings
from qflare.runtime.health import HealthServer
from qflare.runtime.logging import configure_logging, event
from qflare.runtime.preflight import check_can_serve, wait_for_broker
from qflare.runtime.service import Service

log = logging.getLogger("qflare.runtime")


async def serve(
    name: str,
    settings: Settings,
    stop: asyncio.Event,
    bus: Bus | None = None,
    *,
    health: HealthServer | None = None,
) -> None:
    """Run service ``name`` until ``stop`` is set; ``health`` learns when it is ready."""
    own_bus = bus is None
    service = await build_service(name, settings, bus=bus)
    try:
        await service.start()
        if health is not None:
            health.set_ready(name)
        fields: dict[str, Any] = {"service": name, **settings.safe_dict()}
        if health is not None:
            fields["metrics"] = health.url
        event(log, "serve.ready", **fields)
        await stop.wait()
    finally:
        if health is not None:
            health.stopping()
        await service.stop()
        if own_bus:
            await service.bus.close()


def run_until_signal(body: Callable[[asyncio.Event], Awaitable[int]], health: HealthServer) -> int:
    """Run ``body(stop)`` on a fresh event loop with ``health`` serving; SIGTERM/SIGINT set
    ``stop`` once ``health`` is ready, and cancel ``body`` (a start-up in progress) before.
    Returns ``body``'s exit code, 0 after SIGTERM; raises ``KeyboardInterrupt`` after SIGINT
    (once ``body`` has stopped)."""
    received: list[int] = []

    async def main() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        stop = asyncio.Event()

        def on_signal(sig: int) -> None:
            received.append(sig)
            stop.set()
            if not health.ready and task is not None:
                task.cancel()  # still starting (or already stopping): give up at once

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        await health.start()
        try:
            return await body(stop)
        finally:
            health.stopping()
            await health.close()

    try:
        code = asyncio.run(main())
    except asyncio.CancelledError:
        if not received:
            raise
        code = 0
    if signal.SIGINT in received:
        raise KeyboardInterrupt
    return code


def run_service(name: str, settings: Settings, *, metrics_port: int | None = None) -> int:
    """Process entry point of ``qflare serve <name>``: returns the exit code. Mistakes found
    before the service starts raise (one line from the command line); once logging is
    configured, a failure to start is the ``serve.failed`` log event and exit code 2 for a
    configuration mistake (keys, job specs, model files), 1 otherwise."""
    check_can_serve(settings, [name])
    port = settings.metrics_port if metrics_port is None else metrics_port
    health = HealthServer([name], settings.metrics_host, port)

    async def body(stop: asyncio.Event) -> int:
        await wait_for_broker(settings.broker_for(name), settings.connect_timeout_s)
        configure_logging(name, settings.log_level, settings.log_format)
        try:
            await serve(name, settings, stop, health=health)
        except Exception as exc:
            return _failed(name, exc)
        return 0

    return run_until_signal(body, health)


def run_all(settings: Settings, *, metrics_port: int | None = None) -> int:
    """``qflare up`` on one bus: every service in this process until SIGTERM/SIGINT."""
    port = settings.metrics_port if metrics_port is None else metrics_port
    health = HealthServer(SERVICES, settings.metrics_host, port)

    async def body(stop: asyncio.Event) -> int:
        await wait_for_broker(settings.broker, settings.connect_timeout_s)
        configure_logging("up", settings.log_level, settings.log_format)
        try:
            async with run_in_process(settings) as running:
                for name in running.services:
                    health.set_ready(name)
                event(log, "serve.ready", service="up", metrics=health.url, **settings.safe_dict())
                print(
                    f"qflare up: all services running in this process ({health.url}/readyz); "
                    "SIGTERM or Ctrl-C stops them",
                    file=sys.stderr,
                    flush=True,
                )
                await stop.wait()
                health.stopping()
        except Exception as exc:
            return _failed("up", exc)
        return 0

    return run_until_signal(body, health)


def _failed(name: str, exc: Exception) -> int:
    config = isinstance(exc, (ValueError, TypeError, FileNotFoundError))
    event(
        log,
        "serve.failed",
        logging.ERROR,
        service=name,
        error=" ".join(str(exc).split()) or type(exc).__name__,
        error_type=type(exc).__name__,
    )
    if not config and not isinstance(exc, (QflareError, OSError)):
        log.debug("serve.failed traceback", exc_info=exc)
    return 2 if config else 1


@dataclass
class InProcess:
    """The services of one ``run_in_process``, started on one bus."""

    bus: Bus
    settings: Settings
    services: dict[str, Service] = field(default_factory=dict)

    async def submit_job(self, spec: JobSpec, model: dict[str, Any] | None = None) -> None:
        """Hand a job to every service that runs jobs, the aggregator last (it starts the
        job). ``model`` gives the version-0 tensors instead of ``spec.initial_model``."""
        for service in self.services.values():
            submit = getattr(service, "submit_job", None)
            if submit is not None:
                await submit(spec, model)

    async def wait_job(self, job_id: str, timeout: float | None = None) -> str | None:
        """Wait for ``job_id`` to end; returns the end reason (``completed``,
        ``budget_exhausted``, ``too_few_updates``)."""
        reason: str | None = await self.services["aggregator"].wait_job(job_id, timeout)  # type: ignore[attr-defined]
        return reason

    async def restart(
        self, name: str, identities: dict[str, tuple[Any, Any]] | None = None
    ) -> Service:
        """Stop service ``name`` and start a fresh instance on the same state (tests of
        restart safety; a crash is ``kill -9`` of a ``qflare serve`` process)."""
        await self.services[name].stop()
        identity, trust = (identities or {}).get(name, (None, None))
        service = await build_service(
            name, self.settings, bus=self.bus, identity=identity, trust=trust
        )
        await service.start()
        self.services[name] = service
        return service


@contextlib.asynccontextmanager
async def run_in_process(
    settings: Settings,
    bus: Bus | None = None,
    *,
    services: Iterable[str] = SERVICES,
    identities: dict[str, tuple[Any, Any]] | None = None,
) -> AsyncIterator[InProcess]:
    """Start ``services`` (default: all five) on ``bus`` (default: a fresh embedded bus from
    ``settings.broker``); stop them in reverse order on exit. Jobs in ``settings.jobs`` are
    picked up by the services themselves; more can be added with ``submit_job``. ``identities`` maps a service
    name to ``(identity, trust)`` when they are not loaded from ``settings.pki_dir``."""
    own_bus = bus is None
    if bus is None:
        options: dict[str, Any] = {}
        if not settings.embedded:  # the in-memory bus takes no options
            options["replicas"] = settings.broker_replicas
            options["declare"] = settings.broker_declare
        bus = await connect_bus(settings.broker, prefix=settings.prefix, **options)
    running = InProcess(bus=bus, settings=settings)
    names = [n for n in SERVICES if n in set(services)]
    try:
        for name in names:
            identity, trust = (identities or {}).get(name, (None, None))
            service = await build_service(name, settings, bus=bus, identity=identity, trust=trust)
            await service.start()
            running.services[name] = service
        yield running
    finally:
        for name in reversed(list(running.services)):
            await running.services[name].stop()
        if own_bus:
            await bus.close()
