"""Storage faults hold, never drop: the stateful services' stores fail for a while mid-job
(every SQLite call raises "disk I/O error"), and the job still finishes with the quiet run's
result, one critical alert per service whose store failed, and nothing dead-lettered."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import pytest

from qflare.runtime.service import Service
from qflare.runtime.sqlite import Database
from qflare.sim.config import SimConfig
from qflare.sim.federation import Federation
from qflare.sim.report import comparable
from qflare.sim.services import run_services

FAILING = ("aggregator", "detector", "accountant")


def _failing(method: Callable[..., Any], broken: threading.Event) -> Callable[..., Any]:
    def wrapper(self: Database, *args: Any, **kwargs: Any) -> Any:
        if broken.is_set() and any(f"/{name}/" in str(self.path) for name in FAILING):
            raise sqlite3.OperationalError("disk I/O error")
        return method(self, *args, **kwargs)

    return wrapper


def test_a_store_that_fails_mid_job_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    config = SimConfig(clients=6, byzantine=1, rounds=4, attack="sign_flip", seed=3)
    quiet = run_services(config, Federation.build(config))

    broken = threading.Event()
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
        if record.round == 1:  # the disk goes away for 1.5 s while round 2 runs
            broken.set()
            threading.Timer(1.5, broken.clear).start()

    faulty = run_services(config, Federation.build(config), on_round=on_round)
    assert faulty.ended == quiet.ended == "completed"
    assert comparable(faulty.to_json()) == comparable(quiet.to_json())
    faults = [(name, sev) for name, kind, sev in alerts if kind == "storage.fault"]
    assert faults and all(sev == "critical" for _n, sev in faults)
    assert len(faults) == len({n for n, _s in faults}), f"one alert per service: {faults}"
    assert not [a for a in alerts if a[1] == "dead_letter"]
