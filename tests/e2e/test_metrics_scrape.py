"""Every service's ``/metrics`` during a job over RabbitMQ, services as OS processes.

One job (3 rounds, 10 clients of which 3 Byzantine, detection and DP on) through the e2e
harness. When round 2 opens the test scrapes each service's ``/metrics`` (the address is in
its ``serve.ready`` log event), writes a malformed and a forged update into the job's update
stream, and scrapes again when ``job.ended`` is published, before the services stop. The
exposition is parsed with Prometheus' own parser; the counters must have moved, and agree
with what the services published on the bus: updates accepted, updates rejected by reason,
epsilon spent, rounds by state, verdicts and flags, alerts, handler latency, store latency.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from e2e_harness import (
    BYZANTINE,
    PARTICIPANTS,
    NumpyParticipant,
    Recorder,
    Scenario,
    initial_model,
    require_broker,
    run_scenario,
    write_initial_model,
)
from prometheus_client.parser import text_string_to_metric_families

from qflare.bus import Bus, topology
from qflare.crypto import Federation
from qflare.messages import encode

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.timeout(300)]

JOB = "metered"
ROUNDS = 3
SERVICES = ("alerting", "accountant", "detector", "ingest-a", "aggregator")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """``url``/metrics, parsed by prometheus_client's parser: (sample, labels) -> value."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{url}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def metrics_urls(root: Path) -> dict[str, str]:
    """Each running service's /metrics address, from its serve.ready log event."""
    urls = {}
    for key in SERVICES:
        for line in (root / "logs" / f"{key}-1.log").read_text().splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                if rec.get("event") == "serve.ready":
                    urls[key] = rec["metrics"]
    assert sorted(urls) == sorted(SERVICES), urls
    return urls


async def scrape_all(root: Path) -> dict[str, Samples]:
    urls = metrics_urls(root)
    return {key: await asyncio.to_thread(scrape, url) for key, url in urls.items()}


def job(root: Path) -> dict[str, Any]:
    return {
        "job_id": JOB,
        "rounds": ROUNDS,
        "participants": list(PARTICIPANTS),
        "rule": "nnm+multikrum",
        "f": 3,
        "detection": True,
        "sample_rate": 1.0,
        "noise_multiplier": 1.5,
        "clip": 2.0,
        "delta": 1e-5,
        "epsilon_budget": 50.0,
        "min_updates": 7,
        "deadline_s": 90.0,
        "seed": 7,
        "initial_model": str(write_initial_model(root / "model0.safetensors")),
    }


