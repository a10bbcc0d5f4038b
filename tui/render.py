"""Pure rendering helpers: state in, rich renderables / table cells out.

Every ``make_*`` function depends only on its arguments (times come from the state's
``now``, never a clock), so each panel's text is unit-tested and the snapshot of the
whole screen is deterministic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from qflare.messages import Severity
from qflare.tui.events import Link
from qflare.tui.state import AlertRow, ClientRow, ConsoleState, RoundRow

SEVERITY_STYLE: dict[Severity, str] = {
    Severity.INFO: "cyan",
    Severity.WARNING: "yellow",
    Severity.CRITICAL: "bold white on red",
}
STATE_STYLE: dict[str, str] = {
    "granted": "dim",
    "open": "cyan",
    "collecting": "bold cyan",
    "closed": "yellow",
    "verdict": "magenta",
    "published": "green",
    "denied": "bold red",
    "ended": "red",
}
LINK_STYLE: dict[Link, str] = {
    Link.CONNECTING: "bold yellow",
    Link.CONNECTED: "bold green",
    Link.RECONNECTING: "bold white on dark_red",
    Link.CLOSED: "bold red",
}
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
DASH = "–"
#: A table cell: a ``str`` is shown literally (never parsed as markup).
Cell = str | Text


def format_clock(ts: float | None) -> str:
    """HH:MM:SS in UTC (operators of a federation rarely share a time zone)."""
    if ts is None:
        return DASH
    return time.strftime("%H:%M:%S", time.gmtime(ts))


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_countdown(deadline: float | None, now: float) -> str:
    """Time left until ``deadline``; ``overdue 3s`` once it has passed."""
    if deadline is None:
        return DASH
    left = deadline - now
    if left >= 0:
        return format_duration(left)
    return f"overdue {format_duration(-left)}"


def format_age(ts: float | None, now: float) -> str:
    if ts is None:
        return DASH
    return f"{format_duration(now - ts)} ago"


def format_epsilon(value: float | None) -> str:
    if value is None:
        return DASH
    return "∞" if math.isinf(value) else f"{value:.3f}"


def make_link_banner(state: ConsoleState, source: str = "") -> Text:
    """The header line: broker link, feed pause, unacknowledged alerts."""
    text = Text()
    link = state.link
    if link is Link.CONNECTED:
        text.append(" ● connected ", LINK_STYLE[link])
    elif link is Link.RECONNECTING:
        text.append(
            f" ⟳ reconnecting for {format_duration(state.now - state.link_since)} ",
            LINK_STYLE[link],
        )
    else:
        text.append(f" {link.value} ", LINK_STYLE[link])
    if source:
        text.append(f" {source}", "dim")
    if state.link_detail and link is not Link.CONNECTED:
        text.append(f"  {state.link_detail}", "dim")
    if state.paused:
        text.append(f"   ⏸ feed paused ({len(state.pending)} waiting)", "bold yellow")
    unacked = state.unacknowledged
    if unacked:
        text.append(f"   ⚠ {unacked} unacknowledged", "bold yellow")
    text.append(f"   {state.events_seen} events", "dim")
    return text


def make_updates_cell(row: RoundRow) -> str:
    expected = row.expected or DASH
    return f"{len(row.received)}/{expected}"


ROUND_PANEL_COLUMNS = ("job", "round", "state", "updates", "deadline", "model")


def make_round_panel(state: ConsoleState) -> RenderableType:
    """The current round of each job: state, updates received/expected, deadline."""
    return make_round_table(make_round_panel_rows(state))


def make_round_table(rows: Sequence[tuple[Cell, ...]]) -> RenderableType:
    """The current-round panel from :func:`make_round_panel_rows`."""
    if not rows:
        return Text("waiting for round events…", style="dim")
    table = Table(expand=True, box=None, pad_edge=False, header_style="bold")
    for name in ROUND_PANEL_COLUMNS:
        table.add_column(name, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def make_round_panel_rows(state: ConsoleState) -> list[tuple[Cell, ...]]:
    """The current-round panel's lines, one per job (comparable: redraw when they differ)."""
    rows: list[tuple[Cell, ...]] = []
    for job in sorted(state.jobs):
        view = state.jobs[job]
        row = state.current_round(job)
        if row is None:
            rows.append((job, DASH, Text("no round yet", "dim"), DASH, DASH, DASH))
            continue
        status = Text(row.state, STATE_STYLE.get(row.state, ""))
        if view.ended:
            status = Text(f"ended: {view.ended}", "red" if view.denied else "green")
        countdown = (
            format_countdown(row.deadline, state.now)
            if row.state in ("open", "collecting")
            else DASH
        )
        total = f"/{view.rounds_planned}" if view.rounds_planned else ""
        rows.append(
            (
                job,
                f"{row.round}{total}",
                status,
                make_updates_cell(row),
                countdown,
                DASH if view.model_version is None else f"v{view.model_version}",
            )
        )
    return rows


