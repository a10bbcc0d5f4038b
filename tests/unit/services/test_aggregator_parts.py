"""The aggregator and the detector on updates sent in parts (``update.manifest`` +
``update.part``), on the embedded bus, through the bootstrap (the Harness of
test_aggregator_service, whose clients here send every update in parts and whose ingest
accepts each manifest, at its offset, as soon as it reads it: the parts are still being
written when the verdict comes). The rounds' models are those of whole updates, bit for bit,
read ahead, in a file past the memory budget, or read again after a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_aggregator_service as base
from test_aggregator_service import Harness, job, run_job

from qflare.bus import Delivery, Outcome, topology
from qflare.crypto import Federation
from qflare.messages import encode, open_envelope
from qflare.messages.parts import encode_update_parts

PART_VALUES = 16  # 54 values: 4 parts
federation = base.federation  # the fixture


class PartsHarness(Harness):
    """Clients that send their updates in parts; ingest accepts the manifests."""

    async def send_update(
        self, job: str, round_no: int, client: str, version: int, tensors: dict
    ) -> None:
        readers = [self.fed.identity(r).cert for r in ("ingest", "aggregator", "detector")]
        for data in encode_update_parts(
            self.fed.identity(client),
            tensors,
            job=job,
            round=round_no,
            base_version=version,
            num_samples=10,
            seal_to=readers,
            part_values=PART_VALUES,
        ):
            await self.bus.publish(topology.CLIENT, f"update.{job}", data)

    async def on_update(self, d: Delivery) -> Outcome:
        env = open_envelope(d.body, self.fed.trust(), kem_key=self.fed.identity("ingest").kem)
        if env.kind != "update.manifest":
            return Outcome.ACK
        body = {
            "client": env.sender,
            "update_digest": env.body_digest,
            "base_version": env.body.base_version,
            "num_samples": env.body.num_samples,
            "offset": d.offset,
        }
        data = encode(
            "update.accepted", body, self.fed.identity("ingest"), job=env.job, round=env.round
        )
        await self.bus.publish(topology.EVENTS, f"update.accepted.{env.job}", data)
        return Outcome.ACK


@pytest.mark.parametrize(
    ("options", "restart"),
    [({}, None), ({"rows_in_memory_mb": 0}, None), ({}, 2)],
    ids=["in-memory", "spilled", "restart-mid-round"],
)
async def test_rounds_on_updates_in_parts_give_the_model_of_whole_updates(
    federation: Federation,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    options: dict[str, Any],
    restart: int | None,
) -> None:
    spec = job(rounds=3)
    kw: dict[str, Any] = dict(aggregator_options=options or None, restart_in_round=restart)
    h1, whole = await run_job(federation, tmp_path / "whole", spec, **kw)
    kept: list[Any] = []
    from qflare.services.aggregator import service as aggregator_module

    real_keep = aggregator_module.Aggregator._keep

    async def keep(self: Any, job_id: str, update: Any) -> Any:
        kept.append(update)
        return await real_keep(self, job_id, update)

    monkeypatch.setattr(aggregator_module.Aggregator, "_keep", keep)
    monkeypatch.setattr(base, "Harness", PartsHarness)
    h2, parted = await run_job(federation, tmp_path / "parts", spec, **kw)
    assert h1.end_reason == h2.end_reason == "completed"
    assert h1.verdicts == h2.verdicts and h1.published == h2.published
    for name, tensor in whole.items():
        assert np.array_equal(tensor, parted[name]), name
    assert kept and all(u.tensors == {} and u.layout is not None for u in kept)


@pytest.mark.parametrize(
    ("options", "restart"),
    [({}, None), ({"rows_in_memory_mb": 0}, None), ({"rows_in_memory_mb": 0}, 2)],
    ids=["rows-in-memory", "rows-spilled", "restart-mid-round"],
)
async def test_a_model_too_large_to_hold_is_aggregated_file_to_file_bit_for_bit(
    federation: Federation,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    options: dict[str, Any],
    restart: int | None,
) -> None:
    """Past MODEL_IN_MEMORY_BYTES (here 0: every model) the aggregator never loads a model
    whole: the job's initial model is copied into its store, each round reads its base from
    the file and writes the new version into its own, and publishes it from there. The
    models are those of the in-memory path, bit for bit."""
    from qflare.services.aggregator import service as aggregator_module

    spec = job(rounds=3)
    kw: dict[str, Any] = dict(aggregator_options=options or None, restart_in_round=restart)
    h1, whole = await run_job(federation, tmp_path / "memory", spec, **kw)
    loaded: list[Any] = []
    real_model = aggregator_module.Aggregator._model

    async def model(self: Any, job_id: str, version: int) -> Any:
        loaded.append(version)
        return await real_model(self, job_id, version)

    monkeypatch.setattr(aggregator_module, "MODEL_IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(aggregator_module.Aggregator, "_model", model)
    monkeypatch.setattr(base, "Harness", PartsHarness)
    h2, files = await run_job(federation, tmp_path / "files", spec, **kw)
    assert h1.end_reason == h2.end_reason == "completed"
    assert h1.verdicts == h2.verdicts and h1.published == h2.published
    for name, tensor in whole.items():
        assert np.array_equal(tensor, files[name]), name
    assert loaded == []  # no version was loaded whole
    assert not list((tmp_path / "files").rglob("combined-*"))  # scratch files given back
