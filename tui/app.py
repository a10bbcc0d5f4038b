"""The operator console: a Textual app over :class:`~qflare.tui.state.ConsoleState`.

Layout lives in ``console.tcss``; the text of every panel comes from the pure ``make_*``
helpers in :mod:`qflare.tui.render`; all broker and file access runs in Textual workers
(``@work(exclusive=True)``), the shape of Textual's ``examples/dictionary.py``.

Events from the feed are applied to the state as they arrive; the screen follows in
frames: the first event of a burst schedules one ``COALESCE_S`` later (at most one frame
per ``MIN_FRAME_S``), and a clock frame runs when none has for ``CLOCK_S`` (countdowns and
ages). A
frame redraws only what changed: a panel whose text is the same is not touched, a table is
rebuilt only when the state says one of its rows changed (``rounds_rev`` and the rows'
``rev``), and :class:`~qflare.tui.table.RowTable` renders only the rows whose cells
differ. In ``qflare simulate --tui`` the console shares the event loop with the services it
watches, so what it draws is paid for by the job (benchmarks/console.py measures it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, TypeVar

from rich.console import RenderableType
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Static

from qflare.messages import Severity
from qflare.tui import render
from qflare.tui.events import Event, LinkChanged
from qflare.tui.feed import Feed
from qflare.tui.state import AlertFilter, ConsoleState, parse_filter
from qflare.tui.table import RowTable

#: A frame this long after the first event of a burst ...
COALESCE_S = 0.05
#: ... but at most one frame per MIN_FRAME_S while events keep coming: each frame costs the
#: event loop (shared with the job in `qflare simulate --tui`) ~10 ms (benchmarks/console.py).
MIN_FRAME_S = 1.0
#: Countdowns, ages and the reconnecting timer move on their own: a frame at least this
#: often (checked four times per period).
CLOCK_S = 1.0
MAX_ALERT_ROWS = 500
MAX_ROUND_ROWS = 200
SEVERITY_CYCLE = (Severity.INFO, Severity.WARNING, Severity.CRITICAL)

RowCells = tuple[render.Cell, ...]
T = TypeVar("T")
_UNDRAWN = object()


def fingerprint(value: object) -> object:
    """A comparable stand-in for panel content (``Text.__eq__`` ignores the base style)."""
    if isinstance(value, Text):
        return (value.plain, str(value.style), tuple(value.spans))
    if isinstance(value, (list, tuple)):
        return tuple(fingerprint(v) for v in value)
    return value


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
        app.redraw()  # the ✓ in the log behind the dialog

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
        self._redraw_pending = False
        self._urgent = False
        self._last_frame = 0.0  # any frame (the clock frames skip after one)
        self._last_event_frame = 0.0  # frames for events (what MIN_FRAME_S spaces out)
        self.frames = 0
        # what is on screen: panel fingerprints, the state revisions each table was drawn
        # at, and each table's cells per row key with the row's rev they were made from
        self._shown: dict[str, object] = {}
        self._drawn: dict[str, object] = {}
        self._cells: dict[str, dict[str, tuple[object, RowCells]]] = {
            "rounds": {},
            "clients": {},
            "alerts": {},
        }

    # ---- layout --------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static(id="banner")
        with Horizontal(id="top"):
            yield Static(id="current", classes="panel")
            with Vertical(id="side"):
                yield Static(id="privacy", classes="panel")
                yield Static(id="accuracy", classes="panel")  # accuracy and round metrics
        with Horizontal(id="middle"):
            yield RowTable(render.ROUND_COLUMNS, id="rounds", classes="panel")
            yield RowTable(render.CLIENT_COLUMNS, id="clients", classes="panel")
        yield RowTable(render.ALERT_COLUMNS, cursor=True, id="alerts", classes="panel")
        yield Input(
            placeholder="filter: sev:warning kind:client.flagged client:client-003 words",
            id="filter",
        )
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#current").border_title = "current round"
        self.query_one("#privacy").border_title = "privacy budget (ε)"
        self.query_one("#accuracy").border_title = "metrics"
        self.query_one("#rounds").border_title = "rounds"
        self.query_one("#clients").border_title = "clients"
        self.query_one("#filter", Input).display = False
        self.query_one("#alerts", RowTable).focus()
        self.redraw(force=True)
        self.set_interval(CLOCK_S / 4, self._on_timer)
        if self._make_feed is not None or self._history is not None:
            self.run_feed()

    # ---- data in -------------------------------------------------------------------
    def ingest(self, events: Sequence[Event]) -> None:
        """Apply events from the feed (on the event loop) and ask for a frame: one per
        burst, ``COALESCE_S`` after its first event, at most one per ``MIN_FRAME_S``; a
        change of the broker link is shown after ``COALESCE_S`` whatever the throttle."""
        urgent = False
        for event in events:
            self.state.apply(event)
            urgent = urgent or isinstance(event, LinkChanged)
        if not self.is_running or (self._redraw_pending and (self._urgent or not urgent)):
            return  # a frame is on its way (soon enough)
        self._redraw_pending = True
        self._urgent = self._urgent or urgent
        # Bus handlers run in tasks the bus started (outside the app's context), so the
        # timer is set from the app's own message loop.
        self.post_message(self.Changed(urgent))

    class Changed(Message):
        """The state changed outside the app's message loop."""

        def __init__(self, urgent: bool = False) -> None:
            super().__init__()
            self.urgent = urgent

    def on_console_app_changed(self, message: Changed) -> None:
        wait = COALESCE_S
        if not message.urgent:
            wait = max(wait, self._last_event_frame + MIN_FRAME_S - time.monotonic())
        self.set_timer(wait, self._redraw_now)

    def _redraw_now(self) -> None:
        if not self._redraw_pending:
            return  # an earlier (urgent) frame drew it already
        if not self._urgent:  # a link change (rare) does not hold back the next events
            self._last_event_frame = time.monotonic()
        self._redraw_pending = self._urgent = False
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
        if time.monotonic() - self._last_frame < CLOCK_S:
            return  # a frame was drawn lately (for events): the clocks moved with it
        self.state.now = self.clock()
        self.redraw()

    # ---- drawing -------------------------------------------------------------------
    def redraw(self, force: bool = False) -> None:
        """One frame: whatever differs from what is on screen (everything with ``force``)."""
        state = self.state
        try:
            self.query_one("#banner", Static)
        except NoMatches:
            # a frame timer that fires while the console closes (or before it is composed):
            # there is nothing to draw on
            return
        if force:
            self._shown.clear()
            self._drawn.clear()
        self._last_frame = time.monotonic()
        self.frames += 1
        banner = render.make_link_banner(state, self.source)
        self._show("#banner", banner, lambda: banner)
        rows = render.make_round_panel_rows(state)
        self._show("#current", rows, lambda: render.make_round_table(rows))
        privacy = render.make_privacy_lines(state)
        self._show("#privacy", privacy, lambda: render.make_lines(privacy, "no jobs yet"))
        accuracy = render.make_accuracy_lines(state)
        self._show(
            "#accuracy",
            accuracy,
            lambda: render.make_lines(accuracy, "no evaluation metrics published yet"),
        )
        self._draw_rounds()
        self._draw_clients()
        self._draw_alerts()

    def _show(self, selector: str, content: object, build: Callable[[], RenderableType]) -> None:
        """Update a panel only when its content differs from what it shows."""
        key = fingerprint(content)
        if self._shown.get(selector, _UNDRAWN) == key:
            return
        self._shown[selector] = key
        self.query_one(selector, Static).update(build(), layout=False)

    def _unchanged(self, table: str, revision: object) -> bool:
        if self._drawn.get(table, _UNDRAWN) == revision:
            return True
        self._drawn[table] = revision
        return False

    def _rows(
        self,
        table: str,
        items: Iterable[tuple[str, object, T]],
        make: Callable[[T], RowCells],
    ) -> list[tuple[str, RowCells]]:
        """(key, cells) for ``items`` of (key, rev, row): a row's cells are made again only
        when its rev differs from the last frame's."""
        cache = self._cells[table]
        rows = []
        for key, rev, row in items:
            hit = cache.get(key)
            if hit is None or hit[0] != rev:
                hit = cache[key] = (rev, make(row))
            rows.append((key, hit[1]))
        if len(cache) > len(rows):
            keep = {key for key, _ in rows}
            for key in [k for k in cache if k not in keep]:
                del cache[key]
        return rows

    def _draw_rounds(self) -> None:
        if self._unchanged("rounds", self.state.rounds_rev):
            return
        rows = self.state.round_rows()[:MAX_ROUND_ROWS]
        items = ((f"{r.job}:{r.round}", r.rev, r) for r in rows)
        cells = self._rows("rounds", items, render.make_round_cells)
        self.query_one("#rounds", RowTable).set_rows(cells)

    def _draw_clients(self) -> None:
        state = self.state
        now = state.now
        # "last seen" ages with the clock, in whole seconds
        if self._unchanged("clients", (state.clients_rev, round(now))):
            return
        clients = render.client_order(list(state.clients.values()))
        items = ((c.client, (c.rev, render.format_age(c.last_seen, now)), c) for c in clients)
        cells = self._rows("clients", items, lambda c: render.make_client_cells(c, now))
        self.query_one("#clients", RowTable).set_rows(cells)

    def _draw_alerts(self) -> None:
        state = self.state
        if self._unchanged("alerts", (state.alerts_rev, self.alert_filter)):
            return
        table = self.query_one("#alerts", RowTable)
        visible = state.visible_alerts(self.alert_filter)
        items = ((str(a.seq), a.rev, a) for a in visible[:MAX_ALERT_ROWS])
        table.set_rows(self._rows("alerts", items, render.make_alert_cells))
        title = (
            f"alerts [{len(visible)}/{len(state.alerts)}] filter: {self.alert_filter.describe()}"
        )
        if table.border_title != title:
            table.border_title = title

    # ---- actions -------------------------------------------------------------------
    def selected_alert(self) -> int | None:
        key = self.query_one("#alerts", RowTable).cursor_key
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
        self.query_one("#alerts", RowTable).focus()

    def set_filter(self, flt: AlertFilter) -> None:
        self.alert_filter = flt
        self.redraw()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        if box.display:
            box.display = False
            self.query_one("#alerts", RowTable).focus()
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

    @on(RowTable.RowSelected, "#alerts")
    def _alert_chosen(self, message: RowTable.RowSelected) -> None:
        self.action_details()

    async def action_quit(self) -> None:
        if self.feed is not None:
            await self.feed.close()
        self.exit()
