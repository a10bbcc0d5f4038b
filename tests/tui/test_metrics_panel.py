"""The console's metrics: the aggregator's weighted round metrics and evaluations, from the
live feed (signed envelopes through the adapter) and from the aggregator's stored rounds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from qflare.bus import topology
from qflare.messages.jobs import JobSpec
from qflare.services.aggregator.core import RoundState
from qflare.services.aggregator.store import AggregatorStore
from qflare.tui import events as ev
from qflare.tui import render
from qflare.tui.adapter import decode_delivery
from qflare.tui.history import load_history
from qflare.tui.state import ConsoleState

from .wire import DIGEST, envelope, federation

T = 1_790_000_000.0


@pytest.fixture(scope="module")
def fed():
    return federation(2)


def lines(state: ConsoleState) -> list[str]:
    return [t.plain for t in render.make_accuracy_lines(state)]


def test_round_metrics_and_evaluations_come_in_from_the_feed(fed) -> None:
    published = dict(
        version=3,
        digest=DIGEST,
        epsilon=1.0,
        metrics={"kept": 4.0, "train/num_samples": 120.0, "train/loss": 0.4123, "train/lr": 0.1},
    )
    federated = dict(
        model_version=2, accuracy=0.85, loss=0.5, metrics={"accuracy": 0.85}, source="federated"
    )
    central = dict(model_version=3, loss=0.45, metrics={"mae": 0.2}, source="central")
    state = ConsoleState(now=T)
    for kind, body in (
        ("model.published", published),
        ("metrics.evaluated", federated),
        ("metrics.evaluated", central),
    ):
        data = envelope(fed, kind, body, job="j", round=3, ts=T)
        events = decode_delivery(data, topology.EVENTS, f"{kind}.j", fed.trust(), T)
        state.apply_all(events)
    assert state.rounds[("j", 3)].metrics == {
        "train": {"loss": 0.4123, "lr": 0.1},
        "federated": {"loss": 0.5, "accuracy": 0.85},
        "central": {"loss": 0.45, "mae": 0.2},
    }
    # the sparkline: the participants' accuracy (no central accuracy); then round 3's metrics
    assert lines(state) == [
        "j ▇  85.0% (v2)  r3 train loss 0.412 lr 0.1 · eval acc 85.0% loss 0.5 · "
        "central loss 0.45 mae 0.2"
    ]


def test_a_central_accuracy_takes_the_sparkline_over() -> None:
    state = ConsoleState(now=T)
    fed_eval = ev.MetricsEvaluated("j", 1, T, model_version=0, accuracy=0.5, source="federated")
    state.apply_all([fed_eval])
    assert state.jobs["j"].accuracy == [(0, 0.5)]
    state.apply(ev.MetricsEvaluated("j", 1, T, model_version=1, accuracy=0.9, source="central"))
    state.apply(ev.MetricsEvaluated("j", 2, T, model_version=1, accuracy=0.6, source="federated"))
    assert state.jobs["j"].accuracy == [(1, 0.9)]
    # a simulator's job (central accuracy only) shows the sparkline alone, as before
    assert lines(state) == ["j ▇  90.0% (v1)  r2 eval acc 60.0% loss 0"]
    sim = ConsoleState(now=T)
    sim.apply(ev.MetricsEvaluated("s", 1, T, model_version=1, accuracy=0.7, loss=0.3))
    assert lines(sim) == ["s ▆  70.0% (v1)"]


def test_history_shows_the_stored_round_metrics(tmp_path: Path) -> None:
    async def write() -> None:
        store = await AggregatorStore.open(tmp_path / "aggregator")
        spec = JobSpec(job_id="j", rounds=2, participants=("a", "b"), noise_multiplier=0.0)
        await store.add_job(spec, {"w": np.zeros(2, np.float32)}, DIGEST)
        await store.request_round("j", 1, 0)
        await store.transition(
            "j", 1, RoundState.REQUESTED, RoundState.CLOSED, participants=("a", "b")
        )
        metrics = {
            "train": {"clients": 2, "num_samples": 30, "metrics": {"loss": 0.25}},
            "evaluate": {
                "model_version": 0,
                "clients": 2,
                "num_examples": 10,
                "loss": 0.75,
                "metrics": {"accuracy": 0.4},
            },
            "central": {"model_version": 1, "error": "evaluate_fn = 'm:f' raised ValueError"},
        }
        verdict = {"kept": ["a", "b"], "flagged": [], "step_norm": 1.0, "metrics": metrics}
        model = {"w": np.ones(2, np.float32)}
        assert await store.publish_model("j", 1, 1, model, DIGEST, 0.0, verdict)
        await store.close()

    asyncio.run(write())
    state = ConsoleState(now=T)
    state.apply_all(load_history(tmp_path))
    assert state.rounds[("j", 1)].metrics == {
        "train": {"loss": 0.25},
        "federated": {"loss": 0.75, "accuracy": 0.4},
    }
    assert lines(state) == ["j ▄  40.0% (v0)  r1 train loss 0.25 · eval acc 40.0% loss 0.75"]
