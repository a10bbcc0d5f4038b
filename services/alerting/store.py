"""Alert history in SQLite (one file per alerting deployment; WAL lets ``qflare alerts`` read
while the service writes).

``alerts`` holds one row per published alert, or per alert held back by the rate limit; a
duplicate inside the dedup window raises the ``count`` of the row it repeats instead of
adding one. ``messages`` makes handling idempotent on the delivered message (its envelope
nonce, or a hash of a dead letter): a redelivered message is neither counted nor published
twice, and one whose publish failed is published on redelivery. ``streaks`` keeps the
escalation state across restarts.
"""

from __future__ import annotations

from dataclasses import dataclass

from qflare.messages.bodies import Severity
from qflare.runtime.sqlite import ServiceStore
from qflare.services.alerting.core import Action, Alert, Decision

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    client TEXT,
    round INTEGER,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    source TEXT NOT NULL,
    first_ts REAL NOT NULL,
    last_ts REAL NOT NULL,
    count INTEGER NOT NULL DEFAULT 1,
    action TEXT NOT NULL,
    escalated INTEGER NOT NULL DEFAULT 0,
    published INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS alerts_key ON alerts (job, kind, client, reason, severity, id);
CREATE TABLE IF NOT EXISTS messages (
    message_id TEXT PRIMARY KEY,
    alert_id INTEGER NOT NULL,
    needs_publish INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS streaks (
    job TEXT NOT NULL,
    client TEXT NOT NULL,
    length INTEGER NOT NULL,
    last_round INTEGER,
    PRIMARY KEY (job, client)
);
"""

DB_FILE = "alerting.sqlite"


@dataclass(frozen=True)
class Seen:
    alert_id: int
    needs_publish: bool
    published: bool


class AlertStore(ServiceStore):
    FILE = DB_FILE
    SCHEMA = SCHEMA

    async def seen(self, message_id: str) -> Seen | None:
        row = await self.db.fetchone(
            "SELECT m.alert_id, m.needs_publish, a.published FROM messages m "
            "JOIN alerts a ON a.id = m.alert_id WHERE m.message_id = ?",
            (message_id,),
        )
        if row is None:
            return None
        return Seen(int(row[0]), bool(row[1]), bool(row[2]))

    async def record(self, message_id: str, decision: Decision, now: float) -> int:
        """Store the decided alert (a new row, or a count on the row it duplicates) and
        the message that carried it, in one transaction; returns the alert row id."""
        a = decision.alert
        async with self.db.transaction() as conn:
            alert_id: int | None = None
            if decision.action is Action.DUPLICATE:
                async with conn.execute(
                    "SELECT id FROM alerts WHERE job=? AND kind=? AND IFNULL(client,'')=? "
                    "AND reason=? AND severity=? AND source=? ORDER BY id DESC LIMIT 1",
                    (a.job, a.kind, a.client or "", a.reason, a.severity.label, a.source),
                ) as cur:
                    row = await cur.fetchone()
                if row is not None:
                    alert_id = int(row[0])
                    await conn.execute(
                        "UPDATE alerts SET count = count + 1, last_ts = ? WHERE id = ?",
                        (now, alert_id),
                    )
            if alert_id is None:
                cur = await conn.execute(
                    "INSERT INTO alerts (job, kind, severity, client, round, reason, detail, source, "
                    "first_ts, last_ts, count, action, escalated, published) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,1,?,?,0)",
                    (
                        a.job,
                        a.kind,
                        a.severity.label,
                        a.client,
                        a.round,
                        a.reason,
                        a.detail,
                        a.source,
                        now,
                        now,
                        decision.action.value,
                        int(decision.escalated),
                    ),
                )
                assert cur.lastrowid is not None
                alert_id = int(cur.lastrowid)
            await conn.execute(
                "INSERT INTO messages (message_id, alert_id, needs_publish) VALUES (?,?,?)",
                (message_id, alert_id, int(decision.publish)),
            )
            if a.kind and a.client and decision.streak:
                await conn.execute(
                    "INSERT INTO streaks (job, client, length, last_round) VALUES (?,?,?,?) "
                    "ON CONFLICT(job, client) DO UPDATE SET length=excluded.length, "
                    "last_round=excluded.last_round",
                    (a.job, a.client, decision.streak, a.round),
                )
        return alert_id

    async def mark_published(self, alert_id: int) -> None:
        await self.db.execute("UPDATE alerts SET published = 1 WHERE id = ?", (alert_id,))

    async def alert(self, alert_id: int) -> Alert:
        row = await self.db.fetchone("SELECT * FROM alerts WHERE id = ?", (alert_id,))
        assert row is not None
        return Alert(
            job=row["job"],
            kind=row["kind"],
            severity=Severity.parse(row["severity"]),
            reason=row["reason"],
            detail=row["detail"],
            client=row["client"],
            round=row["round"],
            source=row["source"],
            ts=row["first_ts"],
        )

    async def reset_streaks(self, job: str, clients: list[str]) -> None:
        if not clients:
            return
        async with self.db.transaction() as conn:
            await conn.executemany(
                "DELETE FROM streaks WHERE job = ? AND client = ?", [(job, c) for c in clients]
            )

    async def streaks(self) -> list[tuple[str, str, int, int | None]]:
        rows = await self.db.fetchall("SELECT job, client, length, last_round FROM streaks")
        return [(r[0], r[1], int(r[2]), r[3]) for r in rows]
