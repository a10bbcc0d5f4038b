"""The alert policy with plain data and an explicit clock."""

from __future__ import annotations

import pytest

from qflare.messages import Severity
from qflare.services.alerting.core import (
    KIND_CLIENT_FLAGGED,
    Action,
    Alert,
    AlertDesk,
    AlertPolicy,
    dead_letter_alert,
)


def _alert(
    kind: str = "update.rejected",
    *,
    client: str | None = "c1",
    reason: str = "BAD_SIGNATURE",
    job: str = "j1",
    round_: int | None = 1,
    severity: Severity = Severity.WARNING,
) -> Alert:
    return Alert(job=job, kind=kind, severity=severity, reason=reason, client=client, round=round_)


def test_same_key_within_window_is_a_duplicate_and_after_it_publishes_again() -> None:
    desk = AlertDesk(AlertPolicy(dedup_window_s=10))
    assert desk.decide(_alert(), now=0).action is Action.PUBLISH
    assert desk.decide(_alert(), now=9.9).action is Action.DUPLICATE
    assert desk.decide(_alert(), now=10.0).action is Action.PUBLISH


@pytest.mark.parametrize(
    "change", [{"job": "j2"}, {"kind": "other"}, {"client": "c2"}, {"reason": "REVOKED"}]
)
def test_any_key_field_makes_a_new_alert(change: dict) -> None:
    desk = AlertDesk(AlertPolicy(dedup_window_s=10))
    assert desk.decide(_alert(), now=0).publish
    assert desk.decide(_alert(**change), now=1).publish


def test_rate_limit_is_a_token_bucket_per_job_and_critical_passes() -> None:
    desk = AlertDesk(AlertPolicy(dedup_window_s=0, burst=3, rate_per_s=0.5))
    got = [desk.decide(_alert(client=f"c{i}"), now=0).action for i in range(5)]
    assert got == [Action.PUBLISH] * 3 + [Action.RATE_LIMITED] * 2
    # another job has its own bucket
    assert desk.decide(_alert(job="j2", client="c9"), now=0).publish
    # critical is never rate limited
    assert desk.decide(_alert(client="cx", severity=Severity.CRITICAL), now=0).publish
    # 2 s at 0.5/s refill one token
    assert desk.decide(_alert(client="c7"), now=2.0).publish
    assert desk.decide(_alert(client="c8"), now=2.0).action is Action.RATE_LIMITED


def test_client_flagged_k_rounds_in_a_row_escalates_to_critical() -> None:
    desk = AlertDesk(AlertPolicy(dedup_window_s=0, escalate_after=3))
    decisions = [
        desk.decide(_alert(KIND_CLIENT_FLAGGED, round_=r, reason="KRUM"), now=r)
        for r in (1, 2, 3, 4)
    ]
    assert [d.alert.severity for d in decisions] == [
        Severity.WARNING,
        Severity.WARNING,
        Severity.CRITICAL,
        Severity.CRITICAL,
    ]
    assert [d.streak for d in decisions] == [1, 2, 3, 4]
    assert decisions[2].escalated and "3 rounds in a row" in decisions[2].alert.detail
    assert decisions[2].alert.routing_key() == "critical.client.flagged.j1"


def test_kept_verdict_resets_the_streak_and_redelivery_does_not_lengthen_it() -> None:
    desk = AlertDesk(AlertPolicy(dedup_window_s=0, escalate_after=2))
    desk.decide(_alert(KIND_CLIENT_FLAGGED, round_=1), now=0)
    assert desk.decide(_alert(KIND_CLIENT_FLAGGED, round_=1), now=1).streak == 1  # redelivered
    desk.note_kept("j1", ["c1"], 2)
    assert desk.streak("j1", "c1") == 0
    d = desk.decide(_alert(KIND_CLIENT_FLAGGED, round_=3), now=2)
    assert d.streak == 1 and d.alert.severity is Severity.WARNING
    # other clients' streaks are separate
    assert desk.decide(_alert(KIND_CLIENT_FLAGGED, client="c2", round_=3), now=3).streak == 1


