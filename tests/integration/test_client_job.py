"""A whole job in one process on the embedded bus: the five real services and SDK
participants with torch models, then the operator commands reading what the services stored.
Detection and Byzantine clients across processes are the end-to-end tests' business."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from qflare.bus import connect_bus
from qflare.cli import main as cli
from qflare.client import Participant, RoundInfo, model_tensors
from qflare.crypto import Federation, provision
from qflare.runtime import JobSpec, load_settings, run_in_process

CLIENTS = 4
TARGET = torch.tensor([[1.0, -2.0, 0.5]])


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def train(model: torch.nn.Module, info: RoundInfo) -> int:
    """A few SGD steps towards y = TARGET x on data seeded by client and round."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{info.client}/{info.round}".encode()))
    x = torch.randn(64, 3, generator=g)
    y = x @ TARGET.T
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return len(x)


def cli_json(*args: str) -> object:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli([*args, "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return provision(tmp_path_factory.mktemp("pki"), clients=CLIENTS)


async def test_participants_run_a_job_and_operators_see_it(
    fed: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clients = sorted(fed.clients)
    spec = JobSpec.model_validate(
        dict(
            job_id="lin",
            rounds=3,
            participants=clients,
            rule="mean",
            f=0,
            detection=False,
            noise_multiplier=0.5,
            clip=2.0,
            epsilon_budget=1000.0,
            seed=7,
            deadline_s=30.0,
            min_updates=CLIENTS,
        )
    )
    initial = model_tensors(make_model())
    bus = await connect_bus(f"memory://{tmp_path.name}")
    settings = load_settings(None, env={}, data_dir=str(tmp_path / "data"), pki_dir=str(fed.root))
    services = ["alerting", "accountant", "detector", "ingest", "aggregator"]
    ids = {n: (fed.identity(n), fed.trust()) for n in services}
    parts = [
        Participant.from_kit(fed.clients[c], make_model(), train, broker=bus, jobs=["lin"])
        for c in clients
    ]
    async with run_in_process(settings, bus, services=services, identities=ids) as running:
        for p in parts:
            await p.start()
        await running.submit_job(spec, initial)
        await asyncio.wait_for(asyncio.gather(*(p.ended_event("lin").wait() for p in parts)), 60)
        for p in parts:
            await p.stop()
    await bus.close()

    assert {p.ended["lin"] for p in parts} == {"completed"}
    assert all(p.stats.updates_sent == 3 and p.stats.rejected == 0 for p in parts)
    final = parts[0].model.weight.detach()
    # every participant ends with the same global model, closer to the target than at the start
    assert all(torch.equal(p.model.weight.detach(), final) for p in parts)
    start_err = float(torch.norm(torch.from_numpy(initial["weight"]) - TARGET))
    assert float(torch.norm(final - TARGET)) < 0.8 * start_err

    data = str(tmp_path / "data")
    status = cli_json("status", "--data-dir", data)
    (job,) = status["jobs"]
    assert job["job"] == "lin" and job["state"].startswith("ended") and job["model_version"] == 3
    assert job["ledger"]["granted"] == 3 and job["ledger"]["denied"] == 0
    assert 0 < job["ledger"]["epsilon_spent"] == pytest.approx(job["epsilon"])
    rows = {
        r["client"]: r for r in cli_json("clients", "--data-dir", data, "--pki-dir", str(fed.root))
    }
    assert set(rows) == set(clients)
    assert all(rows[c]["updates"] == 3 and rows[c]["revoked"] is False for c in clients)
    assert isinstance(cli_json("alerts", "--data-dir", data), list)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the tables render from the same data
        assert cli(["status", "--data-dir", data]) == 0
        assert cli(["clients", "--data-dir", data, "--pki-dir", str(fed.root)]) == 0
    assert "lin" in out.getvalue() and clients[0] in out.getvalue()

    # revoke: every kit's crl.qrl is rewritten, ingest's included, and `clients` shows it
    ingest_crl = fed.root / "services" / "ingest" / "crl.qrl"
    before = ingest_crl.read_bytes()
    monkeypatch.delenv("QFLARE_PASSPHRASE", raising=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["revoke", clients[1], "--pki-dir", str(fed.root)]) == 0
    assert "revocation list #2" in out.getvalue()
    assert ingest_crl.read_bytes() != before
    rows = {
        r["client"]: r for r in cli_json("clients", "--data-dir", data, "--pki-dir", str(fed.root))
    }
    assert rows[clients[1]]["revoked"] is True and rows[clients[0]]["revoked"] is False


def test_revoke_of_an_unknown_client_fails_cleanly(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["revoke", "no-such-client", "--pki-dir", str(fed.root)]) == 2
    assert "neither an issued id" in capsys.readouterr().err


def test_status_and_alerts_on_empty_state(tmp_path: Path) -> None:
    assert cli_json("status", "--data-dir", str(tmp_path))["jobs"] == []
    assert cli_json("alerts", "--data-dir", str(tmp_path)) == []
    np.testing.assert_equal(cli(["alerts", "--data-dir", str(tmp_path)]), 0)
