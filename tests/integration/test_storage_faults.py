"""Storage faults hold, never drop: the stateful services' stores fail for a while mid-job
(every SQLite call raises "disk I/O error"), and the job still finishes with the quiet run's
result, one critical alert per service whose store failed, and nothing dead-lettered.

In process, on the embedded bus, with the failure injected into the SQLite helper: quick,
and every stateful service at once (ingest keeps nothing on disk). The same over RabbitMQ
with real full disks (a tmpfs per service, filled for QFLARE_STORAGE_FAULT_S seconds, 60
for the full check) is tests/e2e/test_disk_faults.py."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from qflare.runtime.service import Service
from qflare.runtime.sqlite import Database
from qflare.sim.config import SimConfig
from qflare.sim.federation import Federation
from qflare.sim.report import comparable
from qflare.sim.services import run_services

#: Seconds each store fails from the end of round 1: long enough to cover a write of each
#: service (each waits for the one before: the aggregator, then alerting with its alert,
#: the detector when round 2 closes, the accountant when round 3 is charged).
FAILING: dict[str, float] = {"aggregator": 1.5, "alerting": 1.5, "detector": 3.0, "accountant": 5.0}


def _failing(method: Callable[..., Any], broken: dict[str, threading.Event]) -> Callable[..., Any]:
    def wrapper(self: Database, *args: Any, **kwargs: Any) -> Any:
        if any(f"/{name}/" in str(self.path) and down.is_set() for name, down in broken.items()):
            raise sqlite3.OperationalError("disk I/O error")
        return method(self, *args, **kwargs)

    return wrapper


def test_a_store_that_fails_mid_job_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # with DP on, so the accountant keeps a ledger (every round charged before it opens)
    config = SimConfig(
        clients=6, byzantine=1, rounds=4, attack="sign_flip", seed=3, noise_multiplier=1.0
    )
    quiet = run_services(config, Federation.build(config))

    broken = {name: threading.Event() for name in FAILING}
    for name in ("transaction", "execute", "fetchone", "fetchall"):
        monkeypatch.setattr(Database, name, _failing(getattr(Database, name), broken))
    monkeypatch.setattr("qflare.runtime.service.STORAGE_RETRY_S", (0.05, 0.2))
    alerts: list[tuple[str, str, str]] = []
    alert = Service.alert

    async def spy(self: Service, **kw: Any) -> None:
        alerts.append((self.name, kw["kind"], kw["severity"]))
        await alert(self, **kw)

    monkeypatch.setattr(Service, "alert", spy)

    def on_round(record: Any) -> None:
        if record.round == 1:  # the stores go away while round 2 runs
            for name, seconds in FAILING.items():
                broken[name].set()
                threading.Timer(seconds, broken[name].clear).start()

    faulty = run_services(config, Federation.build(config), on_round=on_round)
    assert faulty.ended == quiet.ended == "completed"
    assert comparable(faulty.to_json()) == comparable(quiet.to_json())
    faults = [(name, sev) for name, kind, sev in alerts if kind == "storage.fault"]
    assert faults and all(sev == "critical" for _n, sev in faults)
    assert Counter(n for n, _s in faults) == dict.fromkeys(FAILING, 1), faults
    assert not [a for a in alerts if a[1] == "dead_letter"]
