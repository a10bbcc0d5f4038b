"""The detector's durable state: the closed rounds it still has to judge (with each
update's digest and offset in the job's update stream), its verdicts, and each job's
reputation.

The updates themselves stay in the update stream (docs/architecture.md, "The data plane"):
the detector reads them ahead while a round collects and, for whatever it does not hold when
a round closes (a restart), again at the offsets ``round.closed`` lists. A verdict, the
reputation after it and the removal of the pending round commit in one transaction, so a
redelivered ``round.closed`` never counts a client's flag twice; a verdict not yet known to
be published is published again at start. A round becomes pending only while it has no
verdict (one statement, so a copy of ``round.closed`` that checked before the verdict
committed cannot re-insert it after).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, cast

from qflare.messages.jobs import JobSpec
from qflare.robust import Reputation
from qflare.runtime import ServiceStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    job_id TEXT NOT NULL, round INTEGER NOT NULL, closed_set TEXT NOT NULL,
    malformed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS verdicts (
    job_id TEXT NOT NULL, round INTEGER NOT NULL, verdict TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0, decided REAL NOT NULL,
    PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS reputation (
    job_id TEXT PRIMARY KEY, state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, spec TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ended (
    job_id TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS clients (
    job_id TEXT NOT NULL, client TEXT NOT NULL, score REAL NOT NULL, offences INTEGER NOT NULL,
    last_round INTEGER NOT NULL, quarantined_until INTEGER NOT NULL,
    PRIMARY KEY (job_id, client)
)
"""


#: An update of a closed round: client, digest (vouched by the aggregator) and stream offset.
PendingRef = tuple[str, bytes, int]


@dataclass(frozen=True)
class Pending:
    """A closed round waiting for its verdict: ``round.closed``'s updates and its count of
    clients refused for a malformed update."""

    job_id: str
    round: int
    refs: list[PendingRef]
    malformed: int = 0


class DetectorStore(ServiceStore):
    FILE = "detector.sqlite"
    SCHEMA = SCHEMA

    async def add_job(self, spec: JobSpec) -> None:
        """Remember a job submitted at run time (not in the configuration), without its
        secret seed (the detector does not use it), so a restart still knows its f and
        detection settings for the rounds it has pending."""
        await self.db.execute(
            "INSERT OR IGNORE INTO jobs VALUES (?, ?)",
            (spec.job_id, json.dumps(spec.public(), default=str)),
        )

    async def end_job(self, job_id: str) -> None:
        """Remember that the job ended (``job.ended``): a restart reads nothing of it ahead."""
        await self.db.execute("INSERT OR IGNORE INTO ended VALUES (?)", (job_id,))

    async def ended(self) -> set[str]:
        rows = await self.db.fetchall("SELECT job_id FROM ended")
        return {row["job_id"] for row in rows}

    async def jobs(self) -> list[JobSpec]:
        rows = await self.db.fetchall("SELECT spec FROM jobs ORDER BY job_id")
        return [JobSpec.model_validate(json.loads(row["spec"])) for row in rows]

    async def decided(self, job_id: str, round_no: int) -> bool:
        return (
            await self.db.fetchone(
                "SELECT 1 FROM verdicts WHERE job_id=? AND round=?", (job_id, round_no)
            )
            is not None
        )

    async def add_pending(self, p: Pending) -> None:
        """Store the closed round as waiting for its verdict, unless it has one already
        (checked in the same statement: see the module docstring)."""
        closed_set = json.dumps([[c, d.hex(), o] for c, d, o in p.refs])
        await self.db.execute(
            "INSERT OR IGNORE INTO pending SELECT ?, ?, ?, ? "
            "WHERE NOT EXISTS (SELECT 1 FROM verdicts WHERE job_id=? AND round=?)",
            (p.job_id, p.round, closed_set, p.malformed, p.job_id, p.round),
        )

    async def discard_pending(self, job_id: str, round_no: int) -> None:
        """Forget a pending round that has its verdict (a row a detector before this check
        could leave behind)."""
        await self.db.execute("DELETE FROM pending WHERE job_id=? AND round=?", (job_id, round_no))

    async def pending(self, job_id: str | None = None) -> list[Pending]:
        sql, args = "SELECT * FROM pending", cast(tuple[str, ...], ())
        if job_id is not None:
            sql, args = sql + " WHERE job_id=?", (job_id,)
        rows = await self.db.fetchall(sql, args)
        return [
            Pending(
                r["job_id"],
                r["round"],
                [(c, bytes.fromhex(d), o) for c, d, o in json.loads(r["closed_set"])],
                r["malformed"],
            )
            for r in rows
        ]

    async def last_decided(self) -> dict[str, int]:
        """The latest round with a verdict, per job."""
        rows = await self.db.fetchall(
            "SELECT job_id, MAX(round) AS r FROM verdicts GROUP BY job_id"
        )
        return {row["job_id"]: int(row["r"]) for row in rows}

    async def verdict(self, job_id: str, round_no: int) -> dict[str, Any] | None:
        row = await self.db.fetchone(
            "SELECT verdict FROM verdicts WHERE job_id=? AND round=?", (job_id, round_no)
        )
        return None if row is None else json.loads(row["verdict"])

    async def unpublished(self) -> list[tuple[str, int, dict[str, Any]]]:
        rows = await self.db.fetchall("SELECT * FROM verdicts WHERE published=0 ORDER BY decided")
        return [(r["job_id"], r["round"], json.loads(r["verdict"])) for r in rows]

    async def mark_published(self, job_id: str, round_no: int) -> None:
        await self.db.execute(
            "UPDATE verdicts SET published=1 WHERE job_id=? AND round=?", (job_id, round_no)
        )

    async def reputation(self, job_id: str, default: Reputation) -> Reputation:
        row = await self.db.fetchone("SELECT state FROM reputation WHERE job_id=?", (job_id,))
        return default if row is None else Reputation.from_dict(json.loads(row["state"]))

    async def record_verdict(
        self, job_id: str, round_no: int, verdict: dict[str, Any], reputation: Reputation
    ) -> bool:
        """Verdict + reputation + pending removal, atomically; False if already decided."""
        state = reputation.to_dict()
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "INSERT OR IGNORE INTO verdicts (job_id, round, verdict, decided) VALUES (?, ?, ?, ?)",
                (job_id, round_no, json.dumps(verdict), time.time()),
            )
            if cur.rowcount != 1:
                await conn.execute(
                    "DELETE FROM pending WHERE job_id=? AND round=?", (job_id, round_no)
                )
                return False
            await conn.execute(
                "INSERT INTO reputation VALUES (?, ?) ON CONFLICT(job_id) DO UPDATE SET state=excluded.state",
                (job_id, json.dumps(state)),
            )
            for client, rec in state["clients"].items():
                await conn.execute(
                    "INSERT INTO clients VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(job_id, client) DO UPDATE SET "
                    "score=excluded.score, offences=excluded.offences, last_round=excluded.last_round, "
                    "quarantined_until=excluded.quarantined_until",
                    (
                        job_id,
                        client,
                        rec["score"],
                        rec["offences"],
                        rec["last_round"],
                        rec["quarantined_until"],
                    ),
                )
            await conn.execute("DELETE FROM pending WHERE job_id=? AND round=?", (job_id, round_no))
        return True
