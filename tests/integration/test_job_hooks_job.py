"""A job's plug-ins failing while it runs, in one process on the embedded bus with the five
real services and SDK participants: an ``evaluate_fn`` that raises is a warning alert and an
error in the round's record (the job goes on); a ``round_config`` function that fails for a
later round ends the job (``round_config_failed``) before that round is announced."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from qflare.bus import connect_bus
from qflare.client import Participant, RoundInfo, model_tensors
from qflare.commands.admin import alerts_data, status_data
from qflare.crypto import Federation, provision
from qflare.runtime import JobSpec, load_settings, run_in_process

PLUGIN = """
def config(round_no):
    if round_no > 2:
        raise RuntimeError("no schedule past round 2")
    return {"lr": 0.1 * round_no}

def evaluate(version, tensors, config):
    if version == 2:
        raise ValueError("the test set is gone")
    return 1.0 / version, 10, {"accuracy": 0.5}
"""


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[str]:
    name = f"qflare_job_hooks_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN))
    sys.path.insert(0, str(tmp_path))
    yield name
    sys.path.remove(str(tmp_path))
    sys.modules.pop(name, None)


def plugin_alerts(data: Path) -> dict[str, dict[str, Any]]:
    alerts = alerts_data(data, job="hooked", severity=None, client=None, limit=50)
    return {a["kind"]: a for a in alerts if a["kind"].endswith(".failed")}


async def test_failing_plug_ins_alert_and_a_failing_config_ends_the_job(
    tmp_path: Path, plugin: str, wait_for: Callable[..., Awaitable[Any]]
) -> None:
    fed: Federation = provision(tmp_path / "pki", clients=2)
    clients = sorted(fed.clients)
    spec = JobSpec(
        job_id="hooked",
        rounds=4,
        participants=tuple(clients),
        rule="mean",
        detection=False,
        noise_multiplier=0.0,
        seed=1,
        min_updates=2,
        round_config=f"{plugin}:config",
        evaluate_fn=f"{plugin}:evaluate",
    )
    lrs: list[tuple[int, float]] = []

    def train(model: torch.nn.Module, info: RoundInfo) -> tuple[int, dict[str, float]]:
        lrs.append((info.round, info.config["lr"]))
        return 5, {"loss": float(info.round)}

    torch.manual_seed(0)
    bus = await connect_bus(f"memory://{tmp_path.name}")
    data = tmp_path / "data"
    settings = load_settings(None, env={}, data_dir=str(data), pki_dir=str(fed.root))
    services = ["alerting", "accountant", "detector", "ingest", "aggregator"]
    ids = {n: (fed.identity(n), fed.trust()) for n in services}
    parts = [
        Participant.from_kit(
            fed.clients[c], torch.nn.Linear(2, 1), train, broker=bus, jobs=["hooked"]
        )
        for c in clients
    ]
    async with run_in_process(settings, bus, services=services, identities=ids) as running:
        for p in parts:
            await p.start()
        await running.submit_job(spec, model_tensors(torch.nn.Linear(2, 1)))
        assert await running.wait_job("hooked", 60) == "round_config_failed"
        await asyncio.wait_for(asyncio.gather(*(p.ended_event("hooked").wait() for p in parts)), 30)
        for p in parts:
            await p.stop()
        await wait_for(lambda: len(plugin_alerts(data)) == 2, 10, message="the alerts stored")
    await bus.close()

    assert sorted(set(lrs)) == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2))]
    (job,) = status_data(data)["jobs"]
    assert job["state"] == "ended: round_config_failed" and job["model_version"] == 2
    first, second = job["metrics"]
    assert first["central"] == {
        "model_version": 1,
        "loss": 1.0,
        "num_examples": 10,
        "metrics": {"accuracy": 0.5},
    }
    assert first["train"]["metrics"] == {"loss": 1.0}
    assert second["central"]["model_version"] == 2
    assert "raised ValueError: the test set is gone" in second["central"]["error"]
    kinds = plugin_alerts(data)
    assert kinds["evaluate_fn.failed"]["severity"] == "warning"
    assert kinds["round_config.failed"]["severity"] == "critical"
    assert "no schedule past round 2" in kinds["round_config.failed"]["detail"]