def test_escalated_alert_is_not_swallowed_by_dedup_of_the_earlier_warning() -> None:
    desk = AlertDesk(AlertPolicy(dedup_window_s=1000, escalate_after=2))
    assert desk.decide(_alert(KIND_CLIENT_FLAGGED, round_=1), now=0).publish
    second = desk.decide(_alert(KIND_CLIENT_FLAGGED, round_=2), now=1)
    assert second.publish and second.alert.severity is Severity.CRITICAL
    assert desk.decide(_alert(KIND_CLIENT_FLAGGED, round_=3), now=2).action is Action.DUPLICATE


def test_dedup_state_is_bounded() -> None:
    desk = AlertDesk(AlertPolicy(dedup_window_s=1000, burst=10_000, max_keys=2))
    for c in ("a", "b", "c"):
        desk.decide(_alert(client=c), now=0)
    assert desk.decide(_alert(client="a"), now=1).publish  # evicted, so not a duplicate
    assert desk.decide(_alert(client="c"), now=1).action is Action.DUPLICATE


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dedup_window_s": -1},
        {"burst": 0},
        {"rate_per_s": float("nan")},
        {"escalate_after": 0},
        {"max_keys": 0},
    ],
)
def test_policy_rejects_bad_tunables(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AlertPolicy(**kwargs)


def test_severity_parse() -> None:
    assert Severity.parse("Critical") is Severity.CRITICAL
    assert Severity.parse(20) is Severity.WARNING
    with pytest.raises(ValueError, match="unknown severity"):
        Severity.parse("panic")


def test_dead_letter_alert_names_job_reason_and_queue() -> None:
    a = dead_letter_alert("update.j7", "delivery_limit", "ingest", exchange="qflare.client")
    assert (a.job, a.kind, a.reason, a.severity) == (
        "j7",
        "dead_letter",
        "delivery_limit",
        Severity.CRITICAL,
    )
    assert "ingest" in a.detail and a.routing_key() == "critical.dead_letter.j7"
    c = dead_letter_alert("j3.model.published", "rejected", "client.client-001")
    assert c.job == "j3"
    b = dead_letter_alert("garbage", "rejected", None)
    assert (b.job, b.severity) == ("-", Severity.WARNING)


def test_restored_streak_continues() -> None:
    desk = AlertDesk(AlertPolicy(dedup_window_s=0, escalate_after=3))
    desk.restore_streak("j1", "c1", 2, 5)
    d = desk.decide(_alert(KIND_CLIENT_FLAGGED, round_=6), now=0)
    assert d.streak == 3 and d.escalated


def test_the_same_alert_from_two_services_is_two_alerts() -> None:
    desk = AlertDesk(AlertPolicy(dedup_window_s=60))
    fault = {"job": "-", "kind": "storage.fault", "client": None, "reason": "storage"}
    first = Alert(severity=Severity.CRITICAL, source="aggregator", **fault)  # type: ignore[arg-type]
    second = Alert(severity=Severity.CRITICAL, source="detector", **fault)  # type: ignore[arg-type]
    assert desk.decide(first, now=0).publish
    assert desk.decide(second, now=1).publish
    assert desk.decide(first, now=2).action is Action.DUPLICATE


def test_a_retracted_decision_leaves_no_trace() -> None:
    """The store failed to keep an alert: its retry must publish, not count as a duplicate
    of itself, nor pay a second rate-limit token."""
    desk = AlertDesk(AlertPolicy(dedup_window_s=60, burst=1, rate_per_s=0.0))
    decision = desk.decide(_alert(), now=5)
    assert decision.publish
    desk.retract(decision, now=5)
    again = desk.decide(_alert(), now=6)
    assert again.publish  # neither DUPLICATE nor RATE_LIMITED
    assert desk.decide(_alert(), now=7).action is Action.DUPLICATE


def test_retracting_a_duplicate_keeps_the_first() -> None:
    desk = AlertDesk(AlertPolicy(dedup_window_s=60))
    assert desk.decide(_alert(), now=0).publish
    duplicate = desk.decide(_alert(), now=1)
    desk.retract(duplicate, now=1)
    assert desk.decide(_alert(), now=2).action is Action.DUPLICATE
