"""History on start, read from SQLite files written by the services' own stores."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from qflare.messages import Severity
from qflare.messages.jobs import JobSpec
from qflare.services.aggregator.core import RoundState
from qflare.services.aggregator.store import AggregatorStore
from qflare.services.alerting.core import Action, Alert, Decision
from qflare.services.alerting.store import AlertStore
from qflare.tui.app import ConsoleApp
from qflare.tui.history import load_history
from qflare.tui.state import ConsoleState
from qflare.tui.table import RowTable

from .test_app import SIZE, cells, keys

CLIENTS = ("client-000", "client-001", "client-002")
DIGEST = b"\x01" * 32


async def write_state(root: Path) -> float:
    now = time.time()
    agg = await AggregatorStore.open(root / "aggregator")
    try:
        spec = JobSpec(
            job_id="j",
            rounds=5,
            participants=CLIENTS,
            rule="median",
            noise_multiplier=1.0,
            epsilon_budget=4.0,
            seed=1234567,
        )
        model = {"w": np.zeros(2, np.float32)}
        await agg.add_job(spec, model, DIGEST)
        await agg.request_round("j", 1, 0)
        await agg.transition(
            "j",
            1,
            RoundState.REQUESTED,
            RoundState.OPEN,
            participants=CLIENTS,
            deadline=now + 60,
            epsilon=0.5,
        )
        for i, c in enumerate(CLIENTS):
            await agg.add_update("j", 1, c, bytes([i]) * 32, i, 10)
        await agg.transition(
            "j",
            1,
            RoundState.OPEN,
            RoundState.CLOSED,
            closed_set=[(c, bytes([i]) * 32, i) for i, c in enumerate(CLIENTS)],
        )
        await agg.publish_model(
            "j", 1, 1, model, DIGEST, 0.5, {"kept": list(CLIENTS[:2]), "flagged": ["client-002"]}
        )
        await agg.request_round("j", 2, 1)
        await agg.transition(
            "j",
            2,
            RoundState.REQUESTED,
            RoundState.OPEN,
            participants=CLIENTS,
            deadline=now + 90,
            epsilon=0.9,
        )
        await agg.add_update("j", 2, "client-000", DIGEST, 20, 10)
    finally:
        await agg.close()
    alerts = await AlertStore.open(root / "alerting")
    try:
        flagged = Alert(
            job="j",
            kind="client.flagged",
            severity=Severity.WARNING,
            reason="FLAGGED",
            detail="norm outlier",
            client="client-002",
            round=1,
            source="detector",
            ts=now,
        )
        alert_id = await alerts.record("m1", Decision(Action.PUBLISH, flagged), now)
        await alerts.mark_published(alert_id)
        held = Alert(
            job="j",
            kind="update.rejected",
            severity=Severity.INFO,
            reason="STALE_ROUND",
            client="client-001",
            round=1,
            source="ingest",
            ts=now,
        )
        await alerts.record("m2", Decision(Action.RATE_LIMITED, held), now)
    finally:
        await alerts.close()
    return now


async def test_history_rebuilds_rounds_alerts_clients_and_budget(tmp_path: Path) -> None:
    now = await write_state(tmp_path)
    state = ConsoleState(now=now)
    state.apply_all(load_history(tmp_path))
    done, current = state.rounds[("j", 1)], state.rounds[("j", 2)]
    assert (done.state, done.kept, done.flagged, len(done.received)) == (
        "published",
        2,
        ("client-002",),
        3,
    )
    assert (current.state, len(current.received), current.expected) == ("open", 1, 3)
    assert current.deadline == pytest.approx(now + 90) and current.rule == "median"
    view = state.jobs["j"]
    assert (view.epsilon_budget, view.epsilon_spent, view.rounds_planned) == (4.0, 0.9, 5)
    assert [(a.kind, a.client, a.source) for a in state.alerts] == [
        ("client.flagged", "client-002", "detector")
    ]
    assert state.clients["client-002"].rounds_flagged == 1


async def test_console_opened_mid_job_shows_history(tmp_path: Path) -> None:
    await write_state(tmp_path)
    app = ConsoleApp(history=lambda: load_history(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        rounds = app.query_one("#rounds", RowTable)
        for _ in range(100):
            if rounds.row_count == 2:
                break
            await pilot.pause(0.05)
        assert keys(rounds) == ["j:2", "j:1"]
        assert cells(rounds, "j:1")[2:6] == ["published", "3/3", "2", "1"]
        assert app.query_one("#alerts", RowTable).row_count == 1


def test_missing_or_foreign_state_is_skipped(tmp_path: Path) -> None:
    assert load_history(tmp_path) == []
    (tmp_path / "alerting").mkdir()
    with sqlite3.connect(tmp_path / "alerting" / "alerting.sqlite") as conn:
        conn.execute("CREATE TABLE alerts (id INTEGER, note TEXT)")  # another schema
    assert load_history(tmp_path) == []


def test_history_never_writes(tmp_path: Path) -> None:
    (tmp_path / "aggregator").mkdir()
    path = tmp_path / "aggregator" / "aggregator.sqlite"
    sqlite3.connect(path).close()
    path.chmod(0o444)
    before = path.read_bytes()
    assert load_history(tmp_path) == []
    assert path.read_bytes() == before
