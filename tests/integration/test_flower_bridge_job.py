"""A Flower ``NumPyClient`` from the Flower package trains in a QFLARE job: three clients
written as Flower's PyTorch examples write them (parameters = the state dict's values, in
its order, BatchNorm's int64 counter included), launched by
``qflare.client.flower.serve_numpy_client`` against the five real services in one process
on the embedded bus. The job sends the learning rate (``round_config``) that ``fit`` uses;
``fit``'s metrics and each round's ``evaluate`` travel with the updates and ``qflare
status`` shows them weighted per round.

``from flwr.client import NumPyClient``: ``.ci/peers.sh`` installs flwr 1.42 and the
dependencies its client imports. Without it the test is skipped, saying so (under CI it
fails)."""

from __future__ import annotations

import asyncio
import os
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from qflare.bus import connect_bus
from qflare.client.flower import FlowerParticipant, initial_tensors, serve_numpy_client
from qflare.commands.admin import status_data
from qflare.crypto import Federation, provision
from qflare.runtime import JobSpec, load_settings, run_in_process

ROUNDS = 3
TARGET = torch.tensor([[1.0, -2.0, 0.5]])


def flower_numpy_client() -> type:
    try:
        from flwr.client import NumPyClient
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(
            f"`from flwr.client import NumPyClient` fails ({exc}); .ci/peers.sh installs it"
        )
    assert NumPyClient.__module__.startswith("flwr.")  # Flower's own class
    return NumPyClient  # type: ignore[no-any-return]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def data(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x @ TARGET.T


def client_class(base: type) -> type:
    class TorchClient(base):  # type: ignore[misc, valid-type]
        """As Flower's PyTorch quickstart writes one."""

        def __init__(self, cid: str) -> None:
            self.cid = cid
            self.net = make_model()

        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return [v.cpu().numpy() for v in self.net.state_dict().values()]

        def set_parameters(self, parameters: list[np.ndarray]) -> None:
            keys = self.net.state_dict().keys()
            state = OrderedDict((k, torch.tensor(v)) for k, v in zip(keys, parameters, strict=True))
            self.net.load_state_dict(state, strict=True)

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            self.set_parameters(parameters)
            x, y = data(zlib.crc32(f"{self.cid}/{config['server_round']}".encode()))
            opt = torch.optim.SGD(self.net.parameters(), lr=float(config["lr"]))  # server-sent
            self.net.train()
            for _ in range(10):
                opt.zero_grad()
                loss = nn.functional.mse_loss(self.net(x), y)
                loss.backward()
                opt.step()
            return self.get_parameters({}), len(x), {"train_loss": loss.item()}

        def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            self.set_parameters(parameters)
            self.net.eval()
            x, y = data(12345, 256)
            with torch.no_grad():
                loss = float(nn.functional.mse_loss(self.net(x), y))
            return loss, len(x), {"mse": loss}

    return TorchClient


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return provision(tmp_path_factory.mktemp("pki"), clients=3)


async def test_a_flower_numpy_client_trains_in_a_qflare_job(fed: Federation, tmp_path) -> None:
    NumPyClient = flower_numpy_client()
    TorchClient = client_class(NumPyClient)
    clients = sorted(fed.clients)
    flower_clients = [TorchClient(cid) for cid in clients]
    assert all(isinstance(c, NumPyClient) for c in flower_clients)
    initial = initial_tensors(flower_clients[0])
    # the state dict's floats (weights, biases, running mean/var) in order; the counter stays
    assert list(initial) == [f"p{i:04d}" for i in range(8)]
    start_loss, _, _ = TorchClient("probe").evaluate(flower_clients[0].get_parameters({}), {})
    spec = JobSpec.model_validate(
        dict(
            job_id="flower",
            rounds=ROUNDS,
            participants=clients,
            rule="mean",
            detection=False,
            noise_multiplier=0.0,
            clip=100.0,
            seed=5,
            deadline_s=60.0,
            min_updates=len(clients),
            round_config={"lr": 0.05},
        )
    )
    data = tmp_path / "data"
    bus = await connect_bus(f"memory://{tmp_path.name}")
    settings = load_settings(None, env={}, data_dir=str(data), pki_dir=str(fed.root))
    services = ["alerting", "accountant", "detector", "ingest", "aggregator"]
    ids = {n: (fed.identity(n), fed.trust()) for n in services}
    async with run_in_process(settings, bus, services=services, identities=ids) as running:
        runs = [
            asyncio.create_task(
                serve_numpy_client(
                    c,
                    fed.clients[cid],
                    broker=bus,
                    jobs=["flower"],
                    timeout=90,
                    evaluate_rounds=True,
                )
            )
            for cid, c in zip(clients, flower_clients, strict=True)
        ]
        await running.submit_job(spec, initial)
        parts: list[FlowerParticipant] = await asyncio.wait_for(asyncio.gather(*runs), 120)
    await bus.close()

    assert [p.ended["flower"] for p in parts] == ["completed"] * 3
    assert all(p.stats.updates_sent == ROUNDS and p.stats.rejected == 0 for p in parts)
    assert all(sorted(p.fit_metrics) == [("flower", r) for r in (1, 2, 3)] for p in parts)
    # fit's numbers and each round's evaluate travelled with the updates; the aggregator
    # weighed them by num_examples (64 each, so the plain mean) and stored them per round
    (job,) = status_data(data)["jobs"]
    assert [m["round"] for m in job["metrics"]] == [1, 2, 3]
    for m in job["metrics"]:
        sent = [p.fit_metrics[("flower", m["round"])]["train_loss"] for p in parts]
        assert m["train"]["metrics"]["train_loss"] == pytest.approx(float(np.mean(sent)))
        seen = [e for p in parts for e in p.evaluations if e.model_version == m["round"] - 1]
        assert len(seen) == 3
        assert m["evaluate"]["loss"] == pytest.approx(float(np.mean([e.loss for e in seen])))
        assert m["evaluate"]["metrics"]["mse"] == pytest.approx(m["evaluate"]["loss"])
    # each evaluated the same final global model, which fits better than the initial one
    finals = [p.evaluations[-1] for p in parts]
    assert {(e.model_version, e.num_examples) for e in finals} == {(ROUNDS, 256)}
    assert len({e.loss for e in finals}) == 1
    assert finals[0].loss < 0.5 * start_loss
    assert finals[0].metrics == {"mse": finals[0].loss}
    # and every Flower client now holds it; its BatchNorm counter is its own (10 per fit)
    for c in flower_clients:
        for a, b in zip(c.get_parameters({}), flower_clients[0].get_parameters({}), strict=True):
            if np.issubdtype(a.dtype, np.floating):
                np.testing.assert_array_equal(a, b)
        assert int(c.net[1].num_batches_tracked) == 10 * ROUNDS
