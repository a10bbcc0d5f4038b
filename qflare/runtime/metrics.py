"""Every Prometheus metric QFLARE exports, in one place (``prometheus_client``'s default
registry, served on ``/metrics`` by :mod:`qflare.runtime.health`).

Services call the small functions below; the shared runtime records most of it by itself:
the handler wrapper (:class:`qflare.runtime.service.Service`: latency, outcome, in-flight,
message age, rejections, storage faults), the publish path
(:func:`qflare.runtime.envelopes.emit`) and the SQLite helper
(:class:`qflare.runtime.sqlite.Database`). Pure cores (``services/*/core.py``,
``qflare.robust``, ``qflare.privacy``, ``qflare.messages``) never import this module.

Every metric carries a ``service`` label, so the single registry of an in-process run
(``qflare up`` on ``memory://``, ``qflare simulate``, tests) reads like one scrape per
service. Label values stay bounded: service names, message kinds (the registered ones),
:class:`~qflare.messages.errors.Reason` codes, round states, outcomes, job ids (configured
or submitted by the operator; the label is ``job_id``, since Prometheus gives every scraped
series a ``job`` label of its own); never a client id, a routing key or anything a sender
chooses. :data:`METRICS` lists them all (README, "Metrics and health", shows the same list;
a unit test keeps the two together).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
_AGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# -- every service: readiness, handlers, publishes, store -------------------------------------
SERVICE_READY = Gauge(
    "qflare_service_ready",
    "1 once the service consumes its queues, 0 while it starts or stops",
    ["service"],
)
HANDLER_SECONDS = Histogram(
    "qflare_handler_seconds",
    "Time one delivery spends in the service's handler (opening and verifying the envelope "
    "included), by message kind (for a raw consumer: its queue or stream) and outcome "
    "(ack, reject, retry, held: its store failed, error: a handler bug)",
    ["service", "kind", "outcome"],
    buckets=_LATENCY_BUCKETS,
)
HANDLERS_IN_FLIGHT = Gauge(
    "qflare_handlers_in_flight",
    "Deliveries being handled now (held ones included: a failing store keeps them)",
    ["service"],
)
MESSAGE_AGE_SECONDS = Histogram(
    "qflare_message_age_seconds",
    "Lag of a queue or stream: from the envelope's signed timestamp to the moment its "
    "handler got it (grows when a service falls behind; clocks of other hosts count)",
    ["service", "kind"],
    buckets=_AGE_BUCKETS,
)
MESSAGES_REJECTED = Counter(
    "qflare_messages_rejected",
    "Deliveries a service refused (typed MessageRejected), by reason code",
    ["service", "reason"],
)
MESSAGES_PUBLISHED = Counter(
    "qflare_messages_published",
    "Signed envelopes a service published, by kind",
    ["service", "kind"],
)
STORAGE_FAULTS = Counter(
    "qflare_storage_faults",
    "Handler attempts that failed because the service's own store (disk, SQLite) failed; "
    "the message is held and retried",
    ["service"],
)
STORE_SECONDS = Histogram(
    "qflare_store_seconds",
    "SQLite time of the service's store: op=transaction (BEGIN IMMEDIATE to COMMIT, the "
    "fsync included), write (one autocommit statement), read (one query)",
    ["service", "op"],
    buckets=_STORE_BUCKETS,
)

_Metric = TypeVar("_Metric", Counter, Gauge)


def _per_job(kind: type[_Metric], name: str, documentation: str, *labels: str) -> _Metric:
    """A metric of each job a service runs: labelled ``service``, ``job_id``, then ``labels``."""
    return kind(name, documentation, ["service", "job_id", *labels])


# -- aggregator -------------------------------------------------------------------------------
ROUNDS = _per_job(
    Counter,
    "qflare_rounds",
    "Rounds that entered each state (requested, open, closed, published; denied and "
    "aborted end the job), per job",
    "state",
)
ROUND = _per_job(Gauge, "qflare_round", "The latest round of each job that changed state")

# -- ingest -----------------------------------------------------------------------------------
UPDATES_ACCEPTED = _per_job(
    Counter,
    "qflare_updates_accepted",
    "Client updates ingest accepted (update.accepted published), per job",
)
UPDATES_REJECTED = _per_job(
    Counter,
    "qflare_updates_rejected",
    "Client updates ingest refused, per job and reason code (every refusal, also one not "
    "reported one by one)",
    "reason",
)

# -- detector ---------------------------------------------------------------------------------
VERDICTS = _per_job(Counter, "qflare_verdicts", "Round verdicts the detector decided, per job")
UPDATES_KEPT = _per_job(Counter, "qflare_updates_kept", "Updates a verdict kept, per job")
CLIENTS_FLAGGED = _per_job(
    Counter,
    "qflare_clients_flagged",
    "Updates a verdict flagged (one per flagged client and round), per job",
)
CLIENTS_QUARANTINED = _per_job(
    Counter, "qflare_clients_quarantined", "Clients a verdict put in quarantine, per job"
)

# -- accountant -------------------------------------------------------------------------------
EPSILON_SPENT = _per_job(
    Gauge, "qflare_epsilon_spent", "Privacy loss (epsilon, PLD accounting) spent by each job so far"
)
EPSILON_BUDGET = _per_job(Gauge, "qflare_epsilon_budget", "Each job's epsilon budget")
PRIVACY_DECISIONS = _per_job(
    Counter,
    "qflare_privacy_decisions",
    "Privacy requests decided (decision=granted or denied), per job; a repeated request "
    "answered from the ledger is not counted",
    "decision",
)

# -- alerting ---------------------------------------------------------------------------------
ALERTS = Counter(
    "qflare_alerts",
    "Alerts alerting decided on, by severity and action (publish, duplicate, rate_limited)",
    ["service", "severity", "action"],
)
DEAD_LETTERS = Counter(
    "qflare_dead_letters",
    "Messages drained from the dead-letter exchange, by death reason (rejected, "
    "delivery_limit, other)",
    ["service", "reason"],
)

#: Every QFLARE metric, by its exposed name (counters gain ``_total`` in the exposition).
METRICS: dict[str, MetricWrapperBase] = {
    m._name: m
    for m in (
        SERVICE_READY,
        HANDLER_SECONDS,
        HANDLERS_IN_FLIGHT,
        MESSAGE_AGE_SECONDS,
        MESSAGES_REJECTED,
        MESSAGES_PUBLISHED,
        STORAGE_FAULTS,
        STORE_SECONDS,
        ROUNDS,
        ROUND,
        UPDATES_ACCEPTED,
        UPDATES_REJECTED,
        VERDICTS,
        UPDATES_KEPT,
        CLIENTS_FLAGGED,
        CLIENTS_QUARANTINED,
        EPSILON_SPENT,
        EPSILON_BUDGET,
        PRIVACY_DECISIONS,
        ALERTS,
        DEAD_LETTERS,
    )
}

_DEATH_REASONS = frozenset({"rejected", "delivery_limit"})


# -- what the runtime and the services call -----------------------------------------------------
def set_ready(service: str, ready: bool) -> None:
    SERVICE_READY.labels(service).set(1 if ready else 0)


@contextlib.contextmanager
def in_flight(service: str) -> Iterator[None]:
    gauge = HANDLERS_IN_FLIGHT.labels(service)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def handled(service: str, kind: str, outcome: str, seconds: float) -> None:
    HANDLER_SECONDS.labels(service, kind, outcome).observe(seconds)


def message_age(service: str, kind: str, ts_ms: int, now: float | None = None) -> None:
    """The age of an envelope signed at ``ts_ms`` (milliseconds) when its handler got it."""
    now = time.time() if now is None else now
    MESSAGE_AGE_SECONDS.labels(service, kind).observe(max(0.0, now - ts_ms / 1000.0))


def rejected(service: str, reason: str) -> None:
    MESSAGES_REJECTED.labels(service, reason).inc()


def published(service: str, kind: str) -> None:
    MESSAGES_PUBLISHED.labels(service, kind).inc()


def storage_fault(service: str) -> None:
    STORAGE_FAULTS.labels(service).inc()


@contextlib.contextmanager
def store_timer(service: str, op: str) -> Iterator[None]:
    """Times the block as ``qflare_store_seconds{service, op}`` (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        STORE_SECONDS.labels(service, op).observe(time.perf_counter() - start)


def round_entered(service: str, job: str, round_no: int, state: str) -> None:
    ROUNDS.labels(service, job, state).inc()
    ROUND.labels(service, job).set(round_no)


def update_accepted(service: str, job: str) -> None:
    UPDATES_ACCEPTED.labels(service, job).inc()


def update_rejected(service: str, job: str, reason: str) -> None:
    UPDATES_REJECTED.labels(service, job, reason).inc()


def verdict(service: str, job: str, *, kept: int, flagged: int, quarantined: int) -> None:
    VERDICTS.labels(service, job).inc()
    UPDATES_KEPT.labels(service, job).inc(kept)
    CLIENTS_FLAGGED.labels(service, job).inc(flagged)
    CLIENTS_QUARANTINED.labels(service, job).inc(quarantined)


def epsilon(service: str, job: str, spent: float, budget: float) -> None:
    EPSILON_SPENT.labels(service, job).set(spent)
    EPSILON_BUDGET.labels(service, job).set(budget)


def privacy_decision(service: str, job: str, *, granted: bool, spent: float, budget: float) -> None:
    PRIVACY_DECISIONS.labels(service, job, "granted" if granted else "denied").inc()
    epsilon(service, job, spent, budget)


def alert(service: str, severity: str, action: str) -> None:
    ALERTS.labels(service, severity, action).inc()


def dead_letter(service: str, reason: str | None) -> None:
    DEAD_LETTERS.labels(service, reason if reason in _DEATH_REASONS else "other").inc()
