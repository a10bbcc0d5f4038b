"""examples/run_federation.sh as a new user runs it: provision, initial model, ten
participant processes (examples/participant.py, torch + the client SDK), ``qflare up``
(five service processes) against the real RabbitMQ, then ``qflare status``.

Nothing is declared before the run: the services declare their queues, the aggregator the
job's streams, and participants that start before the job read its broadcast stream once it
exists. The run uses its own prefix and two rounds; the script removes its exchanges, queues
and streams at the end, which the test checks too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import aio_pika
import aiormq
import pytest
from e2e_harness import require_broker

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
ROUNDS = 2


async def _queue_exists(amqp: str, name: str) -> bool:
    conn = await aio_pika.connect(amqp, timeout=10)
    try:
        ch = await conn.channel()
        try:
            await ch.declare_queue(name, passive=True)
            return True
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
    finally:
        await conn.close()


async def test_run_federation_script_completes_the_job(tmp_path: Path) -> None:
    amqp = os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
    require_broker(amqp)
    prefix = f"e2e-ex-{uuid.uuid4().hex[:8]}-"
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFLARE_")}
    env.update(QFLARE_BROKER=amqp, QFLARE_PREFIX=prefix, ROUNDS=str(ROUNDS))
    proc = subprocess.Popen(
        ["bash", str(EXAMPLES / "run_federation.sh"), str(work)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the script's trap stops everything and tears down
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"run_federation.sh did not finish in 240 s:\n{out[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        # idempotent; covers a script killed before its trap ran
        subprocess.run(
            [sys.executable, str(EXAMPLES / "teardown.py"), "--broker", amqp, "--prefix", prefix],
            capture_output=True,
            timeout=60,
        )
    log = out + "".join(p.read_text()[-2000:] for p in sorted(work.glob("*.log")))
    assert proc.returncode == 0, log[-6000:]

    # every participant followed the job to its end and sent one update per round
    results = [json.loads(line) for line in out.splitlines() if line.startswith('{"client"')]
    assert sorted(r["client"] for r in results) == [f"client-{i:03d}" for i in range(10)], out
    assert all(r["ended"] == "completed" and r["updates_sent"] == ROUNDS for r in results), results
    # all hold the same final global model (the one the aggregator signed last)
    assert len({r["final_accuracy"] for r in results}) == 1, results

    # qflare status, as the script printed it and as JSON from the services' stores
    assert "ended: completed" in out and f"{ROUNDS}/{ROUNDS}" in out, out[-3000:]
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "qflare",
            "status",
            "--json",
            "--config",
            str(work / "federation.toml"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    (job,) = json.loads(status.stdout)["jobs"]
    assert job["job"] == "digits" and job["state"] == "ended: completed"
    assert job["round"] == ROUNDS and job["model_version"] == ROUNDS and job["updates"] == 10
    assert job["ledger"]["granted"] == ROUNDS and job["ledger"]["denied"] == 0
    assert 0 < job["epsilon"] <= job["epsilon_budget"]
    models = sorted((work / "state" / "aggregator").rglob("*.safetensors"))
    assert models, "the aggregator stored no model files"

    # the script removed its topology from the broker
    for name in ("aggregator", "updates.digits", "models.digits", "broadcast.digits"):
        assert not await _queue_exists(amqp, f"{prefix}{name}"), name
