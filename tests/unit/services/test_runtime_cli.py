"""``qflare serve`` / ``qflare up`` as processes: start, structured logs, clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from qflare.crypto import provision


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFLARE_")}
    env.update({"QFLARE_DATA_DIR": str(tmp_path / "state"), **extra})
    return env


def _wait_for(
    proc: subprocess.Popen[str], lines: list[str], predicate, timeout: float = 60.0
) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline() if proc.stderr else ""
        if line:
            lines.append(line)
            if predicate(lines):
                return
        elif proc.poll() is not None:
            break
    pytest.fail(f"condition not met; output:\n{''.join(lines)[-3000:]}")


@pytest.mark.slow
def test_up_runs_all_services_in_one_process_and_stops_on_sigterm(tmp_path: Path) -> None:
    fed = provision(tmp_path / "pki", clients=2)
    save_file({"w": np.zeros((2, 2), np.float32)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "q.toml").write_text(
        '[[jobs]]\njob_id = "j1"\nrounds = 1\nparticipants = ["client-000", "client-001"]\n'
        'noise_multiplier = 0.0\ninitial_model = "m.safetensors"\n'
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qflare",
            "up",
            "--config",
            str(tmp_path / "q.toml"),
            "--pki-dir",
            str(fed.root),
        ],
        env=_env(tmp_path),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    try:
        _wait_for(proc, lines, lambda ls: any("all services running" in x for x in ls))
        proc.send_signal(signal.SIGTERM)
        _out, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [
        json.loads(x) for x in lines + (rest or "").splitlines(keepends=True) if x.startswith("{")
    ]
    started = {r["service"] for r in records if r["event"] == "service.started"}
    stopped = {r["logger"].rsplit(".", 1)[-1] for r in records if r["event"] == "service.stopped"}
    assert proc.returncode == 0
    assert stopped == {"ingest", "detector", "aggregator", "accountant", "alerting"}
    assert started == {"up"}  # one process: every line carries its name
    opened = [r for r in records if r["event"] == "round.opened"]
    assert opened and opened[0]["job"] == "j1"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["up", "--replicas", "detector=2"], "--replicas takes ingest=N or alerting=N"),
        (["serve", "aggregator", "--broker", "memory://"], "needs its keys"),
    ],
)
def test_configuration_mistakes_exit_2_with_the_reason(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qflare", *argv],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
