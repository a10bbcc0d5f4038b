"""Envelope -> console events, with real signatures (and refusals) from a test CA."""

from __future__ import annotations

import pytest

from qflare.bus import topology
from qflare.messages import Reason
from qflare.tui import events as ev
from qflare.tui.adapter import KIND_CONSOLE_REJECTED, decode_delivery, event_kinds

from .wire import DIGEST, envelope, federation

T = 1_790_000_000.0


@pytest.fixture(scope="module")
def fed():
    return federation(3)


def test_every_round_kind_maps_to_its_event(fed) -> None:
    trust = fed.trust()
    cases = [
        (
            "round.opened",
            dict(
                model_version=2,
                model_digest=DIGEST,
                participants=["client-000"],
                deadline=T + 30,
                min_updates=1,
                clip_norm=1.0,
                tensor_spec=[],
                rule="median",
                model_offset=0,
                updates_from=0,
            ),
            ev.RoundOpened(
                "j",
                3,
                T,
                participants=("client-000",),
                deadline=T + 30,
                min_updates=1,
                rule="median",
                model_version=2,
            ),
        ),
        (
            "update.accepted",
            dict(
                client="client-000",
                update_digest=DIGEST,
                base_version=2,
                num_samples=5,
                offset=12,
            ),
            ev.UpdateAccepted("j", 3, T, client="client-000"),
        ),
        (
            "update.rejected",
            dict(client="client-001", reason=Reason.REVOKED, detail="serial 9"),
            ev.UpdateRejected("j", 3, T, client="client-001", reason="REVOKED", detail="serial 9"),
        ),
        (
            "round.closed",
            dict(updates=[{"client": "client-000", "digest": DIGEST, "offset": 12}]),
            ev.RoundClosed("j", 3, T, clients=("client-000",)),
        ),
        (
            "round.verdict",
            dict(
                kept=["client-000"],
                flagged=[{"client": "client-002", "score": 7.5, "reasons": ["norm"]}],
            ),
            ev.RoundVerdict(
                "j",
                3,
                T,
                kept=("client-000",),
                flagged=(ev.FlaggedClient("client-002", 7.5, ("norm",)),),
            ),
        ),
        (
            "privacy.granted",
            dict(epsilon_round=0.2, epsilon_total=1.1, delta=1e-5, coverage="noise_only"),
            ev.PrivacyGranted(
                "j", 3, T, epsilon_round=0.2, epsilon_total=1.1, delta=1e-5, coverage="noise_only"
            ),
        ),
        (
            "privacy.denied",
            dict(reason="BUDGET", epsilon_spent=3.9, budget=4.0, coverage="clipped_sum"),
            ev.PrivacyDenied(
                "j", 3, T, reason="BUDGET", epsilon_spent=3.9, budget=4.0, coverage="clipped_sum"
            ),
        ),
        (
            "metrics.evaluated",
            dict(model_version=3, accuracy=0.9, loss=0.3),
            ev.MetricsEvaluated("j", 3, T, model_version=3, accuracy=0.9, loss=0.3),
        ),
        ("job.ended", dict(reason="completed"), ev.JobEnded("j", 3, T, reason="completed")),
    ]
    for kind, body, expected in cases:
        data = envelope(fed, kind, body, job="j", round=3, ts=T)
        assert decode_delivery(data, topology.EVENTS, f"{kind}.j", trust, T) == [expected], kind
        # without a trust store the same envelope decodes (unverified) to the same event
        assert decode_delivery(data, topology.EVENTS, f"{kind}.j", None, T) == [expected], kind


def test_model_published_with_accuracy_also_feeds_the_sparkline(fed) -> None:
    data = envelope(
        fed,
        "model.published",
        dict(version=4, digest=DIGEST, epsilon=1.5, metrics={"accuracy": 0.75}),
        job="j",
        round=4,
        ts=T,
    )
    out = decode_delivery(data, topology.EVENTS, "model.published.j", fed.trust(), T)
    assert [type(e).__name__ for e in out] == ["ModelPublished", "MetricsEvaluated"]
    assert out[1].accuracy == 0.75


