"""``qflare up`` against RabbitMQ: one OS process per service (two ingest replicas), a child
that dies is restarted, SIGTERM stops them all cleanly; each child is started once the
previous one's ``/readyz`` answers (so text logs work too), a child that fails to start stops
the others, and Ctrl-C during start-up spawns nothing more and leaves no process behind."""

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

from qflare.bus import connect_bus, topology
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
    log = tmp_path / "up.log"
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
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while len(_ready(log.read_text().splitlines())) < 6:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        ready = _ready(log.read_text().splitlines())
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
        while sorted(_ready(log.read_text().splitlines()).values()).count("detector") < 2:
            assert time.monotonic() < deadline + 60, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        text = log.read_text()
        assert text.count('"event":"service.stopped"') == 6
    finally:
        if proc.poll() is None:
            proc.kill()
        bus = await connect_bus(amqp, prefix=prefix)
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())
        pids = [
            json.loads(x)["pid"]
            for x in log.read_text().splitlines()
            if x.startswith("{") and '"service":"ingest"' in x and '"pid"' in x
        ]
        ingest_queues = [f"ingest.rounds.{host}-{pid}"[:78] for pid in set(pids)]
        await bus.delete_all([*topology.SERVICE_QUEUES, *ingest_queues])
        await bus.close()


# -- readiness from the services, fail fast, interrupt -----------------------------------------
STARTING = re.compile(r"^qflare up: starting (\w+)\[(\d+)\] \(pid (\d+), (http://[^)]+)\)$")


class Up:
    """``qflare up`` on RabbitMQ with its stderr in a file; knows every child it started."""

    def __init__(self, fed: Federation, tmp: Path, *flags: str, **env: str) -> None:
        self.amqp = os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
        require_broker(self.amqp)
        self.prefix = f"e2e-up-{uuid.uuid4().hex[:8]}-"
        full = {k: v for k, v in os.environ.items() if not k.startswith("QFLARE_")}
        full.update(QFLARE_PREFIX=self.prefix, QFLARE_DATA_DIR=str(tmp / "state"), **env)
        self.log = tmp / "up.log"
        command = ["qflare", "up", "--broker", self.amqp, "--pki-dir", str(fed.root), *flags]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *command],
            env=full,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
        )

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def children(self) -> dict[str, tuple[int, str]]:
        """``name[i]`` -> (pid, endpoint URL) of every child started."""
        found = (STARTING.match(line) for line in self.lines())
        return {f"{m[1]}[{m[2]}]": (int(m[3]), m[4]) for m in found if m}

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines()):
            assert self.proc.poll() is None, "\n".join(self.lines()[-30:])
            assert time.monotonic() < deadline, "\n".join(self.lines()[-30:])
            time.sleep(0.1)

    async def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid, _ in self.children().values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        bus = await connect_bus(self.amqp, prefix=self.prefix)
        await bus.delete_all(topology.SERVICE_QUEUES)
        await bus.close()


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_up_learns_readiness_from_the_services_with_text_logs(
    e2e_federation: Federation, tmp_path: Path
) -> None:
    up = Up(e2e_federation, tmp_path, QFLARE_LOG_FORMAT="text")
    try:
        up.wait_for("all 5 services ready")
        children = up.children()
        assert list(children) == [
            "alerting[0]",
            "accountant[0]",
            "detector[0]",
            "ingest[0]",
            "aggregator[0]",
        ]
        assert not any(line.startswith("{") for line in up.lines())  # text, not JSON
        for label, (_pid, url) in children.items():
            assert _get(url + "/readyz") == (200, "ready\n")
            assert _get(url + "/healthz") == (200, "ok\n")
            status, metrics = _get(url + "/metrics")
            name = label.split("[")[0]
            assert status == 200 and f'qflare_service_ready{{service="{name}"}} 1.0' in metrics
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(60) == 0
        assert not any(_alive(pid) for pid, _ in children.values())
    finally:
        await up.close()


async def test_up_stops_everything_when_a_service_fails_to_start(
    e2e_federation: Federation, tmp_path: Path
) -> None:
    # the detector's endpoint port is taken: it exits before it is ready
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        base = held.getsockname()[1] - 2
        up = Up(e2e_federation, tmp_path, "--metrics-port", str(base), "--log-level", "WARNING")
        try:
            assert up.proc.wait(120) == 1
            assert up.lines()[-1] == (
                "qflare up: detector[0] exited with code 1 before it was ready; stopped the "
                "services that had started"
            )
            children = up.children()
            assert list(children) == ["alerting[0]", "accountant[0]", "detector[0]"]
            assert not any(_alive(pid) for pid, _ in children.values())
            assert "Traceback" not in up.log.read_text()
        finally:
            await up.close()


async def test_interrupt_during_start_up_leaves_no_process_behind(
    e2e_federation: Federation, tmp_path: Path
) -> None:
    up = Up(e2e_federation, tmp_path, "--log-level", "WARNING")
    try:
        up.wait_for("accountant[0] ready")
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 130
        assert up.lines()[-1] == "qflare up: interrupted"
        children = up.children()
        assert "ingest[0]" not in children and "aggregator[0]" not in children
        assert not any(_alive(pid) for pid, _ in children.values())
        assert "Traceback" not in up.log.read_text()
    finally:
        await up.close()
