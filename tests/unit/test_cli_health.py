"""Readiness that does not depend on the log format: the per-process health endpoint
(``/healthz``, ``/readyz``, ``/metrics``) and the supervisor of ``qflare up``, which starts
each child once the previous answers ready, fails fast when one does not start, and leaves
no process behind when interrupted. The supervisor is driven here with stand-in children
(tiny HTTP servers); tests/e2e/test_up.py runs it with the real services on RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qflare.runtime.health import HealthServer, probe_ready


async def _get(port: int, request: bytes) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def test_health_endpoint_answers_ready_only_once_every_service_started() -> None:
    health = HealthServer(["alpha", "beta"], "127.0.0.1", 0)
    await health.start()
    try:
        get = lambda path: _get(health.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # noqa: E731
        assert await get("/healthz") == (200, "ok\n")
        assert await get("/readyz") == (503, "starting: alpha, beta\n")
        health.set_ready("alpha")
        assert await get("/readyz") == (503, "starting: beta\n")
        health.set_ready("beta")
        assert await get("/readyz") == (200, "ready\n")
        status, metrics = await get("/metrics")
        assert status == 200
        assert 'qflare_service_ready{service="alpha"} 1.0' in metrics
        assert 'qflare_service_ready{service="beta"} 1.0' in metrics
        assert await asyncio.to_thread(probe_ready, health.url)
        health.stopping()
        assert await get("/readyz") == (503, "stopping\n")
        assert 'qflare_service_ready{service="alpha"} 0.0' in (await get("/metrics"))[1]
        assert (await get("/nowhere"))[0] == 404
        assert (await _get(health.port, b"POST /readyz HTTP/1.1\r\n\r\n"))[0] == 405
        assert (await _get(health.port, b"nonsense\r\n\r\n"))[0] == 400
        assert not await asyncio.to_thread(probe_ready, "http://127.0.0.1:1")
    finally:
        await health.close()


async def test_a_taken_port_is_one_clear_error() -> None:
    first = HealthServer(["a"], "127.0.0.1", 0)
    await first.start()
    try:
        with pytest.raises(OSError, match=f"cannot serve /metrics.*127.0.0.1:{first.port}"):
            await HealthServer(["b"], "127.0.0.1", first.port).start()
    finally:
        await first.close()


# -- the supervisor ---------------------------------------------------------------------------
CHILD = """
import http.server, os, sys, time
behaviour, port, pids = sys.argv[1], int(sys.argv[2]), sys.argv[3]
open(os.path.join(pids, str(os.getpid())), "w").write(behaviour)
if behaviour == "fail":
    sys.exit(3)
if behaviour == "slow":
    time.sleep(120)

class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ready")
    def log_message(self, *a):
        pass

http.server.HTTPServer(("127.0.0.1", port), Ready).serve_forever()
"""

DRIVER = """
import json, sys
from qflare.cli import exit_code, one_line
from qflare.runtime.supervisor import Child, Supervisor, free_ports

plan, child, pids = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
ports = free_ports("127.0.0.1", len(plan))
children = [Child(name, 0, port) for (name, _), port in zip(plan, ports)]
how = dict(plan)

def command(c):
    return [sys.executable, child, how[c.name], str(c.port), pids]

try:
    code = Supervisor(children, command, start_timeout_s=60, grace_s=5).run()
except (Exception, KeyboardInterrupt) as exc:
    print(f"qflare up: {one_line(exc)}", file=sys.stderr)
    code = exit_code(exc)
sys.exit(code)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state


class Run:
    def __init__(self, tmp: Path, plan: list[tuple[str, str]]) -> None:
        (tmp / "child.py").write_text(CHILD)
        (tmp / "driver.py").write_text(DRIVER)
        self.pids = tmp / "pids"
        self.pids.mkdir()
        self.err = tmp / "err.txt"
        self.proc = subprocess.Popen(
            [sys.executable, tmp / "driver.py", json.dumps(plan), tmp / "child.py", self.pids],
            stderr=self.err.open("w"),
            text=True,
        )

    def lines(self) -> list[str]:
        return self.err.read_text().splitlines()

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines()):
            assert self.proc.poll() is None, self.lines()
            assert time.monotonic() < deadline, self.lines()
            time.sleep(0.05)

    def started(self) -> dict[int, str]:
        return {int(p.name): p.read_text() for p in self.pids.iterdir()}

    def finish(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for pid in self.started():
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


def test_children_start_in_order_each_once_ready_and_stop_on_sigterm(tmp_path: Path) -> None:
    run = Run(tmp_path, [("a", "ready"), ("b", "ready"), ("c", "ready")])
    run.wait_for("all 3 services ready")
    order = [line.split()[2] for line in run.lines() if " ready" in line and "[0]" in line]
    assert order == ["a[0]", "b[0]", "c[0]"]
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0
    assert len(run.started()) == 3 and not any(map(_alive, run.started()))


def test_a_child_that_fails_to_start_stops_the_others(tmp_path: Path) -> None:
    run = Run(tmp_path, [("a", "ready"), ("b", "fail"), ("c", "ready")])
    assert run.finish() == 1
    assert run.lines()[-1] == (
        "qflare up: b[0] exited with code 3 before it was ready; stopped the services that "
        "had started"
    )
    assert sorted(run.started().values()) == ["fail", "ready"]  # c never started
    assert not any(map(_alive, run.started()))


def test_interrupt_during_start_up_spawns_nothing_more_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    run = Run(tmp_path, [("a", "ready"), ("b", "slow"), ("c", "ready")])
    run.wait_for("starting b[0]")
    while len(run.started()) < 2:  # b is running (and will not be ready for two minutes)
        time.sleep(0.05)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130
    assert run.lines()[-1] == "qflare up: interrupted"
    assert sorted(run.started().values()) == ["ready", "slow"]
    assert not any(map(_alive, run.started()))
