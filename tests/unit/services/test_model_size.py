"""A job whose model is larger than one message is taken: the services store it and the
aggregator writes its version 0 into the job's model stream as a manifest and parts, read
back bit for bit. (Until models and updates travelled in parts, such a job was refused at
submission with ModelTooLarge.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from qflare.bus import Delivery, Outcome, connect_bus, topology
from qflare.crypto import Federation, provision
from qflare.messages import DEFAULT_LIMITS
from qflare.messages.envelope import peek_header
from qflare.messages.models import ModelReader, ReceivedModel, opener
from qflare.messages.parts import DEFAULT_MODEL_PART_BYTES, part_count
from qflare.messages.tensors import model_digest
from qflare.runtime import JobSpec, load_settings, run_in_process


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return provision(tmp_path_factory.mktemp("pki"), clients=2)


def _spec(job_id: str) -> JobSpec:
    return JobSpec.model_validate(
        dict(
            job_id=job_id,
            rounds=1,
            participants=["client-000", "client-001"],
            rule="mean",
            f=0,
            detection=False,
            noise_multiplier=0.0,
            epsilon_budget=10.0,
            seed=1,
            min_updates=2,
            deadline_s=600.0,
        )
    )


async def test_a_job_whose_model_exceeds_one_message_is_taken(
    fed: Federation, tmp_path: Path
) -> None:
    nbytes = DEFAULT_LIMITS.max_envelope_bytes + 4 * 2**20
    big = {
        "b": np.arange(7, dtype=np.float32),
        "w": np.arange(nbytes // 4, dtype=np.float32),  # distinct values: bit for bit
    }
    bus = await connect_bus(f"memory://size-{tmp_path.name}")
    settings = load_settings(None, env={}, data_dir=str(tmp_path / "data"))
    names = ["detector", "accountant", "aggregator"]
    ids = {n: (fed.identity(n), fed.trust()) for n in names}
    reader = ModelReader(opener(fed.trust()))
    kinds: list[str] = []
    got: asyncio.Future[ReceivedModel] = asyncio.get_running_loop().create_future()

    async def take(d: Delivery) -> Outcome:
        kinds.append(peek_header(d.body).kind)
        model = await reader.take(d.body)
        if model is not None and not got.done():
            got.set_result(model)
        return Outcome.ACK

    async with run_in_process(settings, bus, services=names, identities=ids) as running:
        await running.submit_job(_spec("big"), big)
        aggregator = running.services["aggregator"]
        assert await aggregator.store.job_spec("big") is not None  # type: ignore[attr-defined]
        stream = await bus.read_stream(topology.model_stream("big"), take, offset="first")
        try:
            model = await asyncio.wait_for(got, 120)
        finally:
            await stream.cancel()
    await bus.close()
    parts = part_count(nbytes + 28, DEFAULT_MODEL_PART_BYTES)
    assert kinds == ["model.manifest", *["model.part"] * parts]
    assert model.version == 0 and model.digest == model_digest(big)
    assert all(np.array_equal(model.tensors[k], v) for k, v in big.items())