def make_round_cells(row: RoundRow) -> tuple[Cell, ...]:
    """One line of the rounds table."""
    flagged = Text(str(len(row.flagged)), "bold red" if row.flagged else "")
    latency = DASH if row.latency is None else f"{row.latency:.2f}s"
    return (
        row.job,
        str(row.round),
        Text(row.state, STATE_STYLE.get(row.state, "")),
        make_updates_cell(row),
        DASH if row.kept is None else str(row.kept),
        flagged,
        row.rule or DASH,
        format_epsilon(row.epsilon_total),
        latency,
    )


ROUND_COLUMNS = ("job", "round", "state", "upd", "kept", "flagged", "rule", "ε", "latency")
#: The parts of a round's weighted metrics the metrics panel shows: training (the kept
#: updates', weighted by samples), the participants' evaluation of the round's base model,
#: and the central evaluation of its model; two values each (accuracy and loss first).
METRIC_PARTS = (("train", "train"), ("federated", "eval"), ("central", "central"))


def make_metrics_summary(metrics: dict[str, dict[str, float]], per_part: int = 2) -> str:
    """``train loss 0.412 · eval acc 85.0% loss 0.5 · central acc 87.0%`` (empty: none)."""
    parts = []
    for key, label in METRIC_PARTS:
        values = metrics.get(key)
        if values:
            first = sorted(values, key=lambda n: (n not in ("accuracy", "loss"), n))[:per_part]
            parts.append(" ".join([label, *(format_metric(n, values[n]) for n in first)]))
    return " · ".join(parts)


def format_metric(name: str, value: float) -> str:
    if name == "accuracy" and 0.0 <= value <= 1.0:
        return f"acc {100 * value:.1f}%"
    return f"{name} {value:.3g}"


def make_alert_cells(alert: AlertRow) -> tuple[Cell, ...]:
    style = SEVERITY_STYLE[alert.severity]
    ack = "✓" if alert.acknowledged else ""
    return (
        format_clock(alert.ts),
        Text(alert.severity.label, style),
        Text(alert.kind, style if alert.severity >= Severity.CRITICAL else ""),
        alert.job,
        alert.client or DASH,
        _clip(alert.reason, 24),
        ack,
        _clip(alert.detail, 70),
    )


ALERT_COLUMNS = ("time", "severity", "kind", "job", "client", "reason", "ack", "detail")


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def make_client_cells(client: ClientRow, now: float) -> tuple[Cell, ...]:
    rep = client.reputation
    if rep is None:
        rep_cell = Text(DASH)
    else:
        rep_cell = Text(
            f"{rep:.2f}", "green" if rep >= 0.9 else "yellow" if rep >= 0.5 else "bold red"
        )
    flags = Text(str(client.rounds_flagged), "bold red" if client.rounds_flagged else "")
    revoked = Text("REVOKED", "bold white on red") if client.revoked else Text("")
    return (
        client.client,
        rep_cell,
        flags,
        revoked,
        format_age(client.last_seen, now),
        DASH if client.last_flag_round is None else str(client.last_flag_round),
        str(client.updates),
        str(client.rejected),
    )


CLIENT_COLUMNS = ("client", "rep", "flags", "revoked", "last seen", "flag rnd", "upd", "rej")


def client_order(clients: Sequence[ClientRow]) -> list[ClientRow]:
    """Most suspicious first: revoked, then most flagged, then by name."""
    return sorted(clients, key=lambda c: (not c.revoked, -c.rounds_flagged, -c.rejected, c.client))


COVERAGE_MARKS = {
    "clipped_sum": ("DP", "green"),
    "filter_bounded": ("DP, filter ≤ k", "green"),
    "noise_only": ("noise only: not a DP guarantee", "bold yellow"),
}


