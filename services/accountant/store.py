"""The accountant's durable ledger: one SQLite file (the shared helper
:class:`qflare.runtime.sqlite.Database`: WAL, ``synchronous=FULL``, explicit transactions,
timed as ``qflare_store_seconds{service="accountant"}``), one row per decision.

``record`` commits before it returns, so the shell acks a request only after its decision
is durable; the primary key (job, round) makes a second insert of the same round fail
instead of charging twice. ``load`` returns what :meth:`AccountantCore.restore` needs.
Floats are stored as SQLite REAL (IEEE double), so they come back bit-identical.
"""

from __future__ import annotations

from pathlib import Path

from qflare.privacy import BudgetPolicy, Decision
from qflare.runtime.sqlite import Database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    job TEXT NOT NULL REFERENCES jobs(job),
    round INTEGER NOT NULL,
    q REAL NOT NULL,
    z REAL NOT NULL,
    clip REAL NOT NULL,
    granted INTEGER NOT NULL,
    reason TEXT,
    epsilon_total REAL NOT NULL,
    epsilon_requested REAL NOT NULL,
    epsilon_rdp REAL NOT NULL,
    epsilon_before REAL NOT NULL,
    rounds_granted INTEGER NOT NULL,
    PRIMARY KEY (job, round)
);
"""

_COLUMNS = (
    "job",
    "round",
    "q",
    "z",
    "clip",
    "granted",
    "reason",
    "epsilon_total",
    "epsilon_requested",
    "epsilon_rdp",
    "epsilon_before",
    "rounds_granted",
)


class LedgerStore:
    """``store = await LedgerStore.open(path)``; ``await store.close()``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: str | Path) -> LedgerStore:
        return cls(await Database.open(path, _SCHEMA, name="accountant"))

    async def close(self) -> None:
        await self._db.close()

    async def record(self, decision: Decision) -> None:
        """Persist a fresh decision (and its job's budget on the job's first decision) in
        one transaction."""
        async with self._db.transaction() as conn:
            await conn.execute(
                "INSERT OR IGNORE INTO jobs (job, epsilon, delta) VALUES (?, ?, ?)",
                (decision.job, decision.budget_epsilon, decision.delta),
            )
            await conn.execute(
                f"INSERT INTO decisions ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                (
                    decision.job,
                    decision.round,
                    decision.q,
                    decision.z,
                    decision.clip,
                    int(decision.granted),
                    decision.reason,
                    decision.epsilon_total,
                    decision.epsilon_requested,
                    decision.epsilon_rdp,
                    decision.epsilon_before,
                    decision.rounds_granted,
                ),
            )

    async def load(self) -> tuple[dict[str, BudgetPolicy], list[Decision]]:
        """Every job's budget and every decision, ready for ``AccountantCore.restore``."""
        jobs: dict[str, BudgetPolicy] = {}
        for job, eps, delta in await self._db.fetchall("SELECT job, epsilon, delta FROM jobs"):
            jobs[job] = BudgetPolicy(epsilon=eps, delta=delta)
        decisions: list[Decision] = []
        rows = await self._db.fetchall(
            f"SELECT {', '.join(_COLUMNS)} FROM decisions ORDER BY job, round"
        )
        for row in rows:
            values = dict(zip(_COLUMNS, tuple(row), strict=True))
            policy = jobs[values["job"]]
            decisions.append(
                Decision(
                    job=values["job"],
                    round=values["round"],
                    q=values["q"],
                    z=values["z"],
                    clip=values["clip"],
                    granted=bool(values["granted"]),
                    reason=values["reason"],
                    epsilon_total=values["epsilon_total"],
                    epsilon_requested=values["epsilon_requested"],
                    epsilon_rdp=values["epsilon_rdp"],
                    epsilon_before=values["epsilon_before"],
                    budget_epsilon=policy.epsilon,
                    delta=policy.delta,
                    rounds_granted=values["rounds_granted"],
                    fresh=False,
                )
            )
        return jobs, decisions
