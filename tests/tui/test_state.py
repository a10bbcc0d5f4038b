"""ConsoleState: every panel's data from events, with no Textual and no broker."""

from __future__ import annotations

import pytest

from qflare.tui import events as ev
from qflare.tui.state import AlertFilter, ConsoleState, parse_filter

from .scenario import BYZANTINE, CLIENTS, JOB, NOW, T0, job_events


@pytest.fixture
def state() -> ConsoleState:
    s = ConsoleState(now=NOW)
    s.apply_all(job_events())
    return s


def test_current_round_counts_updates_against_participants(state: ConsoleState) -> None:
    row = state.current_round(JOB)
    assert row is not None and row.round == 4
    assert row.state == "collecting"
    assert (len(row.received), row.expected) == (4, len(CLIENTS))
    assert row.deadline == T0 + 30 + 30.0


def test_rounds_table_rows_carry_latency_kept_flagged_rule_epsilon(state: ConsoleState) -> None:
    rows = state.round_rows()
    assert [r.round for r in rows] == [4, 3, 2, 1]
    done = rows[1]
    assert done.state == "published"
    assert done.kept == len(CLIENTS) - len(BYZANTINE)
    assert done.flagged == BYZANTINE
    assert done.rule == "nnm+multikrum(f=2)"
    assert done.epsilon_total == pytest.approx(1.05)
    # opened at t+0.1, published at t+4.0 (sender times)
    assert done.latency == pytest.approx(3.9)
    assert rows[0].latency is None


def test_clients_reputation_flags_and_revocation(state: ConsoleState) -> None:
    bad = state.clients["client-005"]
    assert (bad.rounds_flagged, bad.rounds_kept, bad.reputation) == (3, 0, 0.0)
    assert bad.last_flag_round == 3 and bad.last_reasons == ("krum", "norm")
    good = state.clients["client-000"]
    assert good.reputation == 1.0 and good.updates == 4
    assert state.clients["client-007"].revoked


def test_privacy_budget_and_accuracy_series(state: ConsoleState) -> None:
    view = state.jobs[JOB]
    assert view.epsilon_budget == 4.0
    assert view.epsilon_spent == pytest.approx(1.4)  # granted for the open round 4 too
    assert [v for v, _ in view.accuracy] == [1, 2, 3]
    assert view.accuracy[-1][1] == pytest.approx(0.8)


def test_denied_round_ends_the_job_view() -> None:
    s = ConsoleState()
    s.apply(ev.PrivacyDenied("j", 7, T0, reason="BUDGET", epsilon_spent=3.9, budget=4.0))
    s.apply(ev.JobEnded("j", 7, T0 + 1, reason="budget_exhausted"))
    assert s.rounds[("j", 7)].state == "denied"
    assert s.jobs["j"].denied and s.jobs["j"].ended == "budget_exhausted"
    assert s.jobs["j"].epsilon_budget == 4.0


def test_late_messages_never_rewind_a_round() -> None:
    s = ConsoleState()
    s.apply(ev.RoundOpened("j", 1, T0, participants=("a", "b")))
    s.apply(ev.ModelPublished("j", 1, T0 + 2, version=1))
    s.apply(ev.UpdateAccepted("j", 1, T0 + 3, client="a"))  # redelivered, late
    assert s.rounds[("j", 1)].state == "published"


def test_alerts_dedup_by_message_identity_and_acknowledge(state: ConsoleState) -> None:
    n = len(state.alerts)
    state.apply(ev.AlertRaised(JOB, 1, T0, kind="client.flagged", key="alerting:1:client-005"))
    assert len(state.alerts) == n
    newest = state.visible_alerts()[0]
    assert newest.reason == "REVOKED"
    assert state.unacknowledged == 6  # info alerts do not count
    assert state.acknowledge(state.visible_alerts(parse_filter("sev:critical"))[0].seq)
    assert state.unacknowledged == 5
    assert not state.acknowledge(10_000)


def test_redelivered_verdict_counts_a_round_once(state: ConsoleState) -> None:
    before = state.clients["client-005"].rounds_flagged
    state.apply(
        ev.RoundVerdict(JOB, 3, T0, kept=(), flagged=(ev.FlaggedClient("client-005", 1.0),))
    )
    assert state.clients["client-005"].rounds_flagged == before


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("sev:critical", 2),
        ("sev:warning", 6),
        ("kind:client.flagged", 6),
        ("client:client-006", 3),
        ("client:client-006 sev:critical", 1),
        ("kind:update", 1),
        ("round 2", 2),  # bare words search the detail
        ("", 7),
    ],
    ids=lambda v: str(v),
)
def test_filters(state: ConsoleState, query: str, expected: int) -> None:
    assert len(state.visible_alerts(parse_filter(query))) == expected


def test_filter_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="unknown filter key 'colour'"):
        parse_filter("colour:red")
    with pytest.raises(ValueError, match="unknown severity 'loud'"):
        parse_filter("sev:loud")
    assert parse_filter("sev:warning client:c-1").describe() == "sev>=warning client:c-1"
    assert not AlertFilter().active


def test_pause_holds_events_and_resume_applies_them_in_order() -> None:
    s = ConsoleState()
    s.pause()
    s.apply(ev.RoundOpened("j", 1, T0, participants=("a",)))
    s.apply(ev.UpdateAccepted("j", 1, T0 + 1, client="a"))
    s.apply(ev.LinkChanged(ev.Link.RECONNECTING, T0 + 2))
    assert not s.rounds and len(s.pending) == 2
    assert s.link is ev.Link.RECONNECTING  # the link is shown even while paused
    s.resume()
    assert s.rounds[("j", 1)].state == "collecting" and not s.pending


def test_link_since_tracks_changes_only() -> None:
    s = ConsoleState()
    s.apply(ev.LinkChanged(ev.Link.RECONNECTING, 10.0, "down"))
    s.apply(ev.LinkChanged(ev.Link.RECONNECTING, 12.0, "still down"))
    assert (s.link, s.link_since, s.link_detail) == (ev.Link.RECONNECTING, 10.0, "still down")
    s.apply(ev.LinkChanged(ev.Link.CONNECTED, 15.0))
    assert s.link_since == 15.0


def test_history_snapshot_rebuilds_rows_without_latency() -> None:
    s = ConsoleState()
    s.apply(
        ev.RoundSnapshot(
            "j",
            2,
            T0,
            state="published",
            participants=("a", "b", "c"),
            received=("a", "b", "c"),
            kept=("a", "b"),
            flagged=("c",),
            rule="median",
            epsilon_total=0.7,
            model_version=1,
        )
    )
    row = s.rounds[("j", 2)]
    assert (row.state, row.kept, row.flagged, row.latency) == ("published", 2, ("c",), None)
    assert s.clients["c"].rounds_flagged == 1 and s.jobs["j"].epsilon_spent == 0.7


def test_a_denied_round_sorts_as_the_newest() -> None:
    s = ConsoleState()
    s.apply(ev.RoundOpened("j", 1, T0, participants=("a",)))
    s.apply(ev.ModelPublished("j", 1, T0 + 2, version=1))
    s.apply(ev.PrivacyDenied("j", 2, T0 + 3, reason="BUDGET", epsilon_spent=1.0, budget=1.0))
    assert [r.round for r in s.round_rows()] == [2, 1]