def test_alerts_come_from_the_alerts_exchange_with_routing_key_severity(fed) -> None:
    body = dict(
        severity="warning",
        alert_kind="client.flagged",
        client="client-002",
        reason="FLAGGED",
        detail="3 rounds",
    )
    data = envelope(fed, "alert.raised", body, job="j", round=5, ts=T)
    (alert,) = decode_delivery(data, topology.ALERTS, "critical.client.flagged.j", fed.trust(), T)
    assert (alert.severity, alert.kind, alert.client, alert.source) == (
        ev.Severity.CRITICAL,
        "client.flagged",
        "client-002",
        "alerting",
    )
    assert alert.key.startswith("alerting:")
    # raw alert.raised on qflare.events is the alerting service's input, not the log's
    assert decode_delivery(data, topology.EVENTS, "alert.raised.j", fed.trust(), T) == []
    assert (
        len(
            decode_delivery(
                data, topology.EVENTS, "alert.raised.j", fed.trust(), T, raw_alerts=True
            )
        )
        == 1
    )


def test_uploads_and_requests_are_ignored(fed) -> None:
    data = envelope(
        fed,
        "privacy.request",
        dict(q=1.0, z=1.0, clip=1.0, coverage="clipped_sum"),
        job="j",
        round=1,
        ts=T,
    )
    assert decode_delivery(data, topology.EVENTS, "privacy.request.j", fed.trust(), T) == []


@pytest.mark.parametrize("defect", ["forged", "wrong-ca", "revoked", "garbage", "unknown-kind"])
def test_bad_messages_become_console_alerts_with_reason_codes(defect: str) -> None:
    fed = federation(2)
    trust = fed.trust()
    body = dict(reason="completed")
    if defect == "forged":
        data = bytearray(envelope(fed, "job.ended", body, job="j", round=1, ts=T))
        data[data.index(b"completed")] ^= 1  # body changed after signing
        data, reason = bytes(data), "BAD_DIGEST"
    elif defect == "wrong-ca":
        data, reason = (
            envelope(federation(1), "job.ended", body, job="j", round=1, ts=T),
            "UNKNOWN_SIGNER",
        )
    elif defect == "revoked":
        data = envelope(fed, "job.ended", body, job="j", round=1, ts=T)
        fed.revoke("aggregator")
        trust, reason = fed.trust(), "REVOKED"
    elif defect == "garbage":
        data, reason = b"\x93\x01\x02", "MALFORMED"
    else:
        data = envelope(
            fed,
            "alert.raised",
            dict(severity="info", alert_kind="x", reason="r"),
            job="j",
            round=1,
            ts=T,
            sender="alerting",
        )
        data, reason = data.replace(b"alert.raised", b"alert.rising"), "UNKNOWN_KIND"
    (alert,) = decode_delivery(data, topology.EVENTS, "job.ended.j", trust, T + 1)
    assert alert.kind == KIND_CONSOLE_REJECTED and alert.source == "console"
    assert alert.reason == reason
    assert alert.ts == T + 1


def test_unverified_decode_still_checks_the_body_digest() -> None:
    fed = federation(1)
    data = bytearray(envelope(fed, "job.ended", dict(reason="completed"), job="j", round=1, ts=T))
    data[data.index(b"completed")] ^= 1
    (alert,) = decode_delivery(bytes(data), topology.EVENTS, "job.ended.j", None, T)
    assert alert.reason == "BAD_DIGEST"


def test_the_console_reads_only_the_kinds_it_draws() -> None:
    """Its queue binds these kinds (``<kind>.#``): client uploads, models in parts, the
    aggregator's privacy requests and raw alerts are never delivered, so never decoded or
    verified."""
    kinds = set(event_kinds())
    assert {"round.opened", "update.accepted", "round.verdict", "model.published"} <= kinds
    assert not {"update", "update.part", "model.part", "privacy.request", "alert.raised"} & kinds
    assert "alert.raised" in event_kinds(raw_alerts=True)


def test_an_event_copied_from_a_body_names_only_fields_the_body_has() -> None:
    # the console would fail on every such message; the adapter refuses to load instead
    from qflare.messages import bodies as wire
    from qflare.tui.adapter import COPIED, _same_names

    assert COPIED[wire.JobEnded] == (ev.JobEnded, ("reason", "detail"))
    with pytest.raises(TypeError, match="JobEnded has no"):
        _same_names({wire.JobEnded: ev.PrivacyGranted})
