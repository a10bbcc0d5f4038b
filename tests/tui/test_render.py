"""The pure make_* helpers: exact text for given state and time."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from qflare.tui import events as ev
from qflare.tui import render
from qflare.tui.state import ConsoleState

from .scenario import JOB, NOW, job_events


def plain(renderable: object, width: int = 100) -> str:
    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (59.4, "59s"), (65, "1m05s"), (3725, "1h02m"), (-3, "0s")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert render.format_duration(seconds) == text


def test_countdown_and_overdue() -> None:
    assert render.format_countdown(100.0, 75.0) == "25s"
    assert render.format_countdown(100.0, 103.0) == "overdue 3s"
    assert render.format_countdown(None, 1.0) == render.DASH


def test_epsilon_cell() -> None:
    assert render.format_epsilon(None) == render.DASH
    assert render.format_epsilon(float("inf")) == "∞"
    assert render.format_epsilon(1.23456) == "1.235"


def test_clock_is_utc() -> None:
    assert render.format_clock(0.0) == "00:00:00"
    assert render.format_clock(1_790_000_000.0) == "14:13:20"


def test_budget_gauge_fill_and_unknown_budget() -> None:
    assert render.make_budget_gauge(1.0, 4.0, width=8).plain == "[██░░░░░░] 1.00/4.00 ε (25%)"
    full = render.make_budget_gauge(5.0, 4.0, width=4)
    assert full.plain == "[████] 5.00/4.00 ε (125%)"
    assert "bold red" in {str(span.style) for span in full.spans}
    assert render.make_budget_gauge(0.5, None).plain == "ε 0.500 spent (budget unknown)"
    assert "DP off" in render.make_budget_gauge(float("inf"), 4.0).plain
    assert render.make_budget_gauge(1.0, 4.0, width=8, coverage="clipped_sum").plain.endswith(
        "(25%) [DP]"
    )
    assert "not a DP guarantee" in render.make_budget_gauge(1.0, 4.0, coverage="noise_only").plain


def test_sparkline_scales_over_unit_interval_and_keeps_the_latest() -> None:
    assert render.make_sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert render.make_sparkline([0.1] * 5 + [1.0], width=3) == "▂▂█"
    assert render.make_sparkline([]) == ""
    assert render.make_sparkline([2.0, -1.0]) == "█▁"  # clamped


def test_link_banner_states() -> None:
    s = ConsoleState(now=100.0)
    s.apply(ev.LinkChanged(ev.Link.RECONNECTING, 93.0, "broker connection lost"))
    text = render.make_link_banner(s, "amqp://h:5672").plain
    assert "reconnecting for 7s" in text and "broker connection lost" in text
    s.apply(ev.LinkChanged(ev.Link.CONNECTED, 100.0))
    s.pause()
    text = render.make_link_banner(s).plain
    assert "● connected" in text and "feed paused (0 waiting)" in text


def test_round_panel_shows_state_updates_and_countdown() -> None:
    s = ConsoleState(now=NOW)
    s.apply_all(job_events())
    text = plain(render.make_round_panel(s))
    line = next(line for line in text.splitlines() if line.startswith(JOB))
    assert line.split() == [JOB, "4/10", "collecting", "4/8", "25s", "v3"]


def test_round_cells_and_alert_cells() -> None:
    s = ConsoleState(now=NOW)
    s.apply_all(job_events())
    cells = [str(getattr(c, "plain", c)) for c in render.make_round_cells(s.rounds[(JOB, 3)])]
    assert cells == [JOB, "3", "published", "8/8", "6", "2", "nnm+multikrum(f=2)", "1.050", "3.90s"]
    alert = s.visible_alerts()[1]
    cells = render.make_alert_cells(alert)
    assert [str(getattr(c, "plain", c)) for c in cells[:6]] == [
        "14:13:43",
        "critical",
        "client.flagged",
        JOB,
        "client-006",
        "FLAGGED",
    ]
    assert str(cells[1].style) == render.SEVERITY_STYLE[ev.Severity.CRITICAL]


def test_clients_sorted_most_suspicious_first() -> None:
    s = ConsoleState(now=NOW)
    s.apply_all(job_events())
    order = [c.client for c in render.client_order(list(s.clients.values()))]
    assert order[:3] == ["client-007", "client-005", "client-006"]
    cells = render.make_client_cells(s.clients["client-005"], NOW)
    assert [str(getattr(c, "plain", c)) for c in cells] == [
        "client-005",
        "0.00",
        "3",
        "",
        "14s ago",
        "3",
        "3",
        "0",
    ]


def test_alert_detail_lists_every_field() -> None:
    s = ConsoleState(now=NOW)
    s.apply_all(job_events())
    text = plain(render.make_alert_detail(s.visible_alerts()[0]))
    for needle in (
        "REVOKED",
        "client-007",
        "certificate serial 7 is revoked",
        "alerting",
        "14:13:52 UTC",
        "acknowledged  no",
    ):
        assert needle in text


def test_accuracy_panel_and_empty_panels() -> None:
    s = ConsoleState(now=NOW)
    assert "waiting for round events" in plain(render.make_round_panel(s))
    assert "no evaluation metrics" in plain(render.make_accuracy_panel(s))
    s.apply_all(job_events())
    assert f"{JOB} ▅▆▇  80.0% (v3)" in plain(render.make_accuracy_panel(s))
