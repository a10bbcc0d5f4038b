"""What the operator console knows, as plain data updated by :meth:`ConsoleState.apply`.

Pure: no Textual, no broker, no clock of its own (``now`` is set by whoever owns the
clock), so every panel's content is unit-tested by feeding events and reading rows.

* jobs: the current round of each job, its privacy spend and budget, its accuracy series;
* rounds: one row per (job, round) with its state, updates received/expected, kept and
  flagged counts, rule, epsilon and latency (round.opened -> model.published, sender time);
* alerts: a bounded log, deduplicated by message identity, acknowledged locally;
* clients: last seen, updates, rounds kept/flagged, revocation.

A client's *reputation* here is the console's own measure, the share of its decided rounds
in which the detector kept it (1.0 = never flagged); the detector's decayed offence score
lives in the detector's store, not on the wire.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from qflare.messages import Severity
from qflare.tui.events import (
    AlertRaised,
    Event,
    FeedEvent,
    FlaggedClient,
    JobDeclared,
    JobEnded,
    Link,
    LinkChanged,
    MetricsEvaluated,
    ModelPublished,
    PrivacyDenied,
    PrivacyGranted,
    RoundClosed,
    RoundOpened,
    RoundSnapshot,
    RoundVerdict,
    UpdateAccepted,
    UpdateRejected,
)

MAX_ROUNDS = 1000
MAX_ALERTS = 2000
MAX_PENDING = 20000
MAX_SERIES = 500

#: Round states in the order a healthy round passes through them.
ROUND_STATES = ("granted", "open", "collecting", "closed", "verdict", "published")
#: Final states that are not success.
FAILED_STATES = ("denied", "ended")


@dataclass(slots=True)
class RoundRow:
    job: str
    round: int
    state: str = "granted"
    first_ts: float = 0.0
    opened_ts: float | None = None
    closed_ts: float | None = None
    verdict_ts: float | None = None
    published_ts: float | None = None
    deadline: float | None = None
    expected: int = 0
    min_updates: int = 0
    received: set[str] = field(default_factory=set)
    rejected: int = 0
    kept: int | None = None
    flagged: tuple[str, ...] = ()
    rule: str = ""
    epsilon_round: float | None = None
    epsilon_total: float | None = None
    model_version: int | None = None
    # the round's weighted metrics: "train" (its updates'), "federated" (its participants'
    # evaluation of its base model), "central" (evaluate_fn on its model); name -> value
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    rev: int = 0  # bumped whenever the state touches the row (what to redraw)

    @property
    def latency(self) -> float | None:
        """Seconds from round.opened to model.published, by the senders' clocks."""
        if self.opened_ts is None or self.published_ts is None:
            return None
        return max(0.0, self.published_ts - self.opened_ts)

    def advance(self, state: str) -> None:
        """Move forward only: a late or redelivered message never rewinds a round."""
        if self.state in FAILED_STATES:
            return
        if state in FAILED_STATES or ROUND_STATES.index(state) > ROUND_STATES.index(self.state):
            self.state = state


@dataclass(slots=True)
class JobView:
    job: str
    current_round: int | None = None
    epsilon_spent: float = 0.0
    epsilon_budget: float | None = None
    delta: float | None = None
    coverage: str | None = None  # what epsilon_spent covers, from the accountant's answers
    rounds_planned: int | None = None
    model_version: int | None = None
    accuracy: list[tuple[int, float]] = field(default_factory=list)
    accuracy_source: str = ""  # central once a central evaluation came (it wins)
    metrics_round: int | None = None  # the newest round with weighted metrics
    ended: str | None = None
    denied: bool = False


@dataclass(slots=True)
class AlertRow:
    seq: int
    ts: float
    severity: Severity
    kind: str
    job: str
    round: int
    reason: str
    client: str | None
    detail: str
    source: str
    acknowledged: bool = False
    rev: int = 0


@dataclass(slots=True)
class ClientRow:
    client: str
    last_seen: float | None = None
    updates: int = 0
    rejected: int = 0
    rounds_kept: int = 0
    rounds_flagged: int = 0
    last_flag_round: int | None = None
    last_score: float | None = None
    last_reasons: tuple[str, ...] = ()
    revoked: bool = False
    rev: int = 0
    _decided: set[tuple[str, int]] = field(default_factory=set)

    @property
    def reputation(self) -> float | None:
        decided = self.rounds_kept + self.rounds_flagged
        return None if decided == 0 else self.rounds_kept / decided


