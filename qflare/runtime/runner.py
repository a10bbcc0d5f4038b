"""Running services: one per OS process (``qflare serve``), or all on one bus in-process.

``run_service`` is the process entry point: structured logging, the service on its own bus
connection, a clean stop on SIGTERM/SIGINT (consumers cancelled so in-flight handlers finish
and unacked messages go back to the queue, stores closed), exit code 0.

``run_in_process`` starts every service on one bus (``memory://`` by default) for
``qflare up`` on the embedded bus, ``qflare simulate`` and tests; the same code runs in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from qflare.bus import Bus, connect_bus
from qflare.messages.jobs import JobSpec
from qflare.runtime.bootstrap import SERVICES, build_service
from qflare.runtime.config import Settings
from qflare.runtime.jobs import check_model_size
from qflare.runtime.logging import configure_logging, event
from qflare.runtime.service import Service

log = logging.getLogger("qflare.runtime")


async def serve(name: str, settings: Settings, stop: asyncio.Event, bus: Bus | None = None) -> None:
    """Run service ``name`` until ``stop`` is set."""
    own_bus = bus is None
    service = await build_service(name, settings, bus=bus)
    try:
        await service.start()
        event(log, "serve.ready", service=name, **settings.safe_dict())
        await stop.wait()
    finally:
        await service.stop()
        if own_bus:
            await service.bus.close()


def run_service(name: str, settings: Settings) -> int:
    """Process entry point of ``qflare serve <name>``: returns the exit code."""
    configure_logging(name, settings.log_level, settings.log_format)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(name, settings, stop)

    try:
        asyncio.run(main())
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # configuration mistakes found while wiring (keys, job specs, model files)
        event(log, "serve.failed", logging.ERROR, service=name, error=str(exc))
        return 2
    return 0


@dataclass
class InProcess:
    """The services of one ``run_in_process``, started on one bus."""

    bus: Bus
    settings: Settings
    services: dict[str, Service] = field(default_factory=dict)

    async def submit_job(self, spec: JobSpec, model: dict[str, Any] | None = None) -> None:
        """Hand a job to every service that runs jobs, the aggregator last (it starts the
        job). ``model`` gives the version-0 tensors instead of ``spec.initial_model``.
        A model too large for one message is refused before any service stores the job."""
        if model is not None:
            check_model_size(spec.job_id, model)
        for service in self.services.values():
            submit = getattr(service, "submit_job", None)
            if submit is not None:
                await submit(spec, model)

    async def wait_job(self, job_id: str, timeout: float | None = None) -> str | None:
        """Wait for ``job_id`` to end; returns the end reason (``completed``,
        ``budget_exhausted``, ``too_few_updates``)."""
        return await self.services["aggregator"].wait_job(job_id, timeout)  # type: ignore[attr-defined]

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
        bus = await connect_bus(settings.broker, prefix=settings.prefix)
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