def make_budget_gauge(
    spent: float, budget: float | None, width: int = 20, coverage: str | None = None
) -> Text:
    """``[██████░░░░] 1.23/4.00 ε (31%) DP``; red past 90% of the budget. ``coverage`` (from
    the accountant's answers, docs/privacy.md) is marked after the gauge: ``noise_only``
    says the ε is that of the noise added, not a DP guarantee."""
    text = _gauge(spent, budget, width)
    mark = COVERAGE_MARKS.get(coverage or "")
    if mark is not None and not math.isinf(spent):
        text.append(f" [{mark[0]}]", mark[1])
    return text


def _gauge(spent: float, budget: float | None, width: int) -> Text:
    if math.isinf(spent):
        return Text("DP off: models released without a privacy guarantee (ε = ∞)", "yellow")
    if budget is None or budget <= 0:
        return Text(f"ε {spent:.3f} spent (budget unknown)", "dim" if spent == 0 else "")
    frac = min(1.0, max(0.0, spent / budget))
    filled = round(frac * width)
    style = "green" if frac < 0.7 else "yellow" if frac < 0.9 else "bold red"
    text = Text("[")
    text.append("█" * filled, style)
    text.append("░" * (width - filled), "dim")
    text.append(f"] {spent:.2f}/{budget:.2f} ε ({100 * spent / budget:.0f}%)")
    return text


def make_sparkline(
    values: Sequence[float], width: int = 30, lo: float = 0.0, hi: float = 1.0
) -> str:
    """The last ``width`` values as block characters scaled over [lo, hi]."""
    if not values or width <= 0:
        return ""
    span = hi - lo if hi > lo else 1.0
    top = len(SPARK_BLOCKS) - 1
    out = []
    for v in list(values)[-width:]:
        level = round((min(hi, max(lo, v)) - lo) / span * top)
        out.append(SPARK_BLOCKS[level])
    return "".join(out)


def make_privacy_panel(state: ConsoleState, width: int = 20) -> RenderableType:
    return make_lines(make_privacy_lines(state, width), "no jobs yet")


def make_lines(lines: Sequence[Text], empty: str) -> RenderableType:
    """A panel of ``lines``, or ``empty`` (dim) when there are none."""
    return Group(*lines) if lines else Text(empty, style="dim")


def make_privacy_lines(state: ConsoleState, width: int = 20) -> list[Text]:
    lines = []
    for job in sorted(state.jobs):
        view = state.jobs[job]
        line = Text(f"{job} ", "bold")
        line.append_text(
            make_budget_gauge(view.epsilon_spent, view.epsilon_budget, width, view.coverage)
        )
        if view.denied:
            line.append("  DENIED", "bold red")
        lines.append(line)
    return lines


def make_accuracy_panel(state: ConsoleState, width: int = 16) -> RenderableType:
    return make_lines(make_accuracy_lines(state, width), "no evaluation metrics published yet")


def make_accuracy_lines(state: ConsoleState, width: int = 16) -> list[Text]:
    """The metrics panel: per job the accuracy sparkline (the central evaluation's, else
    the participants'), and the newest round's weighted metrics when participants report
    any (``r3 train loss 0.412 · eval acc 85.0% · central acc 87.0%``)."""
    lines = []
    for job in sorted(state.jobs):
        view = state.jobs[job]
        series = view.accuracy
        row = None if view.metrics_round is None else state.rounds.get((job, view.metrics_round))
        reported = row is not None and ("train" in row.metrics or "federated" in row.metrics)
        if not series and not reported:
            continue
        line = Text(f"{job} ", "bold")
        if series:
            line.append(make_sparkline([acc for _, acc in series], width), "green")
            version, acc = series[-1]
            line.append(f"  {100 * acc:.1f}% (v{version})")
        if reported and row is not None:
            line.append(f"  r{row.round} ", "dim")
            line.append(make_metrics_summary(row.metrics))
        lines.append(line)
    return lines


def make_alert_detail(alert: AlertRow) -> RenderableType:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    table.add_row("alert", f"#{alert.seq}")
    table.add_row("time", f"{format_clock(alert.ts)} UTC")
    table.add_row("severity", Text(alert.severity.label, SEVERITY_STYLE[alert.severity]))
    table.add_row("kind", alert.kind)
    table.add_row("job / round", f"{alert.job} / {alert.round}")
    table.add_row("client", alert.client or DASH)
    table.add_row("reason", alert.reason)
    table.add_row("source", alert.source or DASH)
    table.add_row("acknowledged", "yes" if alert.acknowledged else "no")
    table.add_row("detail", alert.detail or DASH)
    return table
