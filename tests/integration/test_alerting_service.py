"""Alerting on a real bus (memory and RabbitMQ): stored, deduplicated, rate-limited,
escalated, dead letters drained into alerts, republished on ``qflare.alerts``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from qflare.bus import Bus, Delivery, Outcome, QueueSpec, topology
from qflare.crypto.testing import MemoryFederation, make_federation
from qflare.messages import Envelope, encode, open_envelope
from qflare.runtime import Settings, build_service, open_readonly
from qflare.services.alerting.store import DB_FILE

JOB = "j1"


@dataclass
class Rig:
    bus: Bus
    fed: MemoryFederation
    service: Any
    data_dir: Path
    out: asyncio.Queue[tuple[str, Envelope]] = field(default_factory=asyncio.Queue)

    async def on_alert(self, d: Delivery) -> Outcome:
        await self.out.put((d.routing_key, open_envelope(d.body, self.fed.trust())))
        return Outcome.ACK

    def raised(
        self,
        kind: str,
        *,
        client: str | None = None,
        reason: str = "R",
        round_: int = 1,
        severity: str = "warning",
        sender: str = "detector",
    ) -> bytes:
        body = {
            "severity": severity,
            "alert_kind": kind,
            "client": client,
            "reason": reason,
            "detail": "d",
        }
        return encode("alert.raised", body, self.fed[sender], job=JOB, round=round_)

    async def send(self, data: bytes) -> None:
        await self.bus.publish(topology.EVENTS, f"alert.raised.{JOB}", data)

    async def next(self, timeout: float = 10.0) -> tuple[str, Envelope]:
        return await asyncio.wait_for(self.out.get(), timeout)

    async def quiet(self, seconds: float = 0.5) -> None:
        await asyncio.sleep(seconds)
        assert self.out.empty(), f"unexpected alert {self.out.get_nowait()[0]}"

    def rows(self) -> list[Any]:
        with open_readonly(self.data_dir / "alerting" / DB_FILE) as conn:
            return conn.execute("SELECT * FROM alerts ORDER BY id").fetchall()


@pytest.fixture
async def rig(bus: Bus, tmp_path: Path) -> AsyncIterator[Rig]:
    fed = make_federation(clients=3)
    settings = Settings(
        data_dir=tmp_path,
        services=MappingProxyType(
            {
                "alerting": {
                    "dedup_window_s": 60,
                    "burst": 4,
                    "rate_per_s": 0.01,
                    "escalate_after": 3,
                }
            }
        ),
    )
    service = await build_service(
        "alerting", settings, bus=bus, identity=fed["alerting"], trust=fed.trust()
    )
    rig = Rig(bus, fed, service, tmp_path)
    sub = await bus.consume(QueueSpec("ops", bindings=((topology.ALERTS, "#"),)), rig.on_alert)
    await service.start()
    try:
        yield rig
    finally:
        await service.stop()
        await sub.cancel()


async def test_escalation_after_k_flagged_rounds_and_reset_by_a_kept_verdict(rig: Rig) -> None:
    for r in (1, 2, 3):
        await rig.send(rig.raised("client.flagged", client="client-001", round_=r, reason="krum"))
        if r == 2:
            continue  # same (job, kind, client, reason) inside the window: folded, not republished
        key, env = await rig.next()
        assert env.sender == "alerting" and env.body.client == "client-001"
        assert key == ("critical" if r == 3 else "warning") + ".client.flagged.j1", key
    assert "3 rounds in a row" in env.body.detail
    # a verdict that keeps the client ends its streak
    verdict = encode(
        "round.verdict",
        {"kept": ["client-001"], "flagged": []},
        rig.fed["detector"],
        job=JOB,
        round=4,
    )
    await rig.bus.publish(topology.EVENTS, f"round.verdict.{JOB}", verdict)
    await asyncio.wait_for(_until(lambda: rig.service.desk.streak(JOB, "client-001") == 0), 10)
    await rig.send(rig.raised("client.flagged", client="client-001", round_=5, reason="krum"))
    await asyncio.wait_for(_until(lambda: rig.service.desk.streak(JOB, "client-001") == 1), 10)
    await rig.quiet(0.3)
    rows = [(r["severity"], r["count"], r["escalated"]) for r in rig.rows()]
    assert rows == [("warning", 3, 0), ("critical", 1, 1)]


async def test_duplicates_fold_into_one_alert_and_redelivery_counts_once(rig: Rig) -> None:
    same = rig.raised("update.rejected", client="client-002", reason="NON_FINITE", sender="ingest")
    await rig.send(same)
    key, env = await rig.next()
    assert key == "warning.update.rejected.j1" and env.body.reason == "NON_FINITE"
    await rig.send(
        rig.raised("update.rejected", client="client-002", reason="NON_FINITE", sender="ingest")
    )
    await rig.send(same)  # the very same message again (a redelivery): not counted
    await rig.send(
        rig.raised("update.rejected", client="client-002", reason="REVOKED", sender="ingest")
    )
    key, env = await rig.next()
    assert env.body.reason == "REVOKED"
    await rig.quiet(0.3)
    rows = rig.rows()
    assert [(r["reason"], r["count"], r["published"]) for r in rows] == [
        ("NON_FINITE", 2, 1),
        ("REVOKED", 1, 1),
    ]


async def test_rate_limit_holds_back_a_flood_but_never_critical(rig: Rig) -> None:
    for i in range(6):
        await rig.send(rig.raised("update.rejected", client=None, reason=f"R{i}", sender="ingest"))
    got = [(await rig.next())[0] for _ in range(4)]
    assert got == ["warning.update.rejected.j1"] * 4
    await rig.send(
        rig.raised("round.aborted", reason="short", severity="critical", sender="aggregator")
    )
    key, _ = await rig.next()
    assert key == "critical.round.aborted.j1"
    await rig.quiet(0.3)
    actions = [r["action"] for r in rig.rows()]
    assert actions.count("rate_limited") == 2 and actions.count("publish") == 5


async def test_dead_letters_become_alerts_with_the_death_reason(rig: Rig) -> None:
    async def refuse(_: Delivery) -> Outcome:
        return Outcome.REJECT

    async def fail(_: Delivery) -> Outcome:
        return Outcome.RETRY

    subs = [
        await rig.bus.consume(
            QueueSpec("victim-reject", bindings=((topology.EVENTS, "victim.reject.*"),)), refuse
        ),
        await rig.bus.consume(
            QueueSpec(
                "victim-retry", bindings=((topology.EVENTS, "victim.retry.*"),), delivery_limit=2
            ),
            fail,
        ),
    ]
    try:
        await rig.bus.publish(topology.EVENTS, "victim.reject.j7", b"not an envelope")
        key, env = await rig.next()
        assert key == "warning.dead_letter.j7" and env.body.reason == "rejected"
        assert "victim-reject" in env.body.detail
        await rig.bus.publish(topology.EVENTS, "victim.retry.j7", b"poison")
        key, env = await rig.next()
        assert key == "critical.dead_letter.j7" and env.body.reason == "delivery_limit"
    finally:
        for s in subs:
            await s.cancel()


async def test_forged_alert_is_not_republished(rig: Rig) -> None:
    data = bytearray(rig.raised("client.flagged", client="client-001"))
    data[-3] ^= 0xFF
    await rig.send(bytes(data))
    # it is rejected (BAD_DIGEST) and reported as such, and dead-lettered; never republished
    got = dict([await rig.next(), await rig.next()])
    assert set(got) == {"warning.message.rejected.j1", "warning.dead_letter.j1"}
    assert got["warning.message.rejected.j1"].body.reason == "BAD_DIGEST"
    assert got["warning.dead_letter.j1"].body.reason == "rejected"
    await rig.quiet(0.3)
    assert all(r["kind"] != "client.flagged" for r in rig.rows())


async def _until(pred: Any) -> None:
    while not pred():
        await asyncio.sleep(0.01)


async def test_a_store_that_refuses_the_published_mark_sends_the_alert_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alert is stored, sent, then its "published" mark fails to commit (a full disk)
    four times: the message is held and retried, and each retry commits the mark without
    sending the alert again."""
    import sqlite3

    monkeypatch.setattr("qflare.runtime.service.STORAGE_RETRY_S", (0.01, 0.02))
    store = rig.service.store
    real = store.mark_published
    failures = {"left": 4}

    async def mark_published(alert_id: int) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        await real(alert_id)

    monkeypatch.setattr(store, "mark_published", mark_published)
    await rig.send(rig.raised("client.flagged", client="client-001", severity="critical"))
    for _ in range(300):
        if not failures["left"] and rig.rows() and rig.rows()[0]["published"]:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    sent = []
    while not rig.out.empty():
        sent.append(rig.out.get_nowait()[0])
    # one copy of the alert; alerting's own alert about its store comes beside it
    assert sent.count("critical.client.flagged.j1") == 1, sent
    assert failures["left"] == 0 and rig.rows()[0]["published"] == 1
