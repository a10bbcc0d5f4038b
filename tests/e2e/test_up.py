"""``qflare up`` against RabbitMQ: one OS process per service (two ingest replicas), a child
that dies is restarted, SIGTERM stops them all cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from e2e_harness import require_broker

from qflare.bus import connect_bus
from qflare.crypto import Federation

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.timeout(180)]


def _ready(lines: list[str]) -> dict[int, str]:
    out = {}
    for line in lines:
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("event") == "serve.ready":
                out[rec["pid"]] = rec["service"]
    return out


async def test_up_runs_each_service_as_a_process(
    e2e_federation: Federation, tmp_path: Path
) -> None:
    amqp = os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
    require_broker(amqp)
    prefix = f"e2e-up-{uuid.uuid4().hex[:8]}-"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFLARE_")}
    env.update(QFLARE_PREFIX=prefix, QFLARE_DATA_DIR=str(tmp_path / "state"))
    log = open(tmp_path / "up.log", "w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qflare",
            "up",
            "--broker",
            amqp,
            "--pki-dir",
            str(e2e_federation.root),
            "--replicas",
            "ingest=2",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while len(_ready(Path(log.name).read_text().splitlines())) < 6:
            assert proc.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[
                -3000:
            ]
            time.sleep(0.2)
        ready = _ready(Path(log.name).read_text().splitlines())
        assert sorted(ready.values()) == [
            "accountant",
            "aggregator",
            "alerting",
            "detector",
            "ingest",
            "ingest",
        ]
        assert len(set(ready)) == 6 and os.getpid() not in ready  # six processes
        # a child that dies is restarted
        victim = next(pid for pid, name in ready.items() if name == "detector")
        os.kill(victim, signal.SIGKILL)
        while (
            sorted(_ready(Path(log.name).read_text().splitlines()).values()).count("detector") < 2
        ):
            assert time.monotonic() < deadline + 60, Path(log.name).read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        text = Path(log.name).read_text()
        assert text.count('"event":"service.stopped"') == 6
    finally:
        if proc.poll() is None:
            proc.kill()
        bus = await connect_bus(amqp, prefix=prefix)
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())
        pids = [
            json.loads(x)["pid"]
            for x in Path(log.name).read_text().splitlines()
            if x.startswith("{") and '"service":"ingest"' in x and '"pid"' in x
        ]
        ingest_queues = [f"ingest.rounds.{host}-{pid}"[:78] for pid in set(pids)]
        await bus.delete_all(
            [
                "aggregator",
                "detector",
                "accountant",
                "alerting",
                "alerting.dead",
                "ingest",
                *ingest_queues,
            ]
        )
        await bus.close()