@dataclass(frozen=True, slots=True)
class AlertFilter:
    """Which alerts the log shows: at least ``min_severity``, ``kind``/``client``/``job``
    as case-insensitive substrings, ``text`` anywhere in reason or detail."""

    min_severity: Severity = Severity.INFO
    kind: str = ""
    client: str = ""
    job: str = ""
    text: str = ""

    def matches(self, alert: AlertRow) -> bool:
        if alert.severity < self.min_severity:
            return False
        if self.kind and self.kind.lower() not in alert.kind.lower():
            return False
        if self.client and self.client.lower() not in (alert.client or "").lower():
            return False
        if self.job and self.job.lower() not in alert.job.lower():
            return False
        if self.text:
            hay = f"{alert.reason} {alert.detail}".lower()
            if self.text.lower() not in hay:
                return False
        return True

    @property
    def active(self) -> bool:
        return self != AlertFilter()

    def describe(self) -> str:
        parts = []
        if self.min_severity > Severity.INFO:
            parts.append(f"sev>={self.min_severity.label}")
        for name in ("kind", "client", "job", "text"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name}:{value}")
        return " ".join(parts) or "all"


_FILTER_KEYS = {
    "sev": "min_severity",
    "severity": "min_severity",
    "kind": "kind",
    "client": "client",
    "job": "job",
    "text": "text",
}


def parse_filter(query: str) -> AlertFilter:
    """``"sev:warning kind:client.flagged client:client-003 words"`` -> AlertFilter.

    Bare words search reason and detail. Raises ValueError naming an unknown key or
    severity, so the console can show what to fix.
    """
    fields: dict[str, object] = {}
    words: list[str] = []
    for token in query.split():
        key, sep, value = token.partition(":")
        if not sep:
            words.append(token)
            continue
        name = _FILTER_KEYS.get(key.lower())
        if name is None:
            raise ValueError(f"unknown filter key {key!r}; use {', '.join(sorted(_FILTER_KEYS))}")
        fields[name] = Severity.parse(value) if name == "min_severity" else value
    if words:
        fields["text"] = " ".join([str(fields.get("text", "")), *words]).strip()
    return AlertFilter(**fields)  # type: ignore[arg-type]


