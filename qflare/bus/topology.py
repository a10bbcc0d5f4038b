"""QFLARE's exchanges, the services' durable queues, each job's streams and the dead-letter
queue helper (docs/architecture.md, "Processes" and "The data plane").

All exchanges are durable topic exchanges; adapters prefix every name with the bus prefix.
Routing keys are dotted words; alerts use ``<severity>.<kind>.<job>``.

Bulk bytes travel in three streams per job, written once and read by every service (and
participant) that needs them, each from its own offset:

* ``updates.<job>``: every client update (``update.<job>`` on ``qflare.client``);
* ``models.<job>``: every model version, with its tensors (``<job>.model.published`` on
  ``qflare.broadcast``);
* ``broadcast.<job>``: the small announcements participants follow (``<job>.round.opened``,
  ``<job>.job.ended`` on ``qflare.broadcast``).
"""

from __future__ import annotations

from qflare.bus.port import QueueSpec, StreamSpec

CLIENT = "qflare.client"
EVENTS = "qflare.events"
BROADCAST = "qflare.broadcast"
ALERTS = "qflare.alerts"
DEAD = "qflare.dead"

#: Every exchange a bus declares at connect, dead-letter exchange included.
EXCHANGES: tuple[str, ...] = (CLIENT, EVENTS, BROADCAST, ALERTS, DEAD)

#: The durable queues the services consume, each named after its service (a role's broker
#: permissions cover ``<role>`` and ``<role>.<suffix>``, :mod:`qflare.commands.broker`). Ingest
#: has none: it reads updates from each job's stream and round events from a transient
#: ``ingest.rounds.<replica>`` the broker drops with its connection.
AGGREGATOR_QUEUE = "aggregator"
DETECTOR_QUEUE = "detector"
ACCOUNTANT_QUEUE = "accountant"
ALERTING_QUEUE = "alerting"
#: Alerting's drain of ``qflare.dead`` (:func:`dead_letters`).
ALERTING_DEAD_QUEUE = "alerting.dead"
#: Every durable queue a service declares: what a run leaves on the broker besides its
#: exchanges and job streams (``examples/teardown.py`` and the tests' clean-ups delete them).
SERVICE_QUEUES: tuple[str, ...] = (
    AGGREGATOR_QUEUE,
    DETECTOR_QUEUE,
    ACCOUNTANT_QUEUE,
    ALERTING_QUEUE,
    ALERTING_DEAD_QUEUE,
)

#: Reasons a message reaches ``qflare.dead`` (the ``x-death`` reasons RabbitMQ uses).
DEATH_REJECTED = "rejected"
DEATH_DELIVERY_LIMIT = "delivery_limit"


#: Retention of a job's streams (the aggregator deletes them when the job ends).
UPDATE_RETENTION_S = 24 * 3600
MODEL_RETENTION_S = 7 * 24 * 3600
STREAM_MAX_BYTES = 8 * 2**30
BROADCAST_MAX_BYTES = 64 * 2**20
#: A stream reader waiting for something (an ingest verdict) is called again this soon.
STREAM_RETRY_DELAY = 0.05


def service_user(role: str, prefix: str = "") -> str:
    """The broker user of a service role in the federation whose names carry ``prefix``:
    ``<prefix>qflare-<role>`` (``qflare broker-definitions`` writes it; a service whose broker
    URL names no user logs in as it). The prefix keeps two federations on one broker from
    overwriting each other's users (broker users are global, not per vhost); a client's user
    is its id, which the federation chose (``qflare provision --client-prefix``)."""
    return f"{prefix}qflare-{role}"


def update_stream(job: str) -> StreamSpec:
    """The job's update stream: each client update written once, read by ingest (which
    checks it), the detector and the aggregator (which use it once ingest accepted it)."""
    return _job_stream(f"updates.{job}", ((CLIENT, f"update.{job}"),), UPDATE_RETENTION_S)


def model_stream(job: str) -> StreamSpec:
    """The job's model stream: each global model version written once, with its tensors;
    ``round.opened`` names the offset of the version a round trains on."""
    return _job_stream(f"models.{job}", ((BROADCAST, f"{job}.model.published"),), MODEL_RETENTION_S)


def broadcast_stream(job: str) -> StreamSpec:
    """The job's announcements to participants (``round.opened``, ``job.ended``): a
    participant that starts late reads the newest one and joins the open round."""
    return _job_stream(
        f"broadcast.{job}",
        ((BROADCAST, f"{job}.round.opened"), (BROADCAST, f"{job}.job.ended")),
        MODEL_RETENTION_S,
        BROADCAST_MAX_BYTES,
    )


def _job_stream(
    name: str,
    bindings: tuple[tuple[str, str], ...],
    max_age_s: int,
    max_bytes: int = STREAM_MAX_BYTES,
) -> StreamSpec:
    return StreamSpec(
        name,
        bindings=bindings,
        max_age_s=max_age_s,
        max_bytes=max_bytes,
        retry_delay=STREAM_RETRY_DELAY,
    )


def job_streams(job: str) -> tuple[StreamSpec, ...]:
    return (update_stream(job), model_stream(job), broadcast_stream(job))


def dead_letters(name: str = "dead-letters", pattern: str = "#") -> QueueSpec:
    """The queue that drains ``qflare.dead``. Dead-lettered messages keep their original
    routing key, so ``pattern`` can select e.g. ``"update.#"``. It does not dead-letter
    itself: a message its consumer rejects is dropped, which stops loops."""
    return QueueSpec(name=name, bindings=((DEAD, pattern),), dead_letter=False)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more words."""
    return _match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    # Dynamic programming over (pattern position, word position); patterns are short.
    reachable = {0}
    for token in pattern:
        nxt: set[int] = set()
        for i in reachable:
            if token == "#":
                nxt.update(range(i, len(words) + 1))
            elif i < len(words) and (token == "*" or token == words[i]):
                nxt.add(i + 1)
        if not nxt:
            return False
        reachable = nxt
    return len(words) in reachable
