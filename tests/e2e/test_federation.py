"""A whole federated job over the real RabbitMQ, services as separate OS processes.

Two runs of the same job (same seeds) are shared by the tests below:

* ``clean_run``: two ingest replicas, 10 clients of which 3 Byzantine, hostile traffic in
  round 2 (forged, replayed from round 1, duplicated, oversized, malformed, revoked client);
* ``crash_run``: one ingest, no hostile traffic, and ``kill -9`` of the aggregator, the
  detector and the accountant inside rounds, each restarted.

The model each run ends with must be identical bit for bit: hostile traffic changed
nothing, and the crashes lost no update and charged no round twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from e2e_harness import (
    BYZANTINE,
    PARTICIPANTS,
    REVOKED,
    NumpyParticipant,
    Recorder,
    RunResult,
    Scenario,
    initial_model,
    require_broker,
    run_scenario,
    train_delta,
    write_initial_model,
)

from qflare.bus import Bus, topology
from qflare.client import Kit
from qflare.crypto import Federation
from qflare.messages import encode
from qflare.messages.tensors import model_digest

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.timeout(400)]

ROUNDS = 6
BUDGET = 5.5  # with z=1.5, q=1, delta=1e-5 the PLD epsilon is 2.75, 4.09, 5.17, 6.13, ...


def job(root: Path) -> dict[str, Any]:
    return {
        "job_id": "e2e",
        "rounds": ROUNDS,
        "participants": list(PARTICIPANTS),
        "rule": "nnm+multikrum",
        "f": 3,
        "detection": True,
        "sample_rate": 1.0,
        "noise_multiplier": 1.5,
        "clip": 2.0,
        # adaptive clipping: each round's clip comes from the previous round's stored
        # aggregation, so the crashes below must carry it too (sum noise z_delta = 2.27)
        "adaptive_clip": True,
        "clip_count_noise_std": 1.0,
        "delta": 1e-5,
        "epsilon_budget": BUDGET,
        "min_updates": 7,
        "deadline_s": 90.0,
        "seed": 20261127,
        "initial_model": str(write_initial_model(root / "model0.safetensors")),
    }


OPTIONS = {"aggregator": {"reopen_interval_s": 1.0}}
HOSTILE_REASONS = {"BAD_SIGNATURE", "STALE_ROUND", "DUPLICATE", "TOO_LARGE", "MALFORMED", "REVOKED"}


async def hostile(
    round_no: int,
    clients: dict[str, NumpyParticipant],
    bus: Bus,
    recorder: Recorder,
    sent: dict[str, bytes],
) -> None:
    """Six bad messages while round ``round_no`` is open (one honest client is held back
    until all six are rejected, so the round is still open for each)."""
    fed_kit = clients["client-000"].kit
    base = initial_model()  # only shapes matter for the bad messages below
    zeros = {k: np.zeros_like(v) for k, v in base.items()}

    def update(cid: str, r: int, tensors: dict[str, np.ndarray]) -> bytes:
        kit = clients[cid].kit if cid in clients else Kit.load(fed_kit_dir(cid))
        return encode(
            "update",
            {"base_version": r - 1, "num_samples": 48, "tensors": tensors},
            kit.identity,
            job="e2e",
            round=r,
            seal_to=fed_kit.ingest_cert,
        )

    def fed_kit_dir(cid: str) -> Path:
        folder = clients["client-000"].kit.folder
        assert folder is not None
        return folder.parent / cid

    fields = msgpack.unpackb(update("client-000", round_no, zeros), raw=False)
    body = bytearray(fields["body"])
    body[len(body) // 2] ^= 0x01  # tampered ciphertext under a recomputed digest
    fields["body"] = bytes(body)
    fields["body_digest"] = hashlib.sha256(body).digest()
    sent["forged"] = msgpack.packb(fields, use_bin_type=True)
    sent["replayed"] = update("client-001", round_no - 1, zeros)
    sent["oversized"] = b"\x00" * (4 << 20)
    sent["malformed"] = b"\xc1 not an envelope"
    sent["revoked"] = update(REVOKED, round_no, zeros)
    for name in ("forged", "replayed", "oversized", "malformed", "revoked"):
        await bus.publish(topology.CLIENT, "update.e2e", sent[name])
    # A second submission of client-002's update, sent once its first one is in: a copy of
    # the same update under a new signature (so even if it won, the result would not move).
    await recorder.until(
        lambda: any(
            r == round_no and b.client == "client-002" for r, b in recorder.of("update.accepted")
        ),
        30,
        "client-002's update",
    )
    version, model = clients["client-002"].latest_model("e2e") or (None, None)
    assert version == round_no - 1 and model is not None
    again = train_delta("client-002", {k: np.asarray(v) for k, v in model.items()})
    sent["duplicate"] = update("client-002", round_no, again)
    await bus.publish(topology.CLIENT, "update.e2e", sent["duplicate"])


def _run(fed: Federation, root: Path, scenario: Scenario) -> RunResult:
    import os

    amqp = os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
    require_broker(amqp)
    prefix = f"e2e-{uuid.uuid4().hex[:8]}-"
    return asyncio.run(
        run_scenario(fed, root, amqp, prefix, job(root), PARTICIPANTS, BYZANTINE, scenario, OPTIONS)
    )


@pytest.fixture(scope="module")
def clean_run(e2e_federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    scenario = Scenario(
        "clean",
        ingest_replicas=("ingest-a", "ingest-b"),
        hostile_round=2,
        hostile=hostile,
        hold_client="client-006",
    )
    return _run(e2e_federation, tmp_path_factory.mktemp("clean"), scenario)


@pytest.fixture(scope="module")
def crash_run(e2e_federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    scenario = Scenario(
        "crash",
        kills=(
            ("aggregator", "update.accepted", 1, 4),  # mid-collection: updates in flight
            ("detector", "round.closed", 2, 1),  # between close and verdict
            ("accountant", "privacy.request", 3, 1),  # while the round is being charged
        ),
    )
    return _run(e2e_federation, tmp_path_factory.mktemp("crash"), scenario)


def released_rounds(run: RunResult) -> list[int]:
    return sorted(b.version for _r, b in run.recorder.of("model.published") if b.tensors is None)


def grants(run: RunResult) -> dict[int, float]:
    """Epsilon after each granted round. A request repeated by the aggregator (it re-sends
    one that waits too long) is answered from the ledger with the same figure."""
    out: dict[int, float] = {}
    for r, b in run.recorder.of("privacy.granted"):
        assert out.setdefault(r, b.epsilon_total) == b.epsilon_total, (r, out[r], b.epsilon_total)
    return out


def test_job_stops_at_the_budget_with_epsilon_growing(clean_run: RunResult) -> None:
    granted = sorted(grants(clean_run).items())
    rounds = [r for r, _e in granted]
    eps = [e for _r, e in granted]
    assert rounds == list(range(1, len(rounds) + 1)) and len(rounds) >= 2
    assert all(b > a for a, b in itertools.pairwise(eps)), eps
    assert eps[-1] <= BUDGET
    denied = clean_run.recorder.of("privacy.denied")
    assert {r for r, _b in denied} == {len(rounds) + 1}
    assert clean_run.end_reason == "budget_exhausted"
    assert released_rounds(clean_run) == rounds
    published_eps = {
        b.version: b.epsilon
        for _r, b in clean_run.recorder.of("model.published")
        if b.tensors is None
    }
    assert [published_eps[r] for r in rounds] == eps


def test_flagged_clients_are_the_byzantine_ones(clean_run: RunResult) -> None:
    verdicts = clean_run.recorder.of("round.verdict")
    assert verdicts, "no verdicts"
    for round_no, v in verdicts:
        assert sorted(f.client for f in v.flagged) == sorted(BYZANTINE), (round_no, v)
        assert sorted(v.kept) == sorted(set(PARTICIPANTS) - set(BYZANTINE))


def test_the_model_changes_every_round_and_clients_verify_it(clean_run: RunResult) -> None:
    digests = {b.version: b.digest for _r, b in clean_run.recorder.of("model.published")}
    digests[0] = model_digest(initial_model())
    versions = sorted(digests)
    assert versions == list(range(len(versions))) and len(versions) >= 3
    assert len({digests[v] for v in versions}) == len(versions)
    assert model_digest(clean_run.final_model) == digests[clean_run.final_version]
    assert all(
        p.stats.rejected == 0 and p.stats.models_verified >= len(versions) - 1
        for p in clean_run.participants.values()
    )


def test_alerts_arrive_on_qflare_alerts(clean_run: RunResult) -> None:
    keys = [k for k, _b in clean_run.recorder.alerts]
    assert all(len(k.split(".")) >= 3 and k.endswith(".e2e") for k in keys), keys
    assert any(".client.flagged." in f".{k}" for k in keys), keys
    assert any(".update.rejected." in f".{k}" for k in keys), keys
    assert any(".budget.exhausted." in f".{k}" for k in keys), keys
    flagged = {
        getattr(b, "client", None) for k, b in clean_run.recorder.alerts if "client.flagged" in k
    }
    assert flagged == set(BYZANTINE)


def test_hostile_traffic_is_rejected_with_reason_codes(clean_run: RunResult) -> None:
    assert set(clean_run.hostile_sent) - {"started"} == {
        "forged",
        "replayed",
        "duplicate",
        "oversized",
        "malformed",
        "revoked",
    }
    reasons = {b.reason.value for _r, b in clean_run.recorder.of("update.rejected")}
    reasons |= {
        b.reason
        for _r, b in clean_run.recorder.of("alert.raised")
        if b.alert_kind == "message.rejected"
    }
    assert reasons >= HOSTILE_REASONS, reasons
    alert_reasons = {b.reason for _r, b in clean_run.recorder.of("alert.raised")}
    assert alert_reasons >= HOSTILE_REASONS, alert_reasons
    # the round still holds exactly one update per participant
    closed = {
        r: sorted(u.client for u in b.updates) for r, b in clean_run.recorder.of("round.closed")
    }
    assert closed[2] == sorted(PARTICIPANTS)


def test_services_stop_cleanly_on_sigterm(clean_run: RunResult) -> None:
    assert clean_run.stop_codes == {
        k: 0 for k in ("alerting", "accountant", "detector", "ingest-a", "ingest-b", "aggregator")
    }
    stopped = {
        k
        for k in clean_run.stop_codes
        if any(r.get("event") == "service.stopped" for r in clean_run.cluster.logs(k))
    }
    assert stopped == set(clean_run.stop_codes)


def test_two_ingest_replicas_share_the_load(clean_run: RunResult) -> None:
    per_replica = {
        key: sum(1 for rec in clean_run.cluster.logs(key) if rec.get("event") == "update.accepted")
        for key in ("ingest-a", "ingest-b")
    }
    total = len(clean_run.recorder.of("update.accepted"))
    assert sum(per_replica.values()) == total >= 10 * len(released_rounds(clean_run))
    assert all(n >= 3 for n in per_replica.values()), per_replica


def test_crashes_lose_nothing_and_change_nothing(
    clean_run: RunResult, crash_run: RunResult
) -> None:
    assert [k[0] for k in crash_run.kills] == ["aggregator", "detector", "accountant"]
    assert crash_run.end_reason == clean_run.end_reason == "budget_exhausted"
    # no round charged twice: the same epsilon after each round as the undisturbed run
    # (a restored ledger may differ in the last bits; a double charge adds a whole round)
    assert sorted(grants(crash_run)) == sorted(grants(clean_run))
    assert grants(crash_run) == pytest.approx(grants(clean_run), rel=1e-9)
    # no update lost: every released round decided over all ten participants
    for round_no, b in crash_run.recorder.of("round.closed"):
        assert sorted(u.client for u in b.updates) == sorted(PARTICIPANTS), round_no
    assert released_rounds(crash_run) == released_rounds(clean_run)
    # every round at the same clip norm, and the clip moved from round to round
    clips = {r: b.clip_norm for r, b in crash_run.recorder.of("round.opened")}
    assert clips == {r: b.clip_norm for r, b in clean_run.recorder.of("round.opened")}
    assert clips[1] == 2.0 and len(set(clips.values())) == len(clips) > 1, clips
    assert crash_run.final_version == clean_run.final_version
    for name, tensor in clean_run.final_model.items():
        assert np.array_equal(tensor, crash_run.final_model[name]), name
