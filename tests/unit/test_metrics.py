"""qflare.runtime.metrics: what the shared runtime records by itself (the handler wrapper,
the publish path, the SQLite helper), the services' small functions, the exposition as
Prometheus parses it, and the promises of the module (names, labels, docs, pure cores)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from qflare.bus import Delivery, QueueSpec, connect_bus, topology
from qflare.crypto import Federation, provision
from qflare.messages import Envelope, MessageRejected, Reason, RoundVerdict
from qflare.runtime import Consumer, Database, Service, ServiceContext, load_settings, metrics
from qflare.runtime.envelopes import emit
from qflare.runtime.health import HealthServer

ROOT = Path(__file__).resolve().parents[2]


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return provision(tmp_path_factory.mktemp("pki"), clients=1)


class Metered(Service):
    """A routed consumer (dispatch by kind) and a raw one, through the real wrapper."""

    name = "metered"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.verdicts: list[int] = []
        self.raw: list[bytes] = []
        self.store_failures = 1

    def consumers(self) -> list[Consumer]:
        return [
            Consumer(
                QueueSpec("metered", bindings=((topology.EVENTS, "round.verdict.*"),)),
                routes={RoundVerdict: self.on_verdict},
            ),
            Consumer(
                QueueSpec("metered.raw", bindings=((topology.EVENTS, "raw.*"),)),
                handler=self.on_raw,
            ),
        ]

    async def on_verdict(self, env: Envelope[RoundVerdict]) -> None:
        if env.round == 13:
            raise MessageRejected(Reason.STALE_ROUND, "round 13 is never open")
        self.verdicts.append(env.round)

    async def on_raw(self, delivery: Delivery) -> None:
        if self.store_failures:
            self.store_failures -= 1
            raise sqlite3.OperationalError("disk I/O error")
        self.raw.append(delivery.body)


async def _until(predicate: object, what: str) -> None:
    for _ in range(500):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_the_wrapper_and_the_publish_path_record_every_delivery(
    federation: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("qflare.runtime.service.STORAGE_RETRY_S", (0.01, 0.05))
    s = "metered"
    before = {
        "ack": value(
            "qflare_handler_seconds_count", service=s, kind="round.verdict", outcome="ack"
        ),
        "stale": value(
            "qflare_handler_seconds_count", service=s, kind="round.verdict", outcome="reject"
        ),
        "garbled": value(
            "qflare_handler_seconds_count", service=s, kind="metered", outcome="reject"
        ),
        "held": value(
            "qflare_handler_seconds_count", service=s, kind="metered.raw", outcome="held"
        ),
        "raw": value("qflare_handler_seconds_count", service=s, kind="metered.raw", outcome="ack"),
        "malformed": value("qflare_messages_rejected_total", service=s, reason="MALFORMED"),
        "stale_reason": value("qflare_messages_rejected_total", service=s, reason="STALE_ROUND"),
        "age": value("qflare_message_age_seconds_count", service=s, kind="round.verdict"),
        "published": value("qflare_messages_published_total", service=s, kind="round.verdict"),
        "faults": value("qflare_storage_faults_total", service=s),
    }
    bus = await connect_bus("memory://metrics")
    ctx = ServiceContext(
        name=s,
        settings=load_settings(None, env={}, data_dir=str(tmp_path)),
        bus=bus,
        identity=federation.identity("detector"),
        trust=federation.trust(),
        data_dir=tmp_path,
    )
    svc = Metered(ctx)
    await svc.start()
    try:
        for round_no in (1, 2, 13):
            await emit(
                svc, "round.verdict", {"kept": ["a"], "flagged": []}, job="j", round=round_no
            )
        await bus.publish(topology.EVENTS, "round.verdict.j", b"\xc1 not an envelope")
        await bus.publish(topology.EVENTS, "raw.j", b"r1")
        await _until(lambda: len(svc.verdicts) == 2 and svc.raw == [b"r1"], "deliveries")
        await _until(
            lambda: (
                value("qflare_messages_rejected_total", service=s, reason="MALFORMED")
                > before["malformed"]
            ),
            "the garbled message settled",
        )
    finally:
        await svc.stop()
        await bus.close()

    def grew(key: str, name: str, **labels: str) -> float:
        return value(name, service=s, **labels) - before[key]

    assert grew("ack", "qflare_handler_seconds_count", kind="round.verdict", outcome="ack") == 2
    # a verdict the handler refuses carries its kind; bytes that never opened, the queue's
    assert (
        grew("stale", "qflare_handler_seconds_count", kind="round.verdict", outcome="reject") == 1
    )
    assert grew("garbled", "qflare_handler_seconds_count", kind="metered", outcome="reject") == 1
    assert grew("stale_reason", "qflare_messages_rejected_total", reason="STALE_ROUND") == 1
    assert grew("malformed", "qflare_messages_rejected_total", reason="MALFORMED") == 1
    # the store failed once: that attempt was held, the next one acknowledged
    assert grew("held", "qflare_handler_seconds_count", kind="metered.raw", outcome="held") == 1
    assert grew("raw", "qflare_handler_seconds_count", kind="metered.raw", outcome="ack") == 1
    assert grew("faults", "qflare_storage_faults_total") == 1
    assert grew("age", "qflare_message_age_seconds_count", kind="round.verdict") == 3
    assert grew("published", "qflare_messages_published_total", kind="round.verdict") == 3
    assert value("qflare_handlers_in_flight", service=s) == 0
    assert value("qflare_handler_seconds_sum", service=s, kind="round.verdict", outcome="ack") > 0


async def test_the_sqlite_helper_times_transactions_writes_and_reads(tmp_path: Path) -> None:
    name = "metered-store"
    ops = ("transaction", "write", "read")
    before = {op: value("qflare_store_seconds_count", service=name, op=op) for op in ops}
    db = await Database.open(tmp_path / "x.sqlite", "CREATE TABLE t (k INTEGER)", name=name)
    try:
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(sqlite3.IntegrityError):
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO t VALUES (2)")
                raise sqlite3.IntegrityError("rolled back")
        await db.execute("INSERT INTO t VALUES (3)")
        rows = await db.fetchall("SELECT k FROM t ORDER BY k")
        assert [r[0] for r in rows] == [1, 3]
        assert await db.fetchone("SELECT k FROM t WHERE k = 3") is not None
    finally:
        await db.close()
    grew = {op: value("qflare_store_seconds_count", service=name, op=op) - before[op] for op in ops}
    # the schema's transaction, the committed one and the rolled-back one
    assert grew == {"transaction": 3, "write": 1, "read": 2}
    # a store named after its file by default
    other = await Database.open(tmp_path / "detector-like.sqlite")
    assert other.name == "detector-like"
    await other.close()


def test_service_functions_label_by_service_job_and_reason() -> None:
    metrics.round_entered("agg-t", "job-a", 3, "published")
    metrics.round_entered("agg-t", "job-a", 4, "requested")
    assert value("qflare_rounds_total", service="agg-t", job_id="job-a", state="published") == 1
    assert value("qflare_round", service="agg-t", job_id="job-a") == 4

    metrics.update_accepted("ing-t", "job-a")
    metrics.update_rejected("ing-t", "job-a", Reason.BAD_SIGNATURE.value)
    metrics.update_rejected("ing-t", "job-a", Reason.BAD_SIGNATURE.value)
    assert value("qflare_updates_accepted_total", service="ing-t", job_id="job-a") == 1
    assert (
        value(
            "qflare_updates_rejected_total", service="ing-t", job_id="job-a", reason="BAD_SIGNATURE"
        )
        == 2
    )

    metrics.verdict("det-t", "job-a", kept=7, flagged=3, quarantined=1)
    assert value("qflare_verdicts_total", service="det-t", job_id="job-a") == 1
    assert value("qflare_updates_kept_total", service="det-t", job_id="job-a") == 7
    assert value("qflare_clients_flagged_total", service="det-t", job_id="job-a") == 3
    assert value("qflare_clients_quarantined_total", service="det-t", job_id="job-a") == 1

    metrics.privacy_decision("acc-t", "job-a", granted=True, spent=2.75, budget=5.5)
    metrics.privacy_decision("acc-t", "job-a", granted=False, spent=2.75, budget=5.5)
    assert value("qflare_epsilon_spent", service="acc-t", job_id="job-a") == 2.75
    assert value("qflare_epsilon_budget", service="acc-t", job_id="job-a") == 5.5
    assert (
        value("qflare_privacy_decisions_total", service="acc-t", job_id="job-a", decision="denied")
        == 1
    )

    metrics.alert("alr-t", "warning", "publish")
    metrics.dead_letter("alr-t", "delivery_limit")
    metrics.dead_letter("alr-t", "x" * 300)  # whatever a header says: one bounded label
    metrics.dead_letter("alr-t", None)
    assert value("qflare_alerts_total", service="alr-t", severity="warning", action="publish") == 1
    assert value("qflare_dead_letters_total", service="alr-t", reason="delivery_limit") == 1
    assert value("qflare_dead_letters_total", service="alr-t", reason="other") == 2

    # a signed timestamp from the future (clock skew) is no negative lag
    metrics.message_age("age-t", "update", ts_ms=2_000_000, now=1_000.0)
    metrics.message_age("age-t", "update", ts_ms=1_000_000, now=1_002.5)
    assert value("qflare_message_age_seconds_sum", service="age-t", kind="update") == 2.5


async def test_metrics_endpoint_serves_an_exposition_prometheus_parses() -> None:
    metrics.update_rejected("ing-http", "job-h", Reason.MALFORMED.value)
    health = HealthServer(["ing-http"], "127.0.0.1", 0)
    await health.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", health.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        data = await reader.read()
        writer.close()
    finally:
        await health.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"200"
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    rejected = families["qflare_updates_rejected"]
    assert rejected.type == "counter"
    assert any(
        s.name == "qflare_updates_rejected_total"
        and s.labels == {"service": "ing-http", "job_id": "job-h", "reason": "MALFORMED"}
        and s.value == 1
        for s in rejected.samples
    )
    assert families["qflare_handler_seconds"].type == "histogram"
    assert families["qflare_service_ready"].type == "gauge"


def test_every_metric_is_named_documented_and_labelled_by_service() -> None:
    assert metrics.METRICS, "no metrics defined"
    for name, metric in metrics.METRICS.items():
        assert re.fullmatch(r"qflare_[a-z_]+", name), name
        assert len(metric._documentation) > 20, name
        labels = metric._labelnames
        assert labels[0] == "service", (name, labels)
        assert not {"client", "sender", "routing_key"} & set(labels), (name, labels)
        # Prometheus' own target labels would rename ours to exported_job/exported_instance
        assert not {"job", "instance"} & set(labels), (name, labels)
    exposed = {n: f"{n}_total" if isinstance(m, Counter) else n for n, m in metrics.METRICS.items()}
    text = generate_latest(REGISTRY).decode()
    for name in exposed:
        assert f"# HELP {name}" in text or f"# HELP {name}_total" in text, name
    # README's list names every metric (and nothing that does not exist)
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Metrics and health", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(qflare_[a-z_]+)", section))
    assert listed == set(exposed.values()), (
        sorted(set(exposed.values()) - listed),
        sorted(listed - set(exposed.values())),
    )


def test_pure_cores_do_not_import_prometheus() -> None:
    pure = [
        *ROOT.glob("services/*/core.py"),
        *(ROOT / "qflare" / "robust").rglob("*.py"),
        *(ROOT / "qflare" / "privacy").rglob("*.py"),
        *(ROOT / "messages").rglob("*.py"),
    ]
    assert len(pure) > 10
    offenders = [
        str(p.relative_to(ROOT))
        for p in pure
        if re.search(
            r"^\s*(from|import)\s+(prometheus_client|qflare\.runtime)", p.read_text(), re.M
        )
    ]
    assert offenders == []
