"""Recent history from the services' SQLite files, so a console opened mid-job is not empty.

Read-only (``mode=ro`` URIs; WAL lets a reader in while the service writes), and tolerant:
a missing file, table or column means that part of the history is skipped, never an error,
because the console must start even against an older or partial deployment. Layout:
``<state_dir>/<service>/<service>.sqlite`` (``Settings.service_dir``).

* ``aggregator/aggregator.sqlite``: jobs (epsilon budget and rounds from the stored spec;
  the secret seed is never read out of it), rounds (state, participants, deadline,
  epsilon, verdict) and the updates held for open rounds;
* ``alerting/alerting.sqlite``: the latest published alerts.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from qflare.messages import Severity
from qflare.tui.events import (
    AlertRaised,
    FeedEvent,
    JobDeclared,
    JobEnded,
    MetricsEvaluated,
    RoundSnapshot,
)

MAX_ROUNDS_PER_JOB = 200
MAX_ALERTS = 500
#: aggregator round states -> the console's.
_ROUND_STATE = {
    "requested": "granted",
    "open": "open",
    "closed": "closed",
    "published": "published",
    "denied": "denied",
    "aborted": "ended",
}


@contextmanager
def _readonly(path: Path) -> Iterator[sqlite3.Connection | None]:
    if not path.is_file():
        yield None
        return
    conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=2.0)
    conn.row_factory = sqlite3.Row
    with closing(conn):
        yield conn


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _has(conn: sqlite3.Connection, table: str, *needed: str) -> bool:
    return set(needed) <= _columns(conn, table)


def load_history(state_dir: Path) -> list[FeedEvent]:
    """Events that rebuild recent rounds and alerts, oldest first."""
    events: list[FeedEvent] = []
    try:
        events += _aggregator(Path(state_dir) / "aggregator" / "aggregator.sqlite")
        events += _alerting(Path(state_dir) / "alerting" / "alerting.sqlite")
    except sqlite3.Error as exc:
        # A store being migrated or locked for too long: start with what the feed brings.
        events.append(
            AlertRaised(
                "-",
                0,
                0.0,
                severity=Severity.INFO,
                kind="console.history",
                reason="HISTORY_UNREADABLE",
                detail=str(exc),
                source="console",
            )
        )
    events.sort(key=lambda e: e.ts)
    return events


def _json(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _aggregator(path: Path) -> list[FeedEvent]:
    out: list[FeedEvent] = []
    with _readonly(path) as conn:
        if conn is None:
            return out
        rules: dict[str, str] = {}
        if _has(conn, "jobs", "job_id", "spec", "created"):
            for row in conn.execute("SELECT * FROM jobs"):
                spec = _json(row["spec"]) or {}
                dp = float(spec.get("noise_multiplier") or 0.0) > 0
                rules[row["job_id"]] = str(spec.get("rule", ""))
                out.append(
                    JobDeclared(
                        row["job_id"],
                        0,
                        float(row["created"]),
                        epsilon_budget=float(spec["epsilon_budget"])
                        if dp and "epsilon_budget" in spec
                        else None,
                        rounds=int(spec["rounds"]) if "rounds" in spec else None,
                    )
                )
        received: dict[tuple[str, int], list[str]] = {}
        if _has(conn, "updates", "job_id", "round", "client"):
            for row in conn.execute("SELECT job_id, round, client FROM updates"):
                received.setdefault((row["job_id"], row["round"]), []).append(row["client"])
        if not _has(conn, "rounds", "job_id", "round", "state", "participants", "updated"):
            return out
        cols = _columns(conn, "rounds")
        rows = conn.execute(
            "SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY job_id ORDER BY round DESC) "
            "AS n FROM rounds) WHERE n <= ? ORDER BY job_id, round",
            (MAX_ROUNDS_PER_JOB,),
        )
        for row in rows:
            job, rnd = row["job_id"], int(row["round"])
            verdict = _json(row["verdict"]) if "verdict" in cols else None
            closed = _json(row["closed_set"]) if "closed_set" in cols else None
            got = list(received.get((job, rnd), ()))
            if isinstance(closed, list):
                got += [c[0] for c in closed if isinstance(c, list) and c]
            out.append(
                RoundSnapshot(
                    job,
                    rnd,
                    float(row["updated"]),
                    state=_ROUND_STATE.get(str(row["state"]), "open"),
                    participants=tuple(_json(row["participants"]) or ()),
                    received=tuple(got),
                    kept=tuple(verdict["kept"])
                    if isinstance(verdict, dict) and "kept" in verdict
                    else None,
                    flagged=tuple(verdict.get("flagged", ())) if isinstance(verdict, dict) else (),
                    deadline=row["deadline"] if "deadline" in cols else None,
                    rule=rules.get(job, ""),
                    epsilon_total=row["epsilon"] if "epsilon" in cols else None,
                    model_version=int(row["base_version"]) if "base_version" in cols else None,
                    train=_stored_train(verdict),
                )
            )
            out += _stored_evaluations(job, rnd, float(row["updated"]), verdict)
        if _has(conn, "jobs", "ended", "end_reason"):
            for row in conn.execute(
                "SELECT j.job_id, j.end_reason, j.created, MAX(r.round) AS last, "
                "MAX(r.updated) AS at FROM jobs j LEFT JOIN rounds r ON r.job_id = j.job_id "
                "WHERE j.ended != 0 GROUP BY j.job_id"
            ):
                out.append(
                    JobEnded(
                        row["job_id"],
                        int(row["last"] or 0),
                        float(row["at"] or row["created"]),
                        reason=row["end_reason"] or "ended",
                    )
                )
    return out


def _stored_train(verdict: Any) -> dict[str, float]:
    """The round's weighted training metrics from its stored verdict (``metrics.train``)."""
    try:
        return {str(k): float(v) for k, v in verdict["metrics"]["train"]["metrics"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}


def _stored_evaluations(job: str, rnd: int, ts: float, verdict: Any) -> list[FeedEvent]:
    """The evaluations stored with a round, as the ``metrics.evaluated`` the aggregator
    published for them (participants' as ``federated``, evaluate_fn's as ``central``)."""
    out: list[FeedEvent] = []
    stored = verdict.get("metrics") if isinstance(verdict, dict) else None
    for source, key in (("federated", "evaluate"), ("central", "central")):
        try:
            part = stored[key]  # type: ignore[index]
            metrics = {str(k): float(v) for k, v in part.get("metrics", {}).items()}
            accuracy = metrics.get("accuracy")
            out.append(
                MetricsEvaluated(
                    job,
                    rnd,
                    ts,
                    model_version=int(part["model_version"]),
                    accuracy=accuracy if accuracy is not None and 0 <= accuracy <= 1 else None,
                    loss=float(part["loss"]),
                    source=source,
                    metrics=metrics,
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # not measured (or failed: an error, no loss)
    return out


def _alerting(path: Path) -> list[FeedEvent]:
    out: list[FeedEvent] = []
    with _readonly(path) as conn:
        needed = (
            "id",
            "job",
            "kind",
            "severity",
            "client",
            "round",
            "reason",
            "detail",
            "source",
            "last_ts",
        )
        if conn is None or not _has(conn, "alerts", *needed):
            return out
        where = "WHERE published != 0" if _has(conn, "alerts", "published") else ""
        count = ", count" if _has(conn, "alerts", "count") else ", 1 AS count"
        rows = conn.execute(
            f"SELECT {', '.join(needed)}{count} FROM alerts {where} ORDER BY id DESC LIMIT ?",
            (MAX_ALERTS,),
        ).fetchall()
        for row in reversed(rows):
            try:
                severity = Severity.parse(row["severity"])
            except ValueError:
                severity = Severity.WARNING
            times = f" (x{row['count']})" if row["count"] and row["count"] > 1 else ""
            out.append(
                AlertRaised(
                    row["job"],
                    int(row["round"] or 0),
                    float(row["last_ts"]),
                    severity=severity,
                    kind=row["kind"],
                    reason=row["reason"],
                    client=row["client"],
                    detail=f"{row['detail']}{times}",
                    source=row["source"],
                    key=f"alerting.sqlite:{row['id']}",
                )
            )
    return out
