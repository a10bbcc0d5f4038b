"""The console app driven by a pilot: live signed events on a real in-memory bus appear
in the right panels; filters, acknowledgement, details and pause work; an unreachable
broker shows a reconnecting state."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import Callable

import pytest
from rich.console import Console
from textual.widgets import DataTable, Input, Static

from qflare.bus import connect_bus
from qflare.tui import events as ev
from qflare.tui.app import AlertDetail, ConsoleApp
from qflare.tui.console import build_console
from qflare.tui.state import ConsoleState

from .scenario import NOW, job_events
from .wire import Publisher, federation

SIZE = (160, 48)


def cells(table: DataTable, key: str) -> list[str]:
    return [str(getattr(c, "plain", c)) for c in table.get_row(key)]


def keys(table: DataTable) -> list[str]:
    return [str(k.value) for k in table.rows]


def text(app, selector: str) -> str:
    """What a Static panel shows, as plain text."""
    console = Console(width=160, record=True, color_system=None, file=io.StringIO())
    console.print(app.query_one(selector, Static).content)
    return console.export_text()


def banner(app: ConsoleApp) -> str:
    return text(app, "#banner")


async def until(pilot, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)


@pytest.fixture
def fed():
    return federation(8)


async def test_live_signed_events_appear_in_the_right_panels(fed) -> None:
    bus = await connect_bus(f"memory://{uuid.uuid4().hex}")
    app = build_console(
        bus=bus, trust=fed.trust(), jobs=[ev.JobDeclared("j", 0, 0.0, epsilon_budget=2.0)]
    )
    pub = Publisher(bus, fed, "j")
    t = time.time()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "● connected" in banner(app))
        assert "in-process bus" in banner(app)
        participants = [f"client-{i:03d}" for i in range(4)]
        await pub.event(
            "privacy.granted",
            1,
            t,
            epsilon_round=0.5,
            epsilon_total=0.5,
            delta=1e-5,
            coverage="noise_only",
        )
        await pub.round_opened(1, t, participants, deadline=t + 60)
        for c in participants[:3]:
            await pub.accepted(1, t + 0.5, c)
        await until(pilot, lambda: "j:1" in keys(app.query_one("#rounds", DataTable)))
        rounds = app.query_one("#rounds", DataTable)
        await until(pilot, lambda: cells(rounds, "j:1")[3] == "3/4")
        assert cells(rounds, "j:1")[:4] == ["j", "1", "collecting", "3/4"]
        current = text(app, "#current")
        assert "collecting" in current and "3/4" in current
        assert "0.50/2.00 ε (25%)" in text(app, "#privacy")
        assert "not a DP guarantee" in text(app, "#privacy")

        await pub.verdict(1, t + 1, kept=participants[:2], flagged=["client-002"])
        await pub.alert(
            1,
            t + 1.1,
            severity="warning",
            kind="client.flagged",
            reason="FLAGGED",
            client="client-002",
            detail="krum score 9.0",
        )
        clients = app.query_one("#clients", DataTable)
        alerts = app.query_one("#alerts", DataTable)
        await until(pilot, lambda: alerts.row_count == 1)
        await until(pilot, lambda: cells(clients, "client-002")[2] == "1")
        assert keys(clients)[0] == "client-002"  # most suspicious on top
        assert cells(clients, "client-002")[1] == "0.00"
        assert cells(alerts, keys(alerts)[0])[1:6] == [
            "warning",
            "client.flagged",
            "j",
            "client-002",
            "FLAGGED",
        ]
        assert cells(rounds, "j:1")[4:6] == ["2", "1"]

        await pub.event(
            "model.published",
            1,
            t + 2,
            version=1,
            digest=b"\0" * 32,
            epsilon=0.5,
            metrics={"accuracy": 0.6},
        )
        await until(pilot, lambda: cells(rounds, "j:1")[2] == "published")
        assert cells(rounds, "j:1")[8] == "2.00s"  # opened t -> published t+2
        await until(pilot, lambda: "60.0% (v1)" in text(app, "#accuracy"))
        await pilot.press("q")
    assert app.state.link is ev.Link.CLOSED
    await bus.close()


def static_app() -> ConsoleApp:
    state = ConsoleState(now=NOW)
    state.apply(ev.LinkChanged(ev.Link.CONNECTED, NOW - 60))
    state.apply_all(job_events())
    return ConsoleApp(state=state, clock=lambda: NOW, source="test")


async def test_filter_bar_severity_cycle_and_clear() -> None:
    app = static_app()
    async with app.run_test(size=SIZE) as pilot:
        alerts = app.query_one("#alerts", DataTable)
        assert alerts.row_count == 7
        await pilot.press("f")
        box = app.query_one("#filter", Input)
        assert box.display and box.has_focus
        box.value = "client:client-00"
        await pilot.press("6", "enter")  # typed and submitted
        assert not box.display
        assert alerts.row_count == 3
        assert {cells(alerts, k)[4] for k in keys(alerts)} == {"client-006"}
        assert "filter: client:client-006" in str(alerts.border_title)
        await pilot.press("s")  # warning and up
        assert alerts.row_count == 3
        await pilot.press("s")  # critical only
        assert alerts.row_count == 1 and cells(alerts, keys(alerts)[0])[1] == "critical"
        await pilot.press("escape")  # clear everything
        assert alerts.row_count == 7
        await pilot.press("f")
        box.value = "kind:update.rejected"
        await pilot.press("enter")
        assert [cells(alerts, k)[5] for k in keys(alerts)] == ["REVOKED"]
        await pilot.press("f")
        box.value = "colour:red"
        await pilot.press("enter")  # a bad query keeps the old filter and the bar open
        assert alerts.row_count == 1 and box.display


async def test_a_redraw_while_the_console_closes_draws_nothing_and_does_not_raise() -> None:
    """A coalesced redraw timer (set when events arrive) can fire after the widgets are gone:
    history loaded just as the console closes once took the app down with NoMatches."""
    app = static_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
    app.ingest([])  # nothing pending: the app no longer runs, so no timer is set
    app._redraw_now()  # what the timer would run
    app.redraw(force=True)


async def test_acknowledge_and_detail_view() -> None:
    app = static_app()
    async with app.run_test(size=SIZE) as pilot:
        alerts = app.query_one("#alerts", DataTable)
        await pilot.press("down")  # second newest: a critical flag of client-006
        seq = app.selected_alert()
        assert seq is not None and app.state.alert(seq).client == "client-006"
        before = app.state.unacknowledged
        await pilot.press("a")
        assert app.state.alert(seq).acknowledged and app.state.unacknowledged == before - 1
        assert cells(alerts, str(seq))[6] == "✓"
        await pilot.press("d")
        assert isinstance(app.screen, AlertDetail)
        detail = text(app.screen, "#detail-body")
        assert "krum score above threshold in round 3" in detail and "acknowledged  yes" in detail
        await pilot.press("escape")
        assert not isinstance(app.screen, AlertDetail)
        await pilot.press("enter")  # selecting a row opens its details too
        assert isinstance(app.screen, AlertDetail)


async def test_pause_holds_the_feed_until_resumed(fed) -> None:
    bus = await connect_bus(f"memory://{uuid.uuid4().hex}")
    app = build_console(bus=bus, trust=fed.trust())
    pub = Publisher(bus, fed, "j")
    t = time.time()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state.link is ev.Link.CONNECTED)
        await pilot.press("p")
        await pub.round_opened(1, t, ["client-000"], deadline=t + 30)
        await until(pilot, lambda: len(app.state.pending) == 1)
        await pilot.pause(0.3)
        assert app.query_one("#rounds", DataTable).row_count == 0
        assert "feed paused (1 waiting)" in banner(app)
        await pilot.press("p")
        await until(pilot, lambda: app.query_one("#rounds", DataTable).row_count == 1)
    await bus.close()


async def test_unreachable_broker_shows_reconnecting() -> None:
    # Nothing listens on port 9: a real connection refusal, retried until it comes up.
    app = build_console(url="amqp://guest:guest@127.0.0.1:9/")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state.link is ev.Link.RECONNECTING, timeout=10)
        await pilot.pause(0.3)
        shown = banner(app)
        assert "reconnecting for" in shown and "UNAVAILABLE" in shown
        assert "amqp://127.0.0.1:9" in shown and "guest" not in shown
        await pilot.press("q")


async def test_run_console_in_process_shares_the_bus_and_keeps_logs_off_the_screen(
    fed, tmp_path
) -> None:
    import logging
    import sys

    from qflare.tui.console import run_console_in_process

    bus = await connect_bus(f"memory://{uuid.uuid4().hex}")
    pub = Publisher(bus, fed, "j")
    handler = logging.StreamHandler(sys.stderr)
    logger = logging.getLogger("qflare.test.tui")
    logger.addHandler(handler)
    done = asyncio.Event()
    log_file = tmp_path / "services.log"

    async def simulation() -> None:
        t = time.time()
        await asyncio.sleep(0.5)
        await pub.round_opened(1, t, ["client-000"], deadline=t + 30)
        logger.warning("service line while the console runs")
        await asyncio.sleep(0.5)
        done.set()

    try:
        sim = asyncio.create_task(simulation())
        app = await asyncio.wait_for(
            run_console_in_process(
                bus,
                trust=fed.trust(),
                jobs=[ev.JobDeclared("j", 0, 0.0, epsilon_budget=3.0)],
                log_file=log_file,
                exit_when=done.wait(),
                headless=True,
            ),
            timeout=20,
        )
        await sim
        assert app.state.rounds[("j", 1)].state == "open"
        assert app.state.jobs["j"].epsilon_budget == 3.0
        assert app.state.link is ev.Link.CLOSED
        assert "service line while the console runs" in log_file.read_text()
        assert handler.stream is sys.stderr  # restored afterwards
    finally:
        logger.removeHandler(handler)
        await bus.close()
