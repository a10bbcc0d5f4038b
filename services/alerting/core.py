"""Alert policy: deduplication, rate limiting and escalation, as pure logic.

The alerting service (docs/architecture.md, "Processes") turns every ``alert.raised`` event and every dead
letter into a stored alert and republishes it on ``qflare.alerts`` as
``<severity>.<kind>.<job>``. Which alerts are republished is decided here, with plain data
and an explicit clock, so the policy is unit-tested without a broker or a database:

* **dedup** - an alert from the same service (``source``) with the same ``(job, kind, client,
  reason)`` as one published less than ``dedup_window_s`` ago is folded into it (its count
  grows) instead of republished;
* **rate limit** - a token bucket per job (``burst`` alerts, refilled at ``rate_per_s``)
  bounds what a flood of hostile traffic can push to operators; critical alerts always pass,
  so an escalation is never lost to the limit;
* **escalation** - a client flagged by the detector in ``escalate_after`` of its rounds in a
  row becomes ``critical``; a verdict that keeps the client resets its streak.

State is small (last publish per key, one bucket per job, one streak per client); the
service persists the alerts themselves, and a restarted replica starts with fresh dedup
state, which can at worst republish one alert per key: dedup is a courtesy to operators,
not a safety property.
"""

from __future__ import annotations

import enum
import math
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from qflare.messages.bodies import Severity

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")

#: Alert kind the detector raises for a client its verdict flagged.
KIND_CLIENT_FLAGGED = "client.flagged"
#: Alert kind made from a message drained from the dead-letter exchange.
KIND_DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert as the policy sees it. ``client`` and ``round`` are optional (a dead
    letter may name neither); ``source`` is the service that raised it."""

    job: str
    kind: str
    severity: Severity
    reason: str
    detail: str = ""
    client: str | None = None
    round: int | None = None
    source: str = ""
    ts: float = 0.0

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """What makes two alerts the same one: the same service saying the same thing
        (two services whose stores fail raise two alerts, not one)."""
        return (self.job, self.kind, self.client or "", self.reason, self.source)

    def routing_key(self) -> str:
        """``<severity>.<kind>.<job>`` on ``qflare.alerts``; a dotted kind keeps its dots so
        operators can bind e.g. ``critical.#`` or ``*.client.flagged.*``."""
        kind = _UNSAFE.sub("_", self.kind)[:120].strip(".") or "alert"
        job = _UNSAFE.sub("_", self.job)[:64] or "-"
        return f"{self.severity.label}.{kind}.{job}"


class Action(enum.Enum):
    PUBLISH = "publish"
    DUPLICATE = "duplicate"
    RATE_LIMITED = "rate_limited"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one alert. ``alert`` is the alert as it should be stored and
    published (possibly escalated); ``streak`` is the client's flag streak after it."""

    action: Action
    alert: Alert
    escalated: bool = False
    streak: int = 0

    @property
    def publish(self) -> bool:
        return self.action is Action.PUBLISH


@dataclass(frozen=True, slots=True)
class AlertPolicy:
    """Tunables, checked at construction."""

    dedup_window_s: float = 60.0
    burst: int = 20
    rate_per_s: float = 1.0
    escalate_after: int = 3
    max_keys: int = 10_000

    def __post_init__(self) -> None:
        if not math.isfinite(self.dedup_window_s) or self.dedup_window_s < 0:
            raise ValueError(
                f"dedup_window_s must be a finite number >= 0, got {self.dedup_window_s!r}"
            )
        if not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"burst must be an int >= 1, got {self.burst!r}")
        if not math.isfinite(self.rate_per_s) or self.rate_per_s < 0:
            raise ValueError(f"rate_per_s must be a finite number >= 0, got {self.rate_per_s!r}")
        if not isinstance(self.escalate_after, int) or self.escalate_after < 1:
            raise ValueError(f"escalate_after must be an int >= 1, got {self.escalate_after!r}")
        if not isinstance(self.max_keys, int) or self.max_keys < 1:
            raise ValueError(f"max_keys must be an int >= 1, got {self.max_keys!r}")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


@dataclass(slots=True)
class _Streak:
    length: int = 0
    last_round: int | None = None


