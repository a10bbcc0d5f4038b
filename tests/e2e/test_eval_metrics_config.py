"""Evaluation, metrics and a server-sent config across processes on the real RabbitMQ.

The five services run as ``qflare serve`` processes (tests/e2e/e2e_harness.py); the job's
``round_config`` and ``evaluate_fn`` are ``module:function`` plug-ins from a module outside
the package (tests/e2e/job_hooks.py, on the services' PYTHONPATH). SDK participants with
torch models train with the learning rate the round config sends them, report training
metrics, and evaluate each round's global model on their own held-out data:

* ``client-000``..``client-002`` report training and evaluation metrics every round;
* ``client-003`` is today's SDK use: ``train`` returns a bare sample count, no ``evaluate``;
* ``client-004`` forges an update with 40 metrics in round 1 (ingest refuses it:
  BAD_METRICS), reports a NaN loss in round 2 (its SDK does not send that update), and is
  honest in round 3.

The test checks what reached ``train``, what the aggregator stored and published (the
weights recomputed here from what each participant reported), that the central
``evaluate_fn`` ran on the published model, what ``qflare status --json`` and the console
show, and that a bad ``evaluate_fn`` name or an oversized round config is refused with one
clear error when the job is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import job_hooks
import pytest
import torch
from e2e_harness import (
    Cluster,
    Scenario,
    config_text,
    delete_prefix,
    remaining,
    require_broker,
    run_scenario,
)
from safetensors.numpy import save_file

from qflare.bus import topology
from qflare.cli import main as cli
from qflare.client import Kit, LocalUpdate, Participant, RoundInfo, model_tensors
from qflare.crypto import Federation
from qflare.messages import Update, encode
from qflare.tui import render
from qflare.tui.adapter import Opened, to_events
from qflare.tui.history import load_history
from qflare.tui.state import ConsoleState

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.timeout(300)]

JOB = "evalcfg"
ROUNDS = 3
HONEST = ("client-000", "client-001", "client-002")
LEGACY = "client-003"
HOSTILE = "client-004"
CLIENTS = (*HONEST, LEGACY, HOSTILE)
HOOKS_DIR = Path(__file__).parent
AMQP = os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")


def make_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


@dataclass
class Reports:
    """What each participant saw and reported, by (client, round)."""

    configs: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    train: dict[tuple[str, int], tuple[int, dict[str, float]]] = field(default_factory=dict)
    evals: dict[tuple[str, int], tuple[float, int, dict[str, float]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Reporting(Participant):
    """A torch participant whose ``train`` uses the round's ``lr`` and ``local_steps`` and
    whose ``evaluate`` measures the global model on its own held-out examples."""

    def __init__(self, kit: Kit, reports: Reports, **kwargs: Any) -> None:
        legacy = kit.id == LEGACY
        fit = self.fit_legacy if legacy else self.fit
        super().__init__(kit, make_model(), fit, evaluate=None if legacy else self.check, **kwargs)
        self.reports = reports
        self.size = 40 + 8 * CLIENTS.index(kit.id)  # unequal sample counts: weights matter

    def _steps(self, model: torch.nn.Module, info: RoundInfo) -> float:
        with self.reports.lock:
            self.reports.configs[(self.id, info.round)] = dict(info.config)
        x, y = (
            torch.from_numpy(a).float()
            for a in job_hooks.dataset(f"{self.id}/{info.round}", self.size)
        )
        opt = torch.optim.SGD(model.parameters(), lr=info.config["lr"])
        for _ in range(info.config["local_steps"]):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
            loss.backward()
            opt.step()
        return loss.item()

    def fit(self, model: torch.nn.Module, info: RoundInfo) -> tuple[int, dict[str, float]]:
        loss = self._steps(model, info)
        if self.id == HOSTILE and info.round == 2:
            loss = math.nan  # the SDK refuses to send this update (BAD_METRICS)
        metrics = {"loss": loss, "lr": float(info.config["lr"])}
        with self.reports.lock:
            self.reports.train[(self.id, info.round)] = (self.size, metrics)
        return self.size, metrics

    def fit_legacy(self, model: torch.nn.Module, info: RoundInfo) -> int:
        self._steps(model, info)
        return self.size

    def check(self, model: torch.nn.Module, info: RoundInfo) -> tuple[float, int, dict[str, float]]:
        n = 20 + 5 * CLIENTS.index(self.id)
        x, y = job_hooks.dataset(f"{self.id}/held-out", n)
        loss, metrics = job_hooks.measure(model_tensors(model), x, y)
        with self.reports.lock:
            self.reports.evals[(self.id, info.round)] = (loss, n, metrics)
        return loss, n, metrics

    async def _encode(self, update: LocalUpdate, info: RoundInfo) -> bytes:
        if not (self.id == HOSTILE and info.round == 1):
            return await super()._encode(update, info)
        # what a client that bypasses the SDK could send: 40 metric names (bounds: 32)
        body = Update.model_construct(
            base_version=info.model_version,
            num_samples=update.num_samples,
            tensors=update.tensors,
            metrics={f"m{i}": 1.0 for i in range(40)},
            evaluation=None,
        )
        return encode(
            "update",
            body,
            self.kit.identity,
            job=info.job,
            round=info.round,
            seal_to=self.kit.readers,
        )


def weighted(entries: list[tuple[float, Mapping[str, float]]]) -> dict[str, float]:
    """Per name, sum(w * v) / sum(w) over the entries that report it."""
    names = {n for _w, m in entries for n in m}
    return {
        n: sum(w * m[n] for w, m in entries if n in m) / sum(w for w, m in entries if n in m)
        for n in names
    }


def job_table(**extra: Any) -> dict[str, Any]:
    return {
        "job_id": JOB,
        "rounds": ROUNDS,
        "participants": list(CLIENTS),
        "rule": "mean",
        "detection": False,
        "noise_multiplier": 0.0,
        "clip": 100.0,
        "min_updates": 4,
        "deadline_s": 10.0,
        "seed": 5,
        **extra,
    }


@pytest.fixture(scope="module")
def initial_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m0.safetensors"
    save_file(model_tensors(make_model()), str(path))
    return path


def status_json(data_dir: Path) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["status", "--data-dir", str(data_dir), "--json"]) == 0
    return json.loads(out.getvalue())


def test_metrics_config_and_central_evaluation_over_rabbitmq(
    e2e_federation: Federation,
    tmp_path: Path,
    initial_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_broker(AMQP)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS_DIR), *sys.path]))
    reports = Reports()
    job = job_table(
        round_config="job_hooks:round_config",
        evaluate_fn="job_hooks:evaluate",
        initial_model=str(initial_model),
    )
    scenario = Scenario(
        "evalcfg", participant=lambda kit, **where: Reporting(kit, reports, **where), timeout=150
    )
    run = asyncio.run(
        run_scenario(
            e2e_federation,
            tmp_path / "run",
            AMQP,
            f"e2e-{uuid.uuid4().hex[:8]}-",
            job,
            CLIENTS,
            (),
            scenario,
        )
    )
    assert run.end_reason == "completed", run.cluster.logs("aggregator")[-5:]
    parts = run.participants

    # the server-sent config reached train, round by round (the schedule halves lr)
    for r in range(1, ROUNDS + 1):
        for c in CLIENTS:
            assert reports.configs[(c, r)] == job_hooks.round_config(r), (c, r)
    assert reports.configs[(HONEST[0], 3)]["lr"] == pytest.approx(0.1)

    # the refusals: ingest refused the forged update, the SDK did not send the NaN one
    # (a body that fails its schema after its signature and digest verified is its signer's:
    # the rejection names client-004, so round 1 need not wait for its deadline)
    refused = [(b.client, str(b.reason)) for _r, b in run.recorder.of("update.rejected")]
    assert [c for c, reason in refused if reason == "BAD_METRICS"] == [HOSTILE]
    assert parts[HOSTILE].stats.updates_refused == 1
    assert "BAD_METRICS" in parts[HOSTILE].stats.last_error

    # what the aggregator stored, as `qflare status --json` shows it
    (status,) = status_json(run.cluster.root / "state")["jobs"]
    assert status["state"] == "ended: completed"
    rounds = {m["round"]: m for m in status["metrics"]}
    assert sorted(rounds) == [1, 2, 3]
    published = dict(run.recorder.of("model.published"))
    evaluated = [(r, b) for r, b in run.recorder.of("metrics.evaluated")]
    for r in range(1, ROUNDS + 1):
        reporters = [*HONEST, *((HOSTILE,) if r == 3 else ())]  # kept and reporting
        train = [reports.train[(c, r)] for c in reporters]
        expected = weighted([(float(n), m) for n, m in train])
        got = rounds[r]["train"]
        assert got["clients"] == len(reporters) and got["num_samples"] == sum(n for n, _ in train)
        assert got["metrics"] == pytest.approx(expected, rel=1e-9)
        evals = [reports.evals[(c, r)] for c in reporters]
        ev = rounds[r]["evaluate"]
        assert ev["model_version"] == r - 1 and ev["num_examples"] == sum(n for _l, n, _m in evals)
        assert ev["loss"] == pytest.approx(
            sum(n * loss for loss, n, _ in evals) / ev["num_examples"]
        )
        assert ev["metrics"] == pytest.approx(weighted([(float(n), m) for _l, n, m in evals]))
        central = rounds[r]["central"]
        assert central["model_version"] == r and central["num_examples"] == 300
        assert central["metrics"]["lr"] == job_hooks.round_config(r)["lr"]
        # and the same numbers went out: train/<name> on model.published, two evaluations
        body = published[r]
        assert body.metrics["train/loss"] == pytest.approx(expected["loss"])
        assert body.metrics["train/num_samples"] == got["num_samples"]
        sources = {b.source: b for rr, b in evaluated if rr == r}
        assert sources["federated"].model_version == r - 1
        assert sources["federated"].loss == pytest.approx(ev["loss"])
        assert sources["federated"].accuracy == pytest.approx(ev["metrics"]["accuracy"])
        assert sources["central"].model_version == r
        assert sources["central"].loss == pytest.approx(central["loss"])

    # the central evaluate_fn ran on the final model every participant holds
    assert run.final_version == ROUNDS
    loss, _n, metrics = job_hooks.evaluate(ROUNDS, run.final_model, job_hooks.round_config(ROUNDS))
    assert rounds[ROUNDS]["central"]["loss"] == pytest.approx(loss, rel=1e-6)
    assert rounds[ROUNDS]["central"]["metrics"] == pytest.approx(metrics, rel=1e-6)
    assert rounds[ROUNDS]["central"]["loss"] < rounds[1]["evaluate"]["loss"]  # it learned

    # the console: the live feed (the recorded, verified messages through its adapter) and
    # its history from the services' state both show round 3's weighted metrics
    last = rounds[ROUNDS]
    shown = (
        f"r{ROUNDS} train loss {last['train']['metrics']['loss']:.3g} "
        f"lr {last['train']['metrics']['lr']:.3g} · "
        f"eval acc {100 * last['evaluate']['metrics']['accuracy']:.1f}% "
        f"loss {last['evaluate']['loss']:.3g} · "
        f"central acc {100 * last['central']['metrics']['accuracy']:.1f}%"
    )
    live = ConsoleState()
    for ts, kind, r, body in run.recorder.events:
        opened = Opened(kind, "aggregator", JOB, r, ts, b"", body, True)
        live.apply_all(to_events(opened, topology.EVENTS))
    history = ConsoleState()
    history.apply_all(load_history(run.cluster.root / "state"))
    for state in (live, history):
        (line,) = [t.plain for t in render.make_accuracy_lines(state)]
        assert line.startswith(f"{JOB} ") and shown in line, line
    # the table view of `qflare status` has the same rounds
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["status", "--data-dir", str(run.cluster.root / "state")]) == 0
    assert "round metrics" in out.getvalue() and f"v{ROUNDS} loss=" in out.getvalue()


def run_aggregator_once(root: Path, fed: Federation, config: str) -> tuple[int, str]:
    """Start ``qflare serve aggregator`` with ``config`` and wait for it to exit; its exit
    code and everything it wrote."""
    require_broker(AMQP)
    root.mkdir(parents=True, exist_ok=True)
    (root / "qflare.toml").write_text(config)
    prefix = f"e2e-{uuid.uuid4().hex[:8]}-"
    cluster = Cluster(
        root,
        {
            "QFLARE_BROKER": AMQP,
            "QFLARE_PREFIX": prefix,
            "QFLARE_DATA_DIR": str(root / "state"),
            "QFLARE_PKI_DIR": str(fed.root),
            "QFLARE_CONFIG": str(root / "qflare.toml"),
            "PYTHONPATH": os.pathsep.join([str(HOOKS_DIR), *sys.path]),
        },
    )
    cluster.start("aggregator")
    try:
        code = cluster.procs["aggregator"].wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the aggregator did not refuse the job") from None
    finally:
        cluster.stop_all()
        # the aggregator declares its queue (and the exchanges) before it loads the job
        queues = ["aggregator", *(stream.name for stream in topology.job_streams(JOB))]
        asyncio.run(delete_prefix(AMQP, prefix, queues))
    assert asyncio.run(remaining(AMQP, prefix, queues)) == []
    return code, cluster.log_path("aggregator").read_text()


def test_a_bad_evaluate_fn_name_is_one_clear_error(
    e2e_federation: Federation, tmp_path: Path, initial_model: Path
) -> None:
    require_broker(AMQP)
    config = config_text(
        job_table(evaluate_fn="job_hooks:nosuch", initial_model=str(initial_model))
    )
    code, log = run_aggregator_once(tmp_path, e2e_federation, config)
    assert code == 2
    (failed,) = [json.loads(line) for line in log.splitlines() if '"serve.failed"' in line]
    assert failed["error"] == (
        "evaluate_fn = 'job_hooks:nosuch': module job_hooks has no attribute 'nosuch'"
    )


def test_an_oversized_round_config_is_refused_when_the_job_is_loaded(
    e2e_federation: Federation, tmp_path: Path, initial_model: Path
) -> None:
    config = config_text(job_table(initial_model=str(initial_model)))
    config += 'round_config = { lr = 0.1, notes = "' + "x" * 2000 + '" }\n'
    code, log = run_aggregator_once(tmp_path, e2e_federation, config)
    assert code == 2
    assert "round_config" in log and "TOO_LARGE" in log and "at most 1024" in log, log
