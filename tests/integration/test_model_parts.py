"""Model versions larger than the aggregator's part threshold travel into the job's model
stream as a signed manifest and parts (qflare.messages.models), on both buses: participants
load them bit for bit, and a tampered, forged or missing part is refused with its reason
code and never trained on."""

from __future__ import annotations

import asyncio
import time
import uuid
import zlib
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load

from qflare.bus import Bus, Delivery, Outcome, topology
from qflare.client import Kit, Participant, RoundInfo, model_tensors
from qflare.crypto import Federation, provision
from qflare.crypto.testing import MemoryFederation, make_federation
from qflare.messages import RoundOpened, encode, open_envelope
from qflare.messages.envelope import peek_header
from qflare.messages.models import ModelReader, model_envelopes, opener
from qflare.messages.tensors import model_digest
from qflare.runtime import JobSpec, Settings, run_in_process

JOB = "mp"
TARGET = torch.tensor([[1.0, -2.0, 0.5]])


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def train(model: torch.nn.Module, info: RoundInfo) -> int:
    g = torch.Generator().manual_seed(zlib.crc32(f"{info.client}/{info.round}".encode()))
    x = torch.randn(32, 3, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), x @ TARGET.T).backward()
        opt.step()
    return len(x)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return provision(tmp_path_factory.mktemp("pki"), clients=3)


async def _stream(bus: Bus, job: str) -> list[bytes]:
    """Every envelope in the job's model stream so far, in order."""
    got: list[bytes] = []

    async def take(d: Delivery) -> Outcome:
        got.append(bytes(d.body))
        return Outcome.ACK

    reader = await bus.read_stream(topology.model_stream(job), take, offset="first")
    await asyncio.sleep(0.5)
    await reader.cancel()
    return got


async def test_the_aggregator_writes_large_models_in_parts_and_participants_load_them(
    fed: Federation, bus_factory: Any, tmp_path: Path
) -> None:
    """The real services, the model (16 bytes) over a threshold of 8 bytes, parts of 5
    bytes (4 parts, two across the bias/weight boundary); the participants' updates in
    parts too, so a model over the threshold travels both ways."""
    clients = sorted(fed.clients)
    job = f"{JOB}{uuid.uuid4().hex[:6]}"
    spec = JobSpec.model_validate(
        dict(
            job_id=job,
            rounds=2,
            participants=clients,
            rule="mean",
            f=0,
            detection=False,
            noise_multiplier=0.0,
            clip=2.0,
            seed=7,
            deadline_s=30.0,
            min_updates=len(clients),
        )
    )
    bus = await bus_factory()
    settings = Settings(
        data_dir=tmp_path / "data",
        pki_dir=fed.root,
        services=MappingProxyType(
            {"aggregator": {"model_part_threshold_bytes": 8, "model_part_bytes": 5}}
        ),
    )
    services = ["alerting", "accountant", "detector", "ingest", "aggregator"]
    ids = {n: (fed.identity(n), fed.trust()) for n in services}
    parts = [
        Participant.from_kit(
            fed.clients[c],
            make_model(),
            train,
            broker=bus,
            prefix=bus.prefix,
            jobs=[job],
            part_threshold_bytes=8,  # the updates in parts too: 4 values, 3 a part
            part_values=3,
        )
        for c in clients
    ]
    async with run_in_process(settings, bus, services=services, identities=ids) as running:
        for p in parts:
            await p.start()
        try:
            await running.submit_job(spec, model_tensors(make_model()))
            ended = asyncio.gather(*(p.ended_event(job).wait() for p in parts))
            await asyncio.wait_for(ended, 60)
            stream = await _stream(bus, job)
        finally:
            for p in parts:
                await p.stop()

    assert {p.ended[job] for p in parts} == {"completed"}
    assert all(p.stats.updates_sent == 2 and p.stats.rejected == 0 for p in parts)
    kinds = [peek_header(d).kind for d in stream]
    # versions 0, 1 and 2, each a manifest and 4 parts
    assert kinds == ["model.manifest", *["model.part"] * 4] * 3
    reader = ModelReader(opener(fed.trust()))
    models = [m for d in stream if (m := await reader.take(d)) is not None]
    assert [m.version for m in models] == [0, 1, 2]
    stored = st_load(
        (tmp_path / "data" / "aggregator" / f"models/{job}/v00002.safetensors").read_bytes()
    )
    assert model_digest(models[-1].tensors) == model_digest(stored)
    for p in parts:
        version, tensors = p.latest_model(job)  # type: ignore[misc]
        assert version == 2 and model_digest(tensors) == model_digest(stored)
        assert all(np.array_equal(tensors[k], stored[k]) for k in stored)
        assert list(p.models[job]) == [2]  # a model in parts is held once, not two versions


