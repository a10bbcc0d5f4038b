"""benchmarks/vs_flower.py at a tiny size (2 participants, 10,000 parameters, one counted
round): both sides finish their rounds, the table is printed, and neither a process nor the
run's RabbitMQ virtual host is left behind.

Opt-in (``QFLARE_BENCH=1``): it makes Flower's virtualenv on first use (about a minute,
``--install-flower``) and starts a dozen processes. The check of the one-line error for a
missing Flower needs neither and always runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_harness import require_broker

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "vs_flower.py"
AMQP = os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")


def test_missing_flower_is_one_line_naming_the_install(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--flower-venv", str(tmp_path / "none"), "--sizes", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--install-flower" in lines[0] and ".[bench]" in lines[0]


@pytest.mark.rabbitmq
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("QFLARE_BENCH") != "1",
    reason="opt-in: QFLARE_BENCH=1 runs benchmarks/vs_flower.py at a tiny size",
)
def test_vs_flower_tiny_run(tmp_path: Path) -> None:
    require_broker(AMQP)
    out = tmp_path / "vs_flower.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(BENCH),
            "--install-flower",
            "--sizes",
            "2",
            "--rounds",
            "1",
            "--repeats",
            "1",
            "--params",
            "10000",
            "--round-timeout",
            "120",
            "--start-timeout",
            "180",
            "--amqp",
            AMQP,
            "--json",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        printed, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the benchmark stops what it started on SIGTERM
            proc.communicate(timeout=60)
    assert proc.returncode == 0, printed[-4000:]
    result = json.loads(out.read_text())
    assert [(r["side"], r["n"]) for r in result["runs"]] == [("qflare", 2), ("flower", 2)]
    for run in result["runs"]:
        assert not run["error"] and not run["leftovers"], run
        assert len(run["rounds"]) == 1 and run["rounds"][0] > 0, run
    assert "Flower/QFLARE" in printed and "goal: QFLARE <= Flower/10" in printed
    vhosts = subprocess.run(
        ["rabbitmqctl", "-q", "list_vhosts", "name"], capture_output=True, text=True, timeout=120
    ).stdout.split()
    assert not [v for v in vhosts if v.startswith(f"vsflower-{proc.pid}-")], vhosts
