"""The same simulation over RabbitMQ gives the same report as over the embedded bus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qflare.cli import main
from qflare.sim.report import comparable

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def test_rabbitmq_report_equals_embedded_report(  # rabbit_bus: the suite's broker check (skip, or fail on CI)
    tmp_path: Path, amqp_url: str, rabbit_bus: object
) -> None:
    common = [
        "simulate",
        "--clients",
        "8",
        "--byzantine",
        "2",
        "--rounds",
        "3",
        "--attack",
        "sign_flip",
        "--noise-multiplier",
        "0.5",
        "--clip",
        "2",
        "--seed",
        "11",
        "--quiet",
    ]
    assert main([*common, "--out", str(tmp_path / "mem")]) == 0
    assert main([*common, "--out", str(tmp_path / "amqp"), "--broker", amqp_url]) == 0
    mem = json.loads((tmp_path / "mem" / "report.json").read_text())
    rabbit = json.loads((tmp_path / "amqp" / "report.json").read_text())
    assert rabbit["broker"] != mem["broker"] == "memory://"
    assert comparable(rabbit) == comparable(mem)
    assert [r["round"] for r in mem["rounds"]] == [1, 2, 3]
    # DP was on: the accountant granted every round and the spend grew
    eps = [r["epsilon"] for r in mem["rounds"]]
    assert all(e is not None for e in eps) and eps == sorted(eps) and eps[0] > 0