# -- a participant against a hand-written model stream -----------------------------------


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "a": rng.standard_normal((4, 5)).astype(np.float32),
        "b": rng.standard_normal(7).astype(np.float64),
    }


async def _append(bus: Bus, data: list[bytes]) -> int:
    """Write envelopes into the model stream; returns the first one's offset."""
    offsets: list[int] = []

    async def take(d: Delivery) -> Outcome:
        assert d.offset is not None
        offsets.append(d.offset)
        return Outcome.ACK

    reader = await bus.read_stream(topology.model_stream(JOB), take, offset="next")
    try:
        await asyncio.sleep(0.2)
        for d in data:
            await bus.publish(topology.BROADCAST, f"{JOB}.model.published", d)
        deadline = time.monotonic() + 10
        while len(offsets) < len(data) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await reader.cancel()
    assert len(offsets) == len(data)
    return offsets[0]


async def _open_round(bus: Bus, fed: MemoryFederation, client: str, offset: int, n: int) -> None:
    model = _model()
    body = RoundOpened(
        model_version=0,
        model_digest=model_digest(model),
        participants=[client],
        deadline=time.time() + 60,
        min_updates=1,
        clip_norm=1.0,
        tensor_spec=[
            {"name": k, "dtype": str(v.dtype), "shape": list(v.shape)} for k, v in model.items()
        ],
        rule="mean",
        model_offset=offset,
        updates_from=0,
    )
    data = encode("round.opened", body, fed["aggregator"], job=JOB, round=n)
    await bus.publish(topology.BROADCAST, f"{JOB}.round.opened", data)


async def _parts(fed: MemoryFederation, **kw: Any) -> list[bytes]:
    model = _model()
    return [
        d
        async for d in model_envelopes(
            fed["aggregator"],
            model,
            job=JOB,
            round=0,
            version=0,
            digest=model_digest(model),
            epsilon=0.0,
            threshold=64,
            part_bytes=24,
            **kw,
        )
    ]


def _tamper(data: bytes) -> bytes:
    out = bytearray(data)
    out[-2] ^= 0x40  # in the body: no longer hashes to the signed digest
    return bytes(out)


def _other(fed: MemoryFederation, genuine: bytes, signer: Any) -> bytes:
    """Other bytes in the part's place, signed by ``signer``. The genuine part's own bytes,
    re-signed by anyone, open under the manifest's digest: they are the genuine bytes."""
    body = open_envelope(genuine, fed.trust()).body
    other = body.model_copy(update={"data": np.zeros_like(body.data)})
    return encode("model.part", other, signer, job=JOB, round=0)


def _forge(fed: MemoryFederation, genuine: bytes) -> bytes:
    """Signed by an aggregator of another federation (a CA not trusted)."""
    return _other(fed, genuine, make_federation(clients=1, client_prefix="x")["aggregator"])


