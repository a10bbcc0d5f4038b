"""Snapshots of the console (pytest-textual-snapshot): fixed events and a fixed clock, so
the screen is the same on every run. Update after an intended change with
``pytest tests/tui/test_snapshots.py --snapshot-update`` and review the SVGs."""

from __future__ import annotations

from qflare.tui import events as ev
from qflare.tui.app import ConsoleApp
from qflare.tui.state import ConsoleState

from .scenario import NOW, job_events

SIZE = (160, 48)


def make_app(link: ev.Link = ev.Link.CONNECTED, since: float = NOW - 60) -> ConsoleApp:
    state = ConsoleState(now=NOW)
    state.apply(
        ev.LinkChanged(link, since, "" if link is ev.Link.CONNECTED else "broker connection lost")
    )
    state.apply_all(job_events())
    state.apply_all(job_events(rounds=1, job="cifar-2", t0=NOW - 20))
    return ConsoleApp(state=state, clock=lambda: NOW, source="amqp://127.0.0.1:5672")


def test_main_screen(snap_compare) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE)


def test_main_screen_reconnecting_and_filtered(snap_compare) -> None:
    async def run_before(pilot) -> None:
        await pilot.press("s", "s")  # critical alerts only
        await pilot.pause()

    app = make_app(ev.Link.RECONNECTING, since=NOW - 7)
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_alert_detail(snap_compare) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE, press=["down", "a", "d"])
