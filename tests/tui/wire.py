"""Real signed envelopes for console tests: what the services publish, built with
qflare.messages and identities from a test CA."""

from __future__ import annotations

import hashlib
from typing import Any

from qflare.bus import Bus, topology
from qflare.crypto.testing import MemoryFederation, make_federation
from qflare.messages import encode

SENDER = {
    "round.opened": "aggregator",
    "round.closed": "aggregator",
    "model.published": "aggregator",
    "metrics.evaluated": "aggregator",
    "job.ended": "aggregator",
    "privacy.request": "aggregator",
    "update.accepted": "ingest",
    "update.rejected": "ingest",
    "round.verdict": "detector",
    "privacy.granted": "accountant",
    "privacy.denied": "accountant",
    "alert.raised": "alerting",
}
DIGEST = hashlib.sha256(b"model").digest()


def federation(clients: int = 8) -> MemoryFederation:
    return make_federation(clients)


def envelope(
    fed: MemoryFederation,
    kind: str,
    body: dict[str, Any],
    *,
    job: str,
    round: int,
    ts: float,
    sender: str | None = None,
) -> bytes:
    return encode(kind, body, fed[sender or SENDER[kind]], job=job, round=round, ts=int(ts * 1000))


class Publisher:
    """Publishes signed envelopes the way the services route them."""

    def __init__(self, bus: Bus, fed: MemoryFederation, job: str) -> None:
        self.bus, self.fed, self.job = bus, fed, job

    async def event(self, kind: str, round: int, ts: float, **body: Any) -> None:
        data = envelope(self.fed, kind, body, job=self.job, round=round, ts=ts)
        await self.bus.publish(topology.EVENTS, f"{kind}.{self.job}", data)

    async def alert(
        self,
        round: int,
        ts: float,
        *,
        severity: str,
        kind: str,
        reason: str,
        client: str | None = None,
        detail: str = "",
    ) -> None:
        body = {
            "severity": severity,
            "alert_kind": kind,
            "client": client,
            "reason": reason,
            "detail": detail,
        }
        data = envelope(self.fed, "alert.raised", body, job=self.job, round=round, ts=ts)
        await self.bus.publish(topology.ALERTS, f"{severity}.{kind}.{self.job}", data)

    async def round_opened(
        self, round: int, ts: float, participants: list[str], deadline: float, rule: str = "median"
    ) -> None:
        await self.event(
            "round.opened",
            round,
            ts,
            model_version=round - 1,
            model_digest=DIGEST,
            participants=participants,
            deadline=deadline,
            min_updates=1,
            clip_norm=5.0,
            tensor_spec=[{"name": "w", "dtype": "float32", "shape": [4]}],
            rule=rule,
            model_offset=round - 1,
            updates_from=0,
        )

    async def accepted(self, round: int, ts: float, client: str) -> None:
        await self.event(
            "update.accepted",
            round,
            ts,
            client=client,
            update_digest=hashlib.sha256(client.encode()).digest(),
            base_version=round - 1,
            num_samples=10,
            offset=100 * round + int(client.rsplit("-", 1)[-1]) if client[-1].isdigit() else 0,
        )

    async def verdict(self, round: int, ts: float, kept: list[str], flagged: list[str]) -> None:
        await self.event(
            "round.verdict",
            round,
            ts,
            kept=kept,
            flagged=[{"client": c, "score": 9.0, "reasons": ["krum"]} for c in flagged],
        )