class ConsoleState:
    """Everything on screen. ``apply`` is the only way facts get in."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.jobs: dict[str, JobView] = {}
        self.rounds: OrderedDict[tuple[str, int], RoundRow] = OrderedDict()
        self.alerts: deque[AlertRow] = deque(maxlen=MAX_ALERTS)
        self.clients: dict[str, ClientRow] = {}
        self.link = Link.CONNECTING
        self.link_since = now
        self.link_detail = ""
        self.paused = False
        self.pending: deque[FeedEvent] = deque(maxlen=MAX_PENDING)
        self.dropped_while_paused = 0
        self.events_seen = 0
        self.version = 0
        # per table: bumped when any of its rows changes, so a screen redraws only the
        # tables (and, by each row's ``rev``, the rows) that changed
        self.rounds_rev = 0
        self.clients_rev = 0
        self.alerts_rev = 0
        self._alert_keys: OrderedDict[str, None] = OrderedDict()
        self._seq = 0

    # ---- feeding -------------------------------------------------------------------
    def apply(self, event: Event) -> None:
        if isinstance(event, LinkChanged):
            self._on_link(event)
        elif self.paused:
            if len(self.pending) == self.pending.maxlen:
                self.dropped_while_paused += 1
            self.pending.append(event)
        else:
            self._apply(event)
        self.version += 1

    def apply_all(self, events: list[Event] | tuple[Event, ...]) -> None:
        for event in events:
            self.apply(event)

    def pause(self) -> None:
        self.paused = True
        self.version += 1

    def resume(self) -> None:
        """Apply what arrived while paused, in arrival order."""
        self.paused = False
        while self.pending:
            self._apply(self.pending.popleft())
        self.version += 1

    def tick(self, now: float) -> None:
        self.now = now
        self.version += 1

    def acknowledge(self, seq: int) -> bool:
        for alert in self.alerts:
            if alert.seq == seq:
                alert.acknowledged = True
                alert.rev += 1
                self.alerts_rev += 1
                self.version += 1
                return True
        return False

    # ---- reading -------------------------------------------------------------------
    def visible_alerts(self, flt: AlertFilter = AlertFilter()) -> list[AlertRow]:
        """Newest first."""
        return [a for a in reversed(self.alerts) if flt.matches(a)]

    def alert(self, seq: int) -> AlertRow | None:
        return next((a for a in self.alerts if a.seq == seq), None)

    def round_rows(self) -> list[RoundRow]:
        """Newest first."""
        return sorted(
            self.rounds.values(), key=lambda r: (r.opened_ts or r.first_ts, r.round), reverse=True
        )

    def current_round(self, job: str) -> RoundRow | None:
        view = self.jobs.get(job)
        if view is None or view.current_round is None:
            return None
        return self.rounds.get((job, view.current_round))

    @property
    def unacknowledged(self) -> int:
        return sum(1 for a in self.alerts if not a.acknowledged and a.severity >= Severity.WARNING)

    # ---- internals -----------------------------------------------------------------
    def _on_link(self, event: LinkChanged) -> None:
        if event.link is not self.link:
            self.link = event.link
            self.link_since = event.ts
        self.link_detail = event.detail

    def _job(self, job: str) -> JobView:
        view = self.jobs.get(job)
        if view is None:
            view = self.jobs[job] = JobView(job)
        return view

    def _round(self, job: str, round_: int, ts: float) -> RoundRow:
        key = (job, round_)
        row = self.rounds.get(key)
        if row is None:
            row = self.rounds[key] = RoundRow(job, round_, first_ts=ts)
            while len(self.rounds) > MAX_ROUNDS:
                self.rounds.popitem(last=False)
        row.rev += 1
        self.rounds_rev += 1
        view = self._job(job)
        if view.current_round is None or round_ > view.current_round:
            view.current_round = round_
        return row

    def _client(self, client: str) -> ClientRow:
        row = self.clients.get(client)
        if row is None:
            row = self.clients[client] = ClientRow(client)
        row.rev += 1
        self.clients_rev += 1
        return row

    def _apply(self, event: FeedEvent) -> None:
        self.events_seen += 1
        handler = getattr(self, f"_on_{type(event).__name__}", None)
        if handler is not None:
            handler(event)

    def _on_JobDeclared(self, e: JobDeclared) -> None:
        view = self._job(e.job)
        if e.epsilon_budget is not None:
            view.epsilon_budget = e.epsilon_budget
        if e.rounds is not None:
            view.rounds_planned = e.rounds

    def _on_PrivacyGranted(self, e: PrivacyGranted) -> None:
        row = self._round(e.job, e.round, e.ts)
        row.epsilon_round = e.epsilon_round
        row.epsilon_total = e.epsilon_total
        view = self._job(e.job)
        view.epsilon_spent = max(view.epsilon_spent, e.epsilon_total)
        view.delta = e.delta
        view.coverage = e.coverage or view.coverage

    def _on_PrivacyDenied(self, e: PrivacyDenied) -> None:
        row = self._round(e.job, e.round, e.ts)
        row.advance("denied")
        view = self._job(e.job)
        view.denied = True
        view.epsilon_spent = max(view.epsilon_spent, e.epsilon_spent)
        view.epsilon_budget = e.budget
        view.coverage = e.coverage or view.coverage

    def _on_RoundOpened(self, e: RoundOpened) -> None:
        row = self._round(e.job, e.round, e.ts)
        row.opened_ts = e.ts if row.opened_ts is None else min(row.opened_ts, e.ts)
        row.deadline = e.deadline
        row.expected = len(e.participants)
        row.min_updates = e.min_updates
        row.rule = e.rule
        row.model_version = e.model_version
        row.advance("open")
        self._job(e.job).model_version = e.model_version

    def _on_UpdateAccepted(self, e: UpdateAccepted) -> None:
        row = self._round(e.job, e.round, e.ts)
        row.received.add(e.client)
        row.advance("collecting")
        client = self._client(e.client)
        client.updates += 1
        client.last_seen = max(client.last_seen or e.ts, e.ts)

    def _on_UpdateRejected(self, e: UpdateRejected) -> None:
        row = self._round(e.job, e.round, e.ts)
        row.rejected += 1
        client = self._client(e.client)
        client.rejected += 1
        client.last_seen = max(client.last_seen or e.ts, e.ts)
        if e.reason == "REVOKED":
            client.revoked = True

    def _on_RoundClosed(self, e: RoundClosed) -> None:
        row = self._round(e.job, e.round, e.ts)
        row.closed_ts = e.ts
        row.received |= set(e.clients)
        row.advance("closed")

    def _on_RoundVerdict(self, e: RoundVerdict) -> None:
        row = self._round(e.job, e.round, e.ts)
        row.kept = len(e.kept)
        row.flagged = tuple(sorted(f.client for f in e.flagged))
        row.verdict_ts = e.ts
        row.advance("verdict")
        key = (e.job, e.round)
        for name in e.kept:
            client = self._client(name)
            if key not in client._decided:
                client._decided.add(key)
                client.rounds_kept += 1
        for flag in e.flagged:
            client = self._client(flag.client)
            if flag.score == flag.score:  # NaN: a stored verdict without scores
                client.last_score = flag.score
            client.last_reasons = flag.reasons
            client.last_flag_round = max(client.last_flag_round or e.round, e.round)
            if key not in client._decided:
                client._decided.add(key)
                client.rounds_flagged += 1

    def _on_ModelPublished(self, e: ModelPublished) -> None:
        row = self._round(e.job, e.round, e.ts)
        row.published_ts = e.ts
        row.model_version = e.version
        if row.epsilon_total is None:  # DP off: no grant, the model says epsilon = inf
            row.epsilon_total = e.epsilon
        row.advance("published")
        if e.train:
            self._measured(row, "train", dict(e.train))
        view = self._job(e.job)
        view.model_version = max(view.model_version or 0, e.version)
        view.epsilon_spent = max(view.epsilon_spent, e.epsilon)

    def _on_MetricsEvaluated(self, e: MetricsEvaluated) -> None:
        row = self._round(e.job, e.round, e.ts)
        values = {"loss": e.loss, **e.metrics}
        if e.accuracy is not None:
            values["accuracy"] = e.accuracy
        self._measured(row, e.source, values)
        if e.accuracy is None:
            return
        view = self._job(e.job)
        if view.accuracy_source != e.source:
            if view.accuracy_source == "central":
                return  # the sparkline shows the central evaluation once there is one
            view.accuracy.clear()
            view.accuracy_source = e.source
        series = view.accuracy
        if any(v == e.model_version for v, _ in series):
            return
        series.append((e.model_version, e.accuracy))
        series.sort()
        del series[:-MAX_SERIES]

    def _on_AlertRaised(self, e: AlertRaised) -> None:
        if e.key:
            if e.key in self._alert_keys:
                return
            self._alert_keys[e.key] = None
            while len(self._alert_keys) > 4 * MAX_ALERTS:
                self._alert_keys.popitem(last=False)
        self._seq += 1
        self.alerts.append(
            AlertRow(
                seq=self._seq,
                ts=e.ts,
                severity=e.severity,
                kind=e.kind,
                job=e.job,
                round=e.round,
                reason=e.reason,
                client=e.client,
                detail=e.detail,
                source=e.source,
            )
        )
        self.alerts_rev += 1
        if e.job and e.job != "-":
            self._job(e.job)
        if e.client:
            client = self._client(e.client)
            if e.reason == "REVOKED":
                client.revoked = True

    def _on_RoundSnapshot(self, e: RoundSnapshot) -> None:
        row = self._round(e.job, e.round, e.ts)
        row.expected = max(row.expected, len(e.participants))
        row.received |= set(e.received)
        row.deadline = e.deadline if row.deadline is None else row.deadline
        row.rule = row.rule or e.rule
        if e.epsilon_total is not None:
            row.epsilon_total = e.epsilon_total
            view = self._job(e.job)
            view.epsilon_spent = max(view.epsilon_spent, e.epsilon_total)
        if e.model_version is not None:
            row.model_version = e.model_version
        if e.train:
            self._measured(row, "train", dict(e.train))
        if e.state in ROUND_STATES or e.state in FAILED_STATES:
            row.advance(e.state)
        if e.kept is not None:
            self._on_RoundVerdict(
                RoundVerdict(
                    e.job,
                    e.round,
                    e.ts,
                    kept=e.kept,
                    flagged=tuple(FlaggedClient(c, float("nan")) for c in e.flagged),
                )
            )

    def _measured(self, row: RoundRow, part: str, values: dict[str, float]) -> None:
        row.metrics[part] = values
        view = self._job(row.job)
        view.metrics_round = max(view.metrics_round or row.round, row.round)

    def _on_JobEnded(self, e: JobEnded) -> None:
        view = self._job(e.job)
        view.ended = e.reason
        row = self.rounds.get((e.job, e.round))
        if row is not None and row.state != "published":
            row.advance("ended")
            row.rev += 1
            self.rounds_rev += 1