CASES = {
    "tampered": (lambda fed, ps: [*ps[:2], _tamper(ps[2]), *ps[3:]], "BAD_DIGEST"),
    "missing": (lambda fed, ps: [*ps[:2], *ps[3:]], "CHUNK_MISMATCH"),
    "duplicate": (lambda fed, ps: [*ps[:2], ps[1], *ps[2:]], "DUPLICATE"),
    "forged": (lambda fed, ps: [*ps[:2], _forge(fed, ps[2]), *ps[2:]], "UNKNOWN_SIGNER"),
    "not named": (
        lambda fed, ps: [*ps[:2], _other(fed, ps[2], fed["aggregator"]), *ps[2:]],
        "BAD_DIGEST",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_bad_model_part_is_refused_and_never_trained_on(bus_factory, case: str) -> None:
    fed = make_federation(clients=1, client_prefix=f"m{uuid.uuid4().hex[:6]}")
    client = fed.clients[0]
    bus = await bus_factory()
    for stream in topology.job_streams(JOB):
        await bus.declare_stream(stream)
    kit = Kit(
        fed[client],
        fed.trust(),
        fed["ingest"].cert,
        aggregator_cert=fed["aggregator"].cert,
        detector_cert=fed["detector"].cert,
    )
    p = Participant(kit, torch.nn.Linear(2, 1), train, broker=bus, prefix=bus.prefix, jobs=[JOB])
    await p.start()
    try:
        genuine = await _parts(fed)
        assert len(genuine) == 1 + 6  # 80 + 56 bytes in parts of 24
        make, reason = CASES[case]
        offset = await _append(bus, make(fed, genuine))
        await _open_round(bus, fed, client, offset, 1)
        deadline = time.monotonic() + 10
        while p.stats.rejected == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert p.stats.rejected == 1 and p.stats.last_error.startswith(reason)
        assert p.latest_model(JOB) is None and p.stats.updates_sent == 0
        # the genuine model written again loads bit for bit
        offset = await _append(bus, await _parts(fed))
        got: dict[str, np.ndarray] = dict(
            await p._fetch_model(JOB, 0, model_digest(_model()), offset)
        )
        assert all(
            got[k].dtype == v.dtype and np.array_equal(got[k], v) for k, v in _model().items()
        )
    finally:
        await p.stop()


async def test_a_model_read_times_out_on_silence_not_on_its_length(bus_factory) -> None:
    """model_wait_s bounds the time with nothing read: parts that keep coming slower than
    it in total still make the model; parts that stop give TimeoutError."""
    fed = make_federation(clients=1, client_prefix=f"s{uuid.uuid4().hex[:6]}")
    bus = await bus_factory()
    for stream in topology.job_streams(JOB):
        await bus.declare_stream(stream)
    kit = Kit(fed[fed.clients[0]], fed.trust(), fed["ingest"].cert)
    p = Participant(
        kit, torch.nn.Linear(2, 1), train, broker=bus, prefix=bus.prefix, jobs=[JOB], seal=False
    )
    p.model_wait_s = 1.5
    await p.start()
    try:
        genuine = await _parts(fed)
        digest = model_digest(_model())
        first = await _append(bus, genuine[:3])
        fetch = asyncio.get_running_loop().create_task(p._fetch_model(JOB, 0, digest, first))
        for d in genuine[3:]:  # 4 more parts, about 0.5 s apart: 2 s in all, > model_wait_s
            await asyncio.sleep(0.3)
            await _append(bus, [d])
        got = await asyncio.wait_for(fetch, 10)
        assert model_digest(dict(got)) == digest
        p.models.clear()
        cut = await _append(bus, (await _parts(fed))[:4])  # its last parts never come
        with pytest.raises(TimeoutError, match="nothing read"):
            await p._fetch_model(JOB, 0, digest, cut)
    finally:
        await p.stop()


async def test_a_model_read_is_let_go_once_the_participant_gives_it_up(bus_factory) -> None:
    """Nothing of a finished read keeps the model alive (the bus may keep a cancelled
    reader's handler for a while): a participant of a large model holds it once."""
    import gc
    import weakref

    fed = make_federation(clients=1, client_prefix=f"g{uuid.uuid4().hex[:6]}")
    bus = await bus_factory()
    for stream in topology.job_streams(JOB):
        await bus.declare_stream(stream)
    kit = Kit(fed[fed.clients[0]], fed.trust(), fed["ingest"].cert)
    p = Participant(
        kit, torch.nn.Linear(2, 1), train, broker=bus, prefix=bus.prefix, jobs=[JOB], seal=False
    )
    await p.start()
    try:
        offset = await _append(bus, await _parts(fed))
        got = await p._fetch_model(JOB, 0, model_digest(_model()), offset)
        alive = [weakref.ref(a) for a in got.values()]
        del got
        p.models.clear()
        gc.collect()
        assert [r() is None for r in alive] == [True] * len(alive)
    finally:
        await p.stop()
