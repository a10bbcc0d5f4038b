"""Wire envelopes -> console events.

Each delivery from ``qflare.events`` or ``qflare.alerts`` is one signed envelope
(:mod:`qflare.messages`). With a trust store (CA certificate + revocation list) it is opened
with :func:`qflare.messages.open_envelope`, so a forged, revoked or mis-roled sender is
refused exactly as a service would refuse it; without one the console still shows the feed,
decoded but marked unverified in the header. Either way a bad message never stops the
console: it becomes a local ``console.rejected`` alert carrying the reason code.

Alerts: the alert log is fed from ``qflare.alerts`` (the alerting service's deduplicated,
rate-limited, escalated stream); raw ``alert.raised`` on ``qflare.events`` is the input to
that service and is ignored unless ``raw_alerts`` is set (e.g. when no alerting service runs).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Any

from qflare.bus import topology
from qflare.crypto.pki import TrustStore
from qflare.messages import DEFAULT_LIMITS, MessageRejected, Reason, Severity, open_envelope, unpack
from qflare.messages import bodies as wire
from qflare.tui import events as ev

#: Kinds the console draws nothing from (client uploads, models in parts, the aggregator's
#: requests).
IGNORED_KINDS = frozenset(
    {
        "update",
        "update.manifest",
        "update.part",
        "model.manifest",
        "model.part",
        "privacy.request",
    }
)
#: ``model.published`` metrics named ``train/<name>``: the round's weighted training metrics.
TRAIN = "train/"
KIND_CONSOLE_REJECTED = "console.rejected"
_HEAD = frozenset(f.name for f in fields(ev.FeedEvent))


def _same_names(
    pairs: dict[type[wire.Body], type[ev.FeedEvent]],
) -> dict[type[wire.Body], tuple[type[ev.FeedEvent], tuple[str, ...]]]:
    """Each body type with its event type and the event's fields past the header, which
    the body must have too."""
    out = {}
    for body_type, event_type in pairs.items():
        names = tuple(f.name for f in fields(event_type) if f.name not in _HEAD)
        missing = [n for n in names if n not in body_type.model_fields]
        if missing:
            raise TypeError(f"{body_type.__name__} has no {missing}")
        out[body_type] = (event_type, names)
    return out


#: Bodies whose console event is the body's fields of the same names, as they are.
COPIED = _same_names(
    {
        wire.UpdateAccepted: ev.UpdateAccepted,
        wire.PrivacyGranted: ev.PrivacyGranted,
        wire.PrivacyDenied: ev.PrivacyDenied,
        wire.MetricsEvaluated: ev.MetricsEvaluated,
        wire.JobEnded: ev.JobEnded,
    }
)
_FIELDS = frozenset(
    {"v", "kind", "sender", "cert", "job", "round", "ts", "nonce", "body_digest", "body", "sig"}
)


@dataclass(frozen=True, slots=True)
class Opened:
    """The parts of an envelope the console uses."""

    kind: str
    sender: str
    job: str
    round: int
    ts: float
    nonce: bytes
    body: wire.Body
    verified: bool


def open_message(data: bytes, trust: TrustStore | None) -> Opened:
    """Verify (with ``trust``) or only decode (without) one envelope; MessageRejected on
    anything wrong with it."""
    if trust is not None:
        env = open_envelope(data, trust)
        return Opened(
            env.kind, env.sender, env.job, env.round, env.ts / 1000.0, env.nonce, env.body, True
        )
    return _decode_unverified(data)


def _decode_unverified(data: bytes) -> Opened:
    cap = DEFAULT_LIMITS.max_envelope_bytes
    obj = unpack(
        data,
        DEFAULT_LIMITS.with_(max_depth=1, max_container_len=16, max_bin_len=cap),
        bin_as_view=True,
        max_bytes=cap,
    )
    if not isinstance(obj, dict) or set(obj) != _FIELDS:
        raise MessageRejected(Reason.MALFORMED, "not a QFLARE envelope")
    kind, sender, job, round_, ts = (obj[k] for k in ("kind", "sender", "job", "round", "ts"))
    if not (
        isinstance(kind, str)
        and isinstance(sender, str)
        and isinstance(job, str)
        and type(round_) is int
        and type(ts) is int
    ):
        raise MessageRejected(Reason.MALFORMED, "envelope header field types")
    if kind not in wire.BODY_TYPES:
        raise MessageRejected(Reason.UNKNOWN_KIND, f"unknown kind {kind[:64]!r}")
    body = obj["body"]
    if not isinstance(body, memoryview) or not isinstance(obj["body_digest"], memoryview):
        raise MessageRejected(Reason.MALFORMED, "envelope body must be bin")
    if hashlib.sha256(body).digest() != bytes(obj["body_digest"]):
        raise MessageRejected(Reason.BAD_DIGEST, "body does not match body_digest")
    if len(body) and body[0] in (0xC7, 0xC8, 0xC9):
        raise MessageRejected(Reason.UNSEAL_FAILED, "sealed body; the console holds no KEM key")
    model = wire.body_from_wire(kind, unpack(body, DEFAULT_LIMITS, max_bytes=cap))
    nonce = obj["nonce"]
    return Opened(
        kind,
        sender,
        job,
        round_,
        ts / 1000.0,
        bytes(nonce) if isinstance(nonce, memoryview) else b"",
        model,
        False,
    )


def to_events(
    msg: Opened, exchange: str, routing_key: str = "", *, raw_alerts: bool = False
) -> list[ev.FeedEvent]:
    """The console events one opened envelope stands for (often one, sometimes none)."""
    head: dict[str, Any] = {"job": msg.job, "round": msg.round, "ts": msg.ts}
    body = msg.body
    kind = msg.kind
    if kind in IGNORED_KINDS:
        return []
    copied = COPIED.get(type(body))
    if copied is not None:
        event_type, names = copied
        return [event_type(**head, **{name: getattr(body, name) for name in names})]
    if isinstance(body, wire.AlertRaised):
        if exchange != topology.ALERTS and not raw_alerts:
            return []
        return [
            ev.AlertRaised(
                **head,
                severity=_alert_severity(body.severity, exchange, routing_key),
                kind=body.alert_kind,
                reason=body.reason,
                client=body.client,
                detail=body.detail,
                source=msg.sender,
                key=f"{msg.sender}:{msg.nonce.hex()}",
            )
        ]
    if isinstance(body, wire.RoundOpened):
        return [
            ev.RoundOpened(
                **head,
                participants=tuple(body.participants),
                deadline=body.deadline,
                min_updates=body.min_updates,
                rule=body.rule,
                model_version=body.model_version,
            )
        ]
    if isinstance(body, wire.UpdateRejected):
        return [
            ev.UpdateRejected(
                **head, client=body.client, reason=str(body.reason), detail=body.detail
            )
        ]
    if isinstance(body, wire.RoundClosed):
        return [ev.RoundClosed(**head, clients=tuple(u.client for u in body.updates))]
    if isinstance(body, wire.RoundVerdict):
        return [
            ev.RoundVerdict(
                **head,
                kept=tuple(body.kept),
                flagged=tuple(
                    ev.FlaggedClient(f.client, f.score, tuple(f.reasons)) for f in body.flagged
                ),
            )
        ]
    if isinstance(body, wire.ModelPublished):
        train = {
            name.removeprefix(TRAIN): value
            for name, value in body.metrics.items()
            if name.startswith(TRAIN) and name != f"{TRAIN}num_samples"
        }
        out: list[ev.FeedEvent] = [
            ev.ModelPublished(**head, version=body.version, epsilon=body.epsilon, train=train)
        ]
        if "accuracy" in body.metrics:
            out.append(
                ev.MetricsEvaluated(
                    **head,
                    model_version=body.version,
                    accuracy=body.metrics["accuracy"],
                    loss=body.metrics.get("loss", float("nan")),
                )
            )
        return out
    return []


def _alert_severity(body_severity: str, exchange: str, routing_key: str) -> Severity:
    # qflare.alerts routes on <severity>.<kind>.<job>, the severity the alerting service
    # decided (after escalation), so the routing key wins there.
    if exchange == topology.ALERTS and routing_key:
        try:
            return Severity.parse(routing_key.split(".", 1)[0])
        except ValueError:
            pass
    try:
        return Severity.parse(body_severity)
    except ValueError:
        return Severity.WARNING


def rejected_event(
    exc: MessageRejected, exchange: str, routing_key: str, now: float
) -> ev.AlertRaised:
    """A message the console could not accept, shown as a local alert."""
    return ev.AlertRaised(
        job="-",
        round=0,
        ts=now,
        severity=Severity.WARNING,
        kind=KIND_CONSOLE_REJECTED,
        reason=str(exc.reason),
        detail=f"{exchange}/{routing_key}: {exc.detail}"[:4000],
        source="console",
    )


def event_kinds(*, raw_alerts: bool = False) -> tuple[str, ...]:
    """The kinds the console reads from ``qflare.events``: every kind it draws something
    from (raw ``alert.raised`` only with ``raw_alerts``). The console's queue binds just
    these (``<kind>.#``), so the broker never hands it an envelope it would only decode
    and drop, and it verifies no signature it does not need."""
    skipped = IGNORED_KINDS if raw_alerts else IGNORED_KINDS | {"alert.raised"}
    return tuple(sorted(set(wire.BODY_TYPES) - skipped))


def decode_delivery(
    data: bytes,
    exchange: str,
    routing_key: str,
    trust: TrustStore | None,
    now: float,
    *,
    raw_alerts: bool = False,
) -> list[ev.FeedEvent]:
    """One delivery -> console events; bad input becomes a ``console.rejected`` alert."""
    try:
        msg = open_message(data, trust)
    except MessageRejected as exc:
        return [rejected_event(exc, exchange, routing_key, now)]
    return to_events(msg, exchange, routing_key, raw_alerts=raw_alerts)
