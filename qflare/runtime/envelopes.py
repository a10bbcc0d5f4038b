"""Signed envelopes in and out of a service: the only place services touch the codec.

Every message a service publishes is an envelope signed with the service's own identity
(docs/architecture.md); every message it consumes is opened against the CA trust store, so a forged
or revoked sender is a :class:`MessageRejected` like any other bad input. Large bodies are
encoded/verified in a worker thread (ML-DSA and SHA-256 release the GIL) so the
event loop keeps serving.

Routing keys: ``qflare.events`` carries ``<kind>.<job>``; ``qflare.broadcast`` carries
``<job>.<kind>`` (clients bind ``<job>.#``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from qflare.bus import Delivery, topology
from qflare.messages import Body, Envelope, encode
from qflare.messages.envelope import open_off_loop
from qflare.runtime import metrics

if TYPE_CHECKING:
    from qflare.runtime.service import Service


def event_key(kind: str, job: str) -> str:
    return f"{kind}.{job}"


def broadcast_key(job: str, kind: str) -> str:
    return f"{job}.{kind}"


async def seal(
    service: Service, kind: str, body: Body | dict[str, Any], *, job: str, round: int
) -> bytes:
    """Encode and sign ``body`` as ``kind`` with the service's identity."""
    identity = service.ctx.identity
    if identity is None:
        raise ValueError(f"service {service.name!r} has no identity to sign {kind!r} with")
    big = isinstance(body, Body) and _has_tensors(body)
    if big:
        return await asyncio.to_thread(encode, kind, body, identity, job=job, round=round)
    return encode(kind, body, identity, job=job, round=round)


async def emit(
    service: Service,
    kind: str,
    body: Body | dict[str, Any],
    *,
    job: str,
    round: int,
    exchange: str = topology.EVENTS,
    routing_key: str | None = None,
) -> bytes:
    """Sign and publish one envelope (``<kind>.<job>`` on ``qflare.events`` by default);
    returns the bytes sent, so a caller can re-send the same envelope."""
    data = await seal(service, kind, body, job=job, round=round)
    key = routing_key or (
        broadcast_key(job, kind) if exchange == topology.BROADCAST else event_key(kind, job)
    )
    await service.bus.publish(exchange, key, data)
    metrics.published(service.name, kind)
    return data


async def open_delivery(
    service: Service,
    delivery: Delivery,
    *,
    expect_kind: str | Collection[str] | None = None,
    expect_job: str | None = None,
) -> Envelope[Body]:
    """Verify and decode a delivered envelope; any defect raises MessageRejected."""
    trust = service.ctx.trust
    if trust is None:
        raise ValueError(f"service {service.name!r} has no trust store to verify with")
    return await open_off_loop(delivery.body, trust, expect_kind=expect_kind, expect_job=expect_job)


def _has_tensors(body: Body) -> bool:
    return bool(getattr(body, "tensors", None))