@dataclass
class AlertDesk:
    """The mutable policy state of one alerting replica. ``now`` is always passed in."""

    policy: AlertPolicy = field(default_factory=AlertPolicy)
    _last: OrderedDict[tuple[str, ...], float] = field(default_factory=OrderedDict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _streaks: dict[tuple[str, str], _Streak] = field(default_factory=dict)

    def decide(self, alert: Alert, now: float) -> Decision:
        escalated, streak = False, 0
        if alert.kind == KIND_CLIENT_FLAGGED and alert.client:
            streak = self._note_flag(alert.job, alert.client, alert.round)
            if streak >= self.policy.escalate_after and alert.severity < Severity.CRITICAL:
                alert = replace(
                    alert,
                    severity=Severity.CRITICAL,
                    detail=f"flagged {streak} rounds in a row; {alert.detail}".rstrip("; "),
                )
                escalated = True
        key = (*alert.key, alert.severity.label)
        last = self._last.get(key)
        if last is not None and now - last < self.policy.dedup_window_s:
            return Decision(Action.DUPLICATE, alert, escalated, streak)
        if alert.severity < Severity.CRITICAL and not self._take_token(alert.job, now):
            return Decision(Action.RATE_LIMITED, alert, escalated, streak)
        self._remember(key, now)
        return Decision(Action.PUBLISH, alert, escalated, streak)

    def retract(self, decision: Decision, now: float) -> None:
        """Undo what :meth:`decide` took note of for a decision that was never stored (the
        store failed): the retry decides afresh instead of finding its own first attempt a
        duplicate (or its rate-limit token spent), so a storage fault holds an alert and
        never drops it. A client's flag streak needs nothing: a round counts once."""
        if not decision.publish:
            return
        alert = decision.alert
        key = (*alert.key, alert.severity.label)
        if self._last.get(key) == now:
            del self._last[key]
        bucket = self._buckets.get(alert.job)
        if alert.severity < Severity.CRITICAL and bucket is not None:
            bucket.tokens = min(float(self.policy.burst), bucket.tokens + 1.0)

    def note_kept(self, job: str, clients: Iterable[str], round_: int | None = None) -> None:
        """A verdict kept these clients: their flag streaks end."""
        for client in clients:
            self._streaks.pop((job, client), None)

    def restore_streak(self, job: str, client: str, length: int, last_round: int | None) -> None:
        """Reload a streak persisted by an earlier run."""
        self._streaks[(job, client)] = _Streak(length, last_round)

    def streak(self, job: str, client: str) -> int:
        s = self._streaks.get((job, client))
        return s.length if s else 0

    def _note_flag(self, job: str, client: str, round_: int | None) -> int:
        s = self._streaks.setdefault((job, client), _Streak())
        # The same round flagged twice (a redelivered alert) does not lengthen the streak.
        if round_ is None or s.last_round is None or round_ > s.last_round:
            s.length += 1
            s.last_round = round_ if round_ is not None else s.last_round
        return s.length

    def _take_token(self, job: str, now: float) -> bool:
        b = self._buckets.get(job)
        if b is None:
            b = self._buckets[job] = _Bucket(float(self.policy.burst), now)
        b.tokens = min(
            float(self.policy.burst), b.tokens + max(0.0, now - b.stamp) * self.policy.rate_per_s
        )
        b.stamp = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return True
        return False

    def _remember(self, key: tuple[str, ...], now: float) -> None:
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.policy.max_keys:
            self._last.popitem(last=False)


def dead_letter_alert(
    routing_key: str,
    death_reason: str | None,
    death_queue: str | None,
    *,
    exchange: str | None = None,
    ts: float = 0.0,
) -> Alert:
    """The alert for a message drained from ``qflare.dead``.

    Routing keys end in the job (``update.<job>``, ``<kind>.<job>``), so the last word
    names the job; a poison message that exhausted its delivery limit points at a handler
    fault (or a service that cannot keep up) and is critical; a rejected one was already
    alerted on by its rejecter and is a warning. (``alert.raised`` knows info, warning and
    critical only.)
    """
    reason = death_reason or "unknown"
    words = routing_key.split(".") if routing_key else []
    job = words[-1] if len(words) >= 2 else "-"
    if death_queue and death_queue.startswith("client.") and words:
        job = words[0]  # broadcast keys are `<job>.<kind>`
    severity = Severity.CRITICAL if reason == "delivery_limit" else Severity.WARNING
    detail = f"dead letter from queue {death_queue or '?'} (exchange {exchange or '?'}, key {routing_key!r})"
    return Alert(
        job=job,
        kind=KIND_DEAD_LETTER,
        severity=severity,
        reason=reason,
        detail=detail,
        source="alerting",
        ts=ts,
    )
