"""The soak: a long job with a random service killed -9 on a clock and hostile traffic
throughout ends with the quiet run's model.

Two runs of the same job (100 rounds of the e2e harness's numpy participants, 10 clients of
which 3 Byzantine, each taking ``PACE_S`` to compute its update, so that the rounds last long
enough for the kills to land all along; services as processes over a RabbitMQ node the test
starts for itself, as the cluster test does, so that nobody else's use of the machine's
broker, a restart test's above all, can stall a run of minutes; without ``rabbitmq-server``
it uses QFLARE_TEST_AMQP):

* quiet: nothing happens to it;
* soak: every ``KILL_EVERY_S`` seconds a service drawn by a seeded random generator (the
  alerting, accountant, detector, ingest or aggregator process; each once in every five
  kills, in a random order) is killed with SIGKILL and started again; all along, a hostile
  sender publishes bad updates (a forged signature, round-old replays, the revoked
  client's, undecodable bytes, an oversized one) four times a second.

The soak run must end as the quiet one did, with the same model bit for bit, every round
decided over all ten participants, and no hostile update accepted. Its result is in
docs/architecture.md ("Faults on a clock and broker nodes dying"). It takes about 8
minutes: opt in with QFLARE_SOAK=1; QFLARE_SOAK_ROUNDS, QFLARE_SOAK_KILL_EVERY_S,
QFLARE_SOAK_PACE_S and QFLARE_SOAK_SEED change it (100, 20, 1.0, 16).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from e2e_harness import (
    BYZANTINE,
    PARTICIPANTS,
    REVOKED,
    Cluster,
    NumpyParticipant,
    Recorder,
    RunResult,
    Scenario,
    initial_model,
    require_broker,
    run_scenario,
    write_initial_model,
)
from rabbit_cluster import RabbitCluster, scripts_dir

from qflare.bus import Bus, topology
from qflare.client import Kit, RoundInfo
from qflare.crypto import Federation
from qflare.messages import encode
from qflare.messages.tensors import model_digest

ROUNDS = int(os.environ.get("QFLARE_SOAK_ROUNDS", "100"))
KILL_EVERY_S = float(os.environ.get("QFLARE_SOAK_KILL_EVERY_S", "20"))
SEED = int(os.environ.get("QFLARE_SOAK_SEED", "16"))
PACE_S = float(os.environ.get("QFLARE_SOAK_PACE_S", "1.0"))
HOSTILE_EVERY_S = 0.25
VICTIMS = ("alerting", "accountant", "detector", "ingest-a", "aggregator")

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.soak,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(
        os.environ.get("QFLARE_SOAK") != "1",
        reason="a soak of about 8 minutes; opt in with QFLARE_SOAK=1",
    ),
]


def job(root: Path) -> dict[str, Any]:
    return {
        "job_id": "e2e",
        "rounds": ROUNDS,
        "participants": list(PARTICIPANTS),
        "rule": "nnm+multikrum",
        "f": 3,
        "noise_multiplier": 1.5,
        "clip": 2.0,
        "epsilon_budget": 10_000.0,
        "min_updates": 7,
        "deadline_s": 120.0,
        "seed": 20261205,
        "initial_model": str(write_initial_model(root / "m0.safetensors")),
    }


class Soak:
    """The soak run's faults: kills on a clock and hostile traffic, with what they did."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.victims = random.Random(SEED)  # the same victims in the same order every run
        self.bag: list[str] = []
        self.rng = random.Random(SEED + 1)  # the hostile sender's choices
        self.kills: list[tuple[float, str]] = []
        self.sent: Counter[str] = Counter()

    async def __call__(self, cluster: Cluster, recorder: Recorder, bus: Bus) -> None:
        await asyncio.gather(self.kill_on_a_clock(cluster), self.hostile(recorder, bus))

    async def kill_on_a_clock(self, cluster: Cluster) -> None:
        """A kill every ``KILL_EVERY_S`` seconds from the start, whatever a restart takes."""
        start = time.monotonic()
        for n in itertools.count(1):
            await asyncio.sleep(max(0.0, start + n * KILL_EVERY_S - time.monotonic()))
            if not self.bag:  # each service once per five kills, in a random order
                self.bag = self.victims.sample(VICTIMS, len(VICTIMS))
            victim = self.bag.pop()
            # a kill and its restart finish together, even when the job ends meanwhile
            step = asyncio.ensure_future(self._kill_and_restart(cluster, victim))
            try:
                await asyncio.shield(step)
            except asyncio.CancelledError:
                await step
                raise

    async def _kill_and_restart(self, cluster: Cluster, key: str) -> None:
        cluster.kill9(key)
        self.kills.append((time.monotonic(), key))
        print(f"soak: kill -9 {key} at {time.strftime('%X')}", flush=True)
        await asyncio.sleep(0.3)
        ingest = key.startswith("ingest")
        cluster.start("ingest" if ingest else key, replica=key if ingest else None)
        await cluster.ready(key)

    async def hostile(self, recorder: Recorder, bus: Bus) -> None:
        kits = {cid: Kit.load(self.fed.clients[cid]) for cid in ("client-000", REVOKED)}
        zeros = {k: np.zeros_like(v) for k, v in initial_model().items()}
        honest = kits["client-000"]

        def update(kit: Kit, round_no: int) -> bytes:
            return encode(
                "update",
                {"base_version": round_no - 1, "num_samples": 48, "tensors": zeros},
                kit.identity,
                job="e2e",
                round=round_no,
                seal_to=honest.ingest_cert,
            )

        while True:
            await asyncio.sleep(HOSTILE_EVERY_S)
            opened = recorder.of("round.opened")
            round_no = opened[-1][0] if opened else 1
            what = self.rng.choice(("forged", "replayed", "revoked", "malformed", "oversized"))
            if what == "replayed" and round_no <= 1:
                what = "malformed"  # round 1 has no round before it to replay
            if what == "forged":
                fields = msgpack.unpackb(update(honest, round_no), raw=False)
                body = bytearray(fields["body"])
                body[len(body) // 2] ^= 0x01  # tampered under a recomputed digest
                fields["body"] = bytes(body)
                fields["body_digest"] = hashlib.sha256(body).digest()
                message = msgpack.packb(fields, use_bin_type=True)
            elif what == "replayed":  # a round-old update, signed and sealed: STALE_ROUND
                message = update(honest, round_no - 1)
            elif what == "revoked":
                message = update(kits[REVOKED], round_no)
            elif what == "malformed":
                message = self.rng.randbytes(self.rng.randint(1, 2048))
            else:
                message = b"\x00" * (4 << 20)
            await bus.publish(topology.CLIENT, "update.e2e", message)
            self.sent[what] += 1


class PacedParticipant(NumpyParticipant):
    """The harness's participant, taking ``PACE_S`` seconds over each update (in the SDK's
    worker thread, as real training would)."""

    def compute_update(self, global_tensors: Mapping[str, np.ndarray], info: RoundInfo) -> Any:
        time.sleep(PACE_S)
        return super().compute_update(global_tensors, info)


def paced(kit: Kit, **where: Any) -> PacedParticipant:
    return PacedParticipant(kit, byzantine=kit.id in BYZANTINE, **where)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A RabbitMQ node of the test's own (stopped and removed afterwards), else the shared one."""
    if scripts_dir() is None:
        amqp = os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
        require_broker(amqp)
        yield amqp
        return
    node = RabbitCluster(tmp_path_factory.mktemp("soak-broker"), size=1)
    try:
        node.start()
        yield node.urls
    finally:
        node.stop()


def _run(fed: Federation, root: Path, amqp: str, scenario: Scenario) -> RunResult:
    return asyncio.run(
        run_scenario(
            fed,
            root,
            amqp,
            f"e2e-{uuid.uuid4().hex[:8]}-",
            job(root),
            PARTICIPANTS,
            BYZANTINE,
            scenario,
            {"aggregator": {"reopen_interval_s": 1.0}},
        )
    )


def test_soak_kills_and_hostile_traffic_change_nothing(
    e2e_federation: Federation, broker: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    timeout = 120.0 + (12.0 + 3 * PACE_S) * ROUNDS
    quiet = _run(
        e2e_federation,
        tmp_path_factory.mktemp("soak-quiet"),
        broker,
        Scenario("soak-quiet", participant=paced, timeout=timeout),
    )
    assert quiet.end_reason == "completed" and quiet.final_version == ROUNDS

    soak = Soak(e2e_federation)
    run = _run(
        e2e_federation,
        tmp_path_factory.mktemp("soak"),
        broker,
        Scenario("soak", participant=paced, chaos=soak, timeout=timeout),
    )
    assert run.end_reason == "completed"
    assert run.final_version == quiet.final_version == ROUNDS
    for round_no, b in run.recorder.of("round.closed"):
        assert sorted(u.client for u in b.updates) == sorted(PARTICIPANTS), round_no
    for name, tensor in quiet.final_model.items():
        assert np.array_equal(tensor, run.final_model[name]), name
    assert len(soak.kills) >= 1 and sum(soak.sent.values()) >= 1
    # the revoked client never got in (a forged or replayed update that did would have moved
    # the model, which the equality above rules out)
    assert {b.client for _r, b in run.recorder.of("update.accepted")} == set(PARTICIPANTS)

    figures = {
        "rounds": ROUNDS,
        "seed": SEED,
        "kill_every_s": KILL_EVERY_S,
        "quiet_s": round(quiet.seconds, 1),
        "soak_s": round(run.seconds, 1),
        "kills": dict(Counter(key for _t, key in soak.kills)),
        "hostile_sent": dict(soak.sent),
        "update_rejected": dict(
            Counter(b.reason.value for _r, b in run.recorder.of("update.rejected"))
        ),
        "final_digest": model_digest(run.final_model).hex()[:16],
        "same_as_quiet": model_digest(run.final_model) == model_digest(quiet.final_model),
    }
    print("soak figures:", json.dumps(figures))