def test_each_service_exports_counters_that_move_during_a_job(
    e2e_federation: Federation, tmp_path: Path
) -> None:
    amqp = os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
    require_broker(amqp)
    root = tmp_path / "run"
    root.mkdir()
    scrapes: dict[str, dict[str, Samples]] = {}

    async def hostile(
        round_no: int,
        clients: dict[str, NumpyParticipant],
        bus: Bus,
        recorder: Recorder,
        sent: dict[str, bytes],
    ) -> None:
        scrapes["during"] = await scrape_all(root)
        kit = clients["client-000"].kit
        zeros = {k: np.zeros_like(v) for k, v in initial_model().items()}
        honest = encode(
            "update",
            {"base_version": round_no - 1, "num_samples": 48, "tensors": zeros},
            kit.identity,
            job=JOB,
            round=round_no,
            seal_to=kit.ingest_cert,
        )
        fields = msgpack.unpackb(honest, raw=False)
        body = bytearray(fields["body"])
        body[len(body) // 2] ^= 0x01  # tampered ciphertext under a recomputed digest
        fields["body"] = bytes(body)
        fields["body_digest"] = hashlib.sha256(body).digest()
        sent["forged"] = msgpack.packb(fields, use_bin_type=True)
        sent["malformed"] = b"\xc1 not an envelope"
        for name in ("forged", "malformed"):
            await bus.publish(topology.CLIENT, f"update.{JOB}", sent[name])

        async def at_end(kind: str, _round: int, _body: Any) -> None:
            if kind == "job.ended" and "end" not in scrapes:
                scrapes["end"] = {}  # once, however often job.ended is seen
                scrapes["end"] = await scrape_all(root)

        recorder.hooks.append(at_end)

    scenario = Scenario(
        "metrics", hostile_round=2, hostile=hostile, hold_client="client-006", timeout=200
    )
    prefix = f"e2e-metrics-{uuid.uuid4().hex[:8]}-"
    result = asyncio.run(
        run_scenario(
            e2e_federation,
            root,
            amqp,
            prefix,
            job(root),
            PARTICIPANTS,
            BYZANTINE,
            scenario,
            {"aggregator": {"reopen_interval_s": 1.0}},
        )
    )
    assert result.end_reason == "completed"
    during, end = scrapes["during"], scrapes["end"]
    assert sorted(end) == sorted(SERVICES)
    rec = result.recorder

    # every service: ready, handled deliveries (latency observed), published envelopes
    names = {"ingest-a": "ingest"}
    for key in SERVICES:
        service = names.get(key, key)
        assert total(end[key], "qflare_service_ready", service=service) == 1, key
        for name in ("qflare_handler_seconds_count", "qflare_messages_published_total"):
            assert total(end[key], name, service=service) > total(during[key], name), (key, name)
        assert total(end[key], "qflare_handler_seconds_sum", service=service) > 0, key
        assert total(end[key], "qflare_handlers_in_flight", service=service) >= 0, key
    # the stores' SQLite time, for each service that has a store
    for key in ("alerting", "accountant", "detector", "aggregator"):
        name = "qflare_store_seconds_count"
        assert total(end[key], name, service=key, op="transaction") > total(
            during[key], name, service=key, op="transaction"
        ), key

    # ingest: updates accepted, and rejected by reason code, as it told the services
    ingest_during, ingest_end = during["ingest-a"], end["ingest-a"]
    accepted = total(ingest_end, "qflare_updates_accepted_total", job_id=JOB)
    assert accepted > total(ingest_during, "qflare_updates_accepted_total", job_id=JOB) > 0
    assert accepted == len(rec.of("update.accepted"))
    published_rejections = Counter(str(b.reason) for _r, b in rec.of("update.rejected"))
    assert {"MALFORMED", "BAD_SIGNATURE"} <= set(published_rejections), published_rejections
    for reason, count in published_rejections.items():
        assert (
            total(ingest_end, "qflare_updates_rejected_total", job_id=JOB, reason=reason) == count
        )
        assert (
            total(ingest_during, "qflare_updates_rejected_total", job_id=JOB, reason=reason) < count
        )
        assert (
            total(ingest_end, "qflare_messages_rejected_total", service="ingest", reason=reason)
            >= count
        )
    assert total(ingest_end, "qflare_message_age_seconds_count", kind="update") >= accepted

    # accountant: epsilon per job, the figure it granted last
    acc_during, acc_end = during["accountant"], end["accountant"]
    grants = [b.epsilon_total for _r, b in sorted(rec.of("privacy.granted"), key=lambda x: x[0])]
    spent = total(acc_end, "qflare_epsilon_spent", job_id=JOB)
    assert spent > total(acc_during, "qflare_epsilon_spent", job_id=JOB) > 0
    assert spent == pytest.approx(grants[-1])
    assert total(acc_end, "qflare_epsilon_budget", job_id=JOB) == 50.0
    assert (
        total(acc_end, "qflare_privacy_decisions_total", job_id=JOB, decision="granted") == ROUNDS
    )

    # aggregator: rounds by state
    agg_during, agg_end = during["aggregator"], end["aggregator"]
    for state in ("requested", "open", "closed", "published"):
        assert total(agg_end, "qflare_rounds_total", job_id=JOB, state=state) == ROUNDS, state
    assert total(agg_during, "qflare_rounds_total", job_id=JOB, state="published") == 1
    assert total(agg_during, "qflare_rounds_total", job_id=JOB, state="open") == 2
    assert total(agg_end, "qflare_round", job_id=JOB) == ROUNDS

    # detector: a verdict per round, the Byzantine clients flagged
    det_during, det_end = during["detector"], end["detector"]
    assert total(det_end, "qflare_verdicts_total", job_id=JOB) == ROUNDS
    assert total(det_during, "qflare_verdicts_total", job_id=JOB) == 1
    flags = flagged_updates(rec)
    assert flags > 0
    assert total(det_end, "qflare_clients_flagged_total", job_id=JOB) == flags

    # alerting: the rejections and flags became alerts
    assert total(end["alerting"], "qflare_alerts_total") > total(
        during["alerting"], "qflare_alerts_total"
    )


def flagged_updates(rec: Recorder) -> int:
    """Flagged updates over the job's verdicts (a verdict re-published counts once)."""
    by_round = {r: len(b.flagged) for r, b in rec.of("round.verdict")}
    return sum(by_round.values())
