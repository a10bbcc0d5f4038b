"""The broker restarting mid-round: services and SDK clients reconnect and the job finishes.

It stops and starts the shared RabbitMQ (``rabbitmqctl stop_app/start_app``), which
disturbs every other test using it, so it runs only when asked: QFLARE_BROKER_RESTART=1
(``-m broker_restart``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from pathlib import Path

import pytest
from e2e_harness import (
    BYZANTINE,
    PARTICIPANTS,
    Scenario,
    require_broker,
    run_scenario,
    write_initial_model,
)

from qflare.crypto import Federation

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.broker_restart,
    pytest.mark.timeout(400),
    pytest.mark.skipif(
        os.environ.get("QFLARE_BROKER_RESTART") != "1",
        reason="restarts the shared broker; opt in with QFLARE_BROKER_RESTART=1",
    ),
    pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl"),
]


def test_job_finishes_across_a_broker_restart(e2e_federation: Federation, tmp_path: Path) -> None:
    amqp = os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
    require_broker(amqp)
    job = {
        "job_id": "e2e",
        "rounds": 3,
        "participants": list(PARTICIPANTS),
        "rule": "nnm+multikrum",
        "f": 3,
        "noise_multiplier": 1.5,
        "clip": 2.0,
        "epsilon_budget": 100.0,
        "min_updates": 7,
        "deadline_s": 120.0,
        "seed": 7,
        "initial_model": str(write_initial_model(tmp_path / "m0.safetensors")),
    }
    # client-006 holds its round-2 update until the broker is back: the round is open across
    # the restart, and its last update travels over reconnected connections
    scenario = Scenario(
        "restart",
        broker_restart=("update.accepted", 2, 4),
        hold_client="client-006",
        hostile_round=2,
        timeout=300,
    )
    run = asyncio.run(
        run_scenario(
            e2e_federation,
            tmp_path / "run",
            amqp,
            f"e2e-{uuid.uuid4().hex[:8]}-",
            job,
            PARTICIPANTS,
            BYZANTINE,
            scenario,
            {"aggregator": {"reopen_interval_s": 1.0}},
        )
    )
    assert [k[1] for k in run.kills] == ["stop_app", "start_app"]
    assert run.end_reason == "completed"
    # the restart really fell inside the job: round 2 closed and the job ended after it
    closed_at = {r: t for t, k, r, _b in run.recorder.events if k == "round.closed"}
    ended_at = min(t for t, k, _r, _b in run.recorder.events if k == "job.ended")
    assert closed_at[2] > run.broker_up > run.broker_down and ended_at > run.broker_up
    assert run.final_version == 3
    closed = {r: sorted(u.client for u in b.updates) for r, b in run.recorder.of("round.closed")}
    assert closed == {r: sorted(PARTICIPANTS) for r in (1, 2, 3)}
    assert all(p.ended.get("e2e") == "completed" for p in run.participants.values())
