"""The one wiring place per service (after cosmicpython's ``bootstrap.py``).

:func:`build_service` turns a service name and :class:`Settings` into a ready (not yet
started) service: it connects the bus named by ``settings.broker`` (as the service's own
broker user when the URL names none: :meth:`Settings.broker_for`) unless one is passed in,
loads the service's identity and the CA trust store from ``settings.pki_dir`` unless passed
in, and gives it its own data folder. Tests and ``run_in_process`` pass their own bus (and
identities) through this same function.

Each service module ``qflare.services.<name>.service`` exposes ``build(ctx) -> Service``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

from qflare.bus import Bus, connect_bus
from qflare.runtime.config import Settings
from qflare.runtime.service import Service, ServiceContext

#: Every service, in start order (consumers of a message start before its producers, so
#: nothing published at start-up falls on the floor).
SERVICES: tuple[str, ...] = ("alerting", "accountant", "detector", "ingest", "aggregator")


def service_module(name: str) -> str:
    if name not in SERVICES:
        raise ValueError(f"unknown service {name!r}; choose one of {', '.join(SERVICES)}")
    return f"qflare.services.{name}.service"


def load_identity(settings: Settings, name: str) -> tuple[Any, Any]:
    """The service's identity and trust store from ``<pki_dir>/services/<name>/`` (written
    by ``qflare provision``)."""
    from qflare.crypto.keystore import Identity, load_trust

    folder = settings.identity_dir(name)
    passphrase = settings.passphrase.encode() if settings.passphrase else None
    return Identity.load(folder, passphrase), load_trust(folder)


async def build_service(
    name: str,
    settings: Settings,
    *,
    bus: Bus | None = None,
    identity: Any = None,
    trust: Any = None,
    clock: Callable[[], float] = time.time,
) -> Service:
    """Build service ``name``; connects a bus when none is given (the caller owns a bus it
    passes in, the service's runner closes one built here)."""
    module_name = service_module(name)
    if identity is None or trust is None:
        loaded_identity, loaded_trust = load_identity(settings, name)
        identity = identity or loaded_identity
        trust = trust or loaded_trust
    module = importlib.import_module(module_name)
    if bus is None:
        bus = await connect_bus(
            settings.broker_for(name), prefix=settings.prefix, **_bus_options(settings, name)
        )
    ctx = ServiceContext(
        name=name,
        settings=settings,
        bus=bus,
        identity=identity,
        trust=trust,
        data_dir=settings.service_dir(name),
        clock=clock,
    )
    service: Service = module.build(ctx)
    return service


def _bus_options(settings: Settings, name: str) -> dict[str, Any]:
    if settings.embedded:
        return {}  # the in-memory bus takes no options
    return {
        "connection_name": f"qflare-{name}",
        "replicas": settings.broker_replicas,
        "declare": settings.broker_declare,
    }
