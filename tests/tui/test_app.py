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
from textual.widgets import Input, Static

from qflare.bus import connect_bus
from qflare.tui import events as ev
from qflare.tui.app import AlertDetail, ConsoleApp
from qflare.tui.console import build_console
from qflare.tui.state import ConsoleState
from qflare.tui.table import RowTable

from .scenario import NOW, job_events
from .wire import Publisher, federation

SIZE = (160, 48)


def cells(table: RowTable, key: str) -> list[str]:
    return [c.plain for c in table.get_row(key)]


def keys(table: RowTable) -> list[str]:
    return table.keys


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
        await until(pilot, lambda: "j:1" in keys(app.query_one("#rounds", RowTable)))
        rounds = app.query_one("#rounds", RowTable)
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
        clients = app.query_one("#clients", RowTable)
        alerts = app.query_one("#alerts", RowTable)
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
        alerts = app.query_one("#alerts", RowTable)
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
        alerts = app.query_one("#alerts", RowTable)
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
        await until(pilot, lambda: "feed paused (1 waiting)" in banner(app))
        assert app.query_one("#rounds", RowTable).row_count == 0
        await pilot.press("p")
        await until(pilot, lambda: app.query_one("#rounds", RowTable).row_count == 1)
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


async def test_panels_stay_current_while_a_dialog_is_open_and_after() -> None:
    """Rounds keep arriving while the operator reads an alert: the rounds panel shows the
    newest rounds behind the dialog and after it closes (it used to show old rows: its
    cursor stuck to the first round it was on and scrolled the panel after it)."""
    app = static_app()
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one("#rounds", RowTable)
        await pilot.press("d")
        assert isinstance(app.screen, AlertDetail)
        t = NOW
        for r in range(5, 45):  # far more rounds than the panel has lines
            t += 1
            participants = tuple(f"client-{i:03d}" for i in range(8))
            app.ingest([ev.RoundOpened("mnist-1", r, t, participants=participants)])
            app.ingest([ev.UpdateAccepted("mnist-1", r, t + 0.1, client="client-000")])
            await pilot.pause(0.02)
        await until(pilot, lambda: keys(table)[0] == "mnist-1:44")
        assert isinstance(app.screen, AlertDetail)  # still open
        assert table.scroll_y == 0
        assert table.render_line(1).text.split()[:4] == ["mnist-1", "44", "collecting", "1/8"]
        assert "44/10" in text(app, "#current")

        await pilot.press("escape")
        assert not isinstance(app.screen, AlertDetail)
        app.ingest([ev.RoundOpened("mnist-1", 45, t + 1, participants=("client-000",))])
        await until(pilot, lambda: keys(table)[0] == "mnist-1:45")
        assert table.scroll_y == 0
        assert table.render_line(1).text.split()[:3] == ["mnist-1", "45", "open"]


async def test_a_frame_draws_only_what_changed() -> None:
    app = static_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        tables = {name: app.query_one(f"#{name}", RowTable) for name in ("rounds", "clients")}
        tables["alerts"] = app.query_one("#alerts", RowTable)
        before = {name: t.lines_rendered for name, t in tables.items()}
        app.redraw()  # nothing changed
        await pilot.pause()
        assert {name: t.lines_rendered for name, t in tables.items()} == before

        # one update: one line of the rounds panel and one of the clients panel
        app.ingest([ev.UpdateAccepted("mnist-1", 4, NOW, client="client-004")])
        await until(pilot, lambda: tables["rounds"].lines_rendered > before["rounds"])
        await pilot.pause(0.2)
        assert tables["rounds"].lines_rendered == before["rounds"] + 1
        assert tables["clients"].lines_rendered == before["clients"] + 1
        assert tables["alerts"].lines_rendered == before["alerts"]
        assert cells(tables["rounds"], "mnist-1:4")[3] == "5/8"


async def test_frames_are_throttled_while_events_keep_coming() -> None:
    from qflare.tui.app import MIN_FRAME_S

    app = static_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        frames = app.frames
        started = time.monotonic()
        while time.monotonic() - started < 2.0:  # 2 s of events, 100 a second
            app.ingest([ev.UpdateAccepted("mnist-1", 4, NOW, client="client-004")])
            await pilot.pause(0.01)
        drawn = app.frames - frames
        assert 1 <= drawn <= 2.0 / MIN_FRAME_S + 2
        # a lone event after a quiet spell gets a frame of its own
        await pilot.pause(MIN_FRAME_S + 0.1)
        app.ingest([ev.RoundOpened("mnist-1", 9, NOW, participants=("client-000",))])
        await until(pilot, lambda: "mnist-1:9" in keys(app.query_one("#rounds", RowTable)))
        assert app.frames > frames + drawn


async def test_quitting_the_console_leaves_the_job_it_watches_running(monkeypatch) -> None:
    """`q` in `qflare simulate --tui`: the job's future must not be cancelled (it was:
    the console's watcher awaited it directly and was cancelled on exit)."""
    import qflare.tui.console as console

    bus = await connect_bus(f"memory://{uuid.uuid4().hex}")
    apps: list[ConsoleApp] = []
    build = console.build_console

    def capture(**kwargs):  # type: ignore[no-untyped-def]
        apps.append(build(**kwargs))
        return apps[-1]

    monkeypatch.setattr(console, "build_console", capture)
    job: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def press_q() -> None:
        while not (apps and apps[0].is_running):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await apps[0].action_quit()

    quitter = asyncio.create_task(press_q())
    try:
        await asyncio.wait_for(
            console.run_console_in_process(bus, exit_when=job, headless=True), timeout=20
        )
        await quitter
        assert not job.done(), "quitting the console ended the job"
        job.set_result(None)  # the job goes on and ends by itself
    finally:
        await bus.close()
