"""The operator console: a Textual app over :class:`~qflare.tui.state.ConsoleState`.

Layout lives in ``console.tcss``; the text of every panel comes from the pure ``make_*``
helpers in :mod:`qflare.tui.render`; all broker and file access runs in Textual workers
(``@work(exclusive=True)``), the shape of Textual's ``examples/dictionary.py``. Events from
the feed are applied to the state as they arrive; the screen is redrawn from the state
at most 50 ms after a burst of events begins (and four times a second for the clocks), so
what happens on the bus is on screen well within a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.coordinate import Coordinate
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Static
from textual.widgets.data_table import RowDoesNotExist

from qflare.messages import Severity
from qflare.tui import render
from qflare.tui.events import Event
from qflare.tui.feed import Feed
from qflare.tui.state import AlertFilter, ConsoleState, parse_filter

REFRESH_S = 0.25
COALESCE_S = 0.05
MAX_ALERT_ROWS = 500
MAX_ROUND_ROWS = 200
SEVERITY_CYCLE = (Severity.INFO, Severity.WARNING, Severity.CRITICAL)


class AlertDetail(ModalScreen[None]):
    """One alert in full; ``a`` acknowledges it."""

    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape,q,enter", "dismiss", "close"),
        Binding("a", "ack", "acknowledge"),
    ]

    def __init__(self, seq: int) -> None:
        super().__init__()
        self.seq = seq

    def compose(self) -> ComposeResult:
        with Vertical(id="detail-box"):
            yield Static(id="detail-body")
            yield Static("[b]a[/b] acknowledge   [b]esc[/b] close", id="detail-help")

    def on_mount(self) -> None:
        self._show()

    def _show(self) -> None:
        app = self.app
        assert isinstance(app, ConsoleApp)
        alert = app.state.alert(self.seq)
        body = self.query_one("#detail-body", Static)
        body.update(render.make_alert_detail(alert) if alert else "this alert has left the log")

    def action_ack(self) -> None:
        app = self.app
        assert isinstance(app, ConsoleApp)
        app.state.acknowledge(self.seq)
        self._show()

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)


class ConsoleApp(App[None]):
    """``qflare tui``. Pass a :class:`Feed` factory for live data, ``history`` for events
    to show first, and ``clock`` to fix time (snapshots)."""

    CSS_PATH = "console.tcss"
    TITLE = "QFLARE operator console"
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("p", "toggle_pause", "pause/resume feed"),
        Binding("f", "filter", "filter alerts"),
        Binding("s", "cycle_severity", "min severity"),
        Binding("a", "acknowledge", "acknowledge alert"),
        Binding("d", "details", "alert details"),
        Binding("escape", "clear_filter", "clear filter", show=False),
        Binding("q", "quit", "quit"),
    ]

    def __init__(
        self,
        *,
        state: ConsoleState | None = None,
        feed: Callable[[Callable[[Sequence[Event]], None]], Feed] | None = None,
        history: Callable[[], Iterable[Event]] | None = None,
        clock: Callable[[], float] = time.time,
        source: str = "",
    ) -> None:
        super().__init__()
        self.clock = clock
        self.state = state or ConsoleState(now=clock())
        self.state.tick(clock())
        self.alert_filter = AlertFilter()
        self.source = source
        self._make_feed = feed
        self._history = history
        self.feed: Feed | None = None
        self._drawn_version = -1
        self._drawn_filter: AlertFilter | None = None
        self._clients_drawn_at = -1.0
        self._redraw_pending = False

    # ---- layout --------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static(id="banner")
        with Horizontal(id="top"):
            yield Static(id="current", classes="panel")
            with Vertical(id="side"):
                yield Static(id="privacy", classes="panel")
                yield Static(id="accuracy", classes="panel")
        with Horizontal(id="middle"):
            yield DataTable(id="rounds", classes="panel", cursor_type="row", zebra_stripes=True)
            yield DataTable(id="clients", classes="panel", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="alerts", classes="panel", cursor_type="row", zebra_stripes=True)
        yield Input(
            placeholder="filter: sev:warning kind:client.flagged client:client-003 words",
            id="filter",
        )
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#current").border_title = "current round"
        self.query_one("#privacy").border_title = "privacy budget (ε)"
        self.query_one("#accuracy").border_title = "accuracy"
        self.query_one("#rounds").border_title = "rounds"
        self.query_one("#clients").border_title = "clients"
        self.query_one("#rounds", DataTable).add_columns(*render.ROUND_COLUMNS)
        self.query_one("#clients", DataTable).add_columns(*render.CLIENT_COLUMNS)
        self.query_one("#alerts", DataTable).add_columns(*render.ALERT_COLUMNS)
        self.query_one("#filter", Input).display = False
        self.query_one("#alerts", DataTable).focus()
        self.redraw(force=True)
        self.set_interval(REFRESH_S, self._on_timer)
        if self._make_feed is not None or self._history is not None:
            self.run_feed()

    # ---- data in -------------------------------------------------------------------
    def ingest(self, events: Sequence[Event]) -> None:
        """Apply events from the feed (on the event loop) and redraw soon: one redraw per
        burst, at most ``COALESCE_S`` after the first event of it."""
        for event in events:
            self.state.apply(event)
        if not self._redraw_pending and self.is_running:
            self._redraw_pending = True
            # Bus handlers run in tasks the bus started (outside the app's context), so
            # the timer is set from the app's own message loop.
            self.post_message(self.Changed())

    class Changed(Message):
        """The state changed outside the app's message loop."""

    def on_console_app_changed(self, message: Changed) -> None:
        self.set_timer(COALESCE_S, self._redraw_now)

    def _redraw_now(self) -> None:
        self._redraw_pending = False
        self.state.now = self.clock()
        self.redraw()

    @work(exclusive=True, group="feed")
    async def run_feed(self) -> None:
        """History first (read in a thread), then the live feed until the app stops."""
        if self._history is not None:
            loader = self._history
            events = await asyncio.to_thread(lambda: list(loader()))
            self.ingest(events)
        if self._make_feed is not None:
            self.feed = self._make_feed(self.ingest)
            if not self.source:
                self.source = self.feed.source
            await self.feed.run()

    def _on_timer(self) -> None:
        self.state.now = self.clock()
        self.redraw()

    # ---- drawing -------------------------------------------------------------------
    def redraw(self, force: bool = False) -> None:
        state = self.state
        try:
            banner = self.query_one("#banner", Static)
        except NoMatches:
            # a redraw timer that fires while the console closes (or before it is composed):
            # there is nothing to draw on
            return
        banner.update(render.make_link_banner(state, self.source))
        self.query_one("#current", Static).update(render.make_round_panel(state))
        changed = force or state.version != self._drawn_version
        if changed:
            self.query_one("#privacy", Static).update(render.make_privacy_panel(state))
            self.query_one("#accuracy", Static).update(render.make_accuracy_panel(state))
            self._draw_rounds()
        if changed or self.alert_filter != self._drawn_filter:
            self._draw_alerts()
        # "last seen" ages with the clock: redraw clients at least once a second.
        if changed or state.now - self._clients_drawn_at >= 1.0:
            self._draw_clients()
        self._drawn_version = state.version

    def _draw_rounds(self) -> None:
        table = self.query_one("#rounds", DataTable)
        rows = self.state.round_rows()[:MAX_ROUND_ROWS]
        _replace_rows(table, [(f"{r.job}:{r.round}", render.make_round_cells(r)) for r in rows])

    def _draw_clients(self) -> None:
        table = self.query_one("#clients", DataTable)
        now = self.state.now
        clients = render.client_order(list(self.state.clients.values()))
        _replace_rows(table, [(c.client, render.make_client_cells(c, now)) for c in clients])
        self._clients_drawn_at = now

    def _draw_alerts(self) -> None:
        table = self.query_one("#alerts", DataTable)
        visible = self.state.visible_alerts(self.alert_filter)
        _replace_rows(
            table, [(str(a.seq), render.make_alert_cells(a)) for a in visible[:MAX_ALERT_ROWS]]
        )
        table.border_title = (
            f"alerts [{len(visible)}/{len(self.state.alerts)}] "
            f"filter: {self.alert_filter.describe()}"
        )
        self._drawn_filter = self.alert_filter

    # ---- actions -------------------------------------------------------------------
    def selected_alert(self) -> int | None:
        table = self.query_one("#alerts", DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key.value
        return int(key) if key is not None else None

    def action_toggle_pause(self) -> None:
        if self.state.paused:
            self.state.resume()
            self.notify("feed resumed")
        else:
            self.state.pause()
            self.notify("feed paused: new events wait until you resume (p)")
        self.redraw()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    @on(Input.Submitted, "#filter")
    def apply_filter(self, message: Input.Submitted) -> None:
        try:
            self.set_filter(parse_filter(message.value))
        except ValueError as exc:
            self.notify(str(exc), severity="error")
            return
        message.input.display = False
        self.query_one("#alerts", DataTable).focus()

    def set_filter(self, flt: AlertFilter) -> None:
        self.alert_filter = flt
        self.redraw()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        if box.display:
            box.display = False
            self.query_one("#alerts", DataTable).focus()
            return
        box.value = ""
        self.set_filter(AlertFilter())

    def action_cycle_severity(self) -> None:
        current = self.alert_filter.min_severity
        nxt = SEVERITY_CYCLE[(SEVERITY_CYCLE.index(current) + 1) % len(SEVERITY_CYCLE)]
        f = self.alert_filter
        self.set_filter(AlertFilter(nxt, f.kind, f.client, f.job, f.text))

    def action_acknowledge(self) -> None:
        seq = self.selected_alert()
        if seq is not None and self.state.acknowledge(seq):
            self.redraw()

    def action_details(self) -> None:
        seq = self.selected_alert()
        if seq is not None:
            self.push_screen(AlertDetail(seq))

    @on(DataTable.RowSelected, "#alerts")
    def _alert_chosen(self, message: DataTable.RowSelected) -> None:
        self.action_details()

    async def action_quit(self) -> None:
        if self.feed is not None:
            await self.feed.close()
        self.exit()


def _replace_rows(table: DataTable[Any], rows: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Redraw a table's rows, keeping the cursor on the same key when it is still there."""
    selected = None
    if table.row_count:
        selected = table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key.value
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    if selected is not None:
        try:
            table.move_cursor(row=table.get_row_index(selected), animate=False)
        except RowDoesNotExist:
            table.move_cursor(row=0, animate=False)  # it left the table: back to the newest
