"""Participants on a real bus (memory and RabbitMQ) against a real ingest, with the
aggregator played by a test driver signing with the aggregator's identity: it declares the
job's streams, writes model versions into the model stream and announcements into the
broadcast stream, and reads accepted updates back from the update stream with the
aggregator's own KEM key (each update is sealed once for ingest, aggregator and detector)."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
import torch

from qflare.bus import (
    AccessRefused,
    Bus,
    BusUnavailable,
    Delivery,
    Outcome,
    QueueSpec,
    StreamReader,
    topology,
)
from qflare.client import Kit, Participant, RoundInfo
from qflare.client.participant import ACCESS_REFUSED
from qflare.crypto.testing import MemoryFederation, make_federation
from qflare.messages import Envelope, JobEnded, ModelPublished, RoundOpened, encode, open_envelope
from qflare.messages.tensors import model_digest
from qflare.runtime import Settings, build_service

JOB = "jc"


def global_model(version: int) -> dict[str, np.ndarray]:
    return {"weight": np.full((1, 2), float(version), np.float32), "bias": np.zeros(1, np.float32)}


def spec() -> list[dict[str, Any]]:
    return [
        {"name": "bias", "dtype": "float32", "shape": [1]},
        {"name": "weight", "dtype": "float32", "shape": [1, 2]},
    ]


def add_quarter(model: torch.nn.Module, info: RoundInfo) -> int:
    with torch.no_grad():
        model.weight += 0.25
    return 5


@dataclass
class Driver:
    bus: Bus
    fed: MemoryFederation
    accepted: asyncio.Queue[Envelope] = field(default_factory=asyncio.Queue)
    rejected: list[Envelope] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    readers: list[StreamReader] = field(default_factory=list)

    async def setup(self) -> None:
        """What the aggregator does when the job is submitted: declare the job's streams;
        and follow the model stream to learn where each version landed."""
        for stream in topology.job_streams(JOB):
            await self.bus.declare_stream(stream)
        self.readers.append(
            await self.bus.read_stream(
                topology.model_stream(JOB), self.on_model, offset="first", prefetch=4
            )
        )

    async def on_model(self, d: Delivery) -> Outcome:
        assert d.offset is not None
        self.offsets.append(d.offset)
        return Outcome.ACK

    async def on_event(self, d: Delivery) -> Outcome:
        env = open_envelope(d.body, self.fed.trust())
        if env.kind == "update.accepted":
            await self.accepted.put(env)
        else:
            self.rejected.append(env)
        return Outcome.ACK

    async def append_model(self, data: bytes) -> int:
        """Write a model envelope into the model stream; returns its offset (the driver is
        the stream's only writer, so the next offset it reads is this one's)."""
        seen = len(self.offsets)
        await self.bus.publish(topology.BROADCAST, f"{JOB}.model.published", data)
        await asyncio.wait_for(_until(lambda: len(self.offsets) > seen), 10)
        return self.offsets[seen]

    async def publish_model(
        self, version: int, *, tensors: dict | None = None, digest: bytes | None = None
    ) -> int:
        t = tensors if tensors is not None else global_model(version)
        body = ModelPublished(
            version=version, digest=digest or model_digest(t), epsilon=0.0, tensors=t
        )
        data = encode("model.published", body, self.fed["aggregator"], job=JOB, round=version)
        return await self.append_model(data)

    async def open_round(
        self,
        round_: int,
        participants: list[str],
        model_offset: int,
        *,
        digest: bytes | None = None,
        broadcast: bool = True,
    ) -> bytes:
        body = RoundOpened(
            model_version=round_ - 1,
            model_digest=digest or model_digest(global_model(round_ - 1)),
            participants=sorted(participants),
            deadline=time.time() + 120,
            min_updates=1,
            clip_norm=1.0,
            tensor_spec=spec(),
            rule="mean",
            model_offset=model_offset,
            updates_from=0,
        )
        data = encode("round.opened", body, self.fed["aggregator"], job=JOB, round=round_)
        await self.bus.publish(topology.EVENTS, f"round.opened.{JOB}", data)
        if broadcast:
            await self.bus.publish(topology.BROADCAST, f"{JOB}.round.opened", data)
        return data

    async def end(self, version: int, offset: int) -> None:
        body = JobEnded(
            reason="completed",
            model_version=version,
            model_digest=model_digest(global_model(version)),
            model_offset=offset,
        )
        data = encode("job.ended", body, self.fed["aggregator"], job=JOB, round=9)
        await self.bus.publish(topology.BROADCAST, f"{JOB}.job.ended", data)

    async def next_accepted(self, timeout: float = 20.0) -> Envelope:
        return await asyncio.wait_for(self.accepted.get(), timeout)

    async def tensors_of(self, accepted: Envelope) -> Mapping[str, np.ndarray]:
        """The accepted update's tensors, read from the update stream at its offset and
        opened with the aggregator's KEM key under the digest ingest accepted."""
        got: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()

        async def take(d: Delivery) -> Outcome:
            if d.offset == accepted.body.offset and not got.done():
                got.set_result(
                    open_envelope(
                        d.body,
                        self.fed.trust(),
                        kem_key=self.fed["aggregator"].kem,
                        vouched_digest=accepted.body.update_digest,
                    )
                )
            return Outcome.ACK

        reader = await self.bus.read_stream(
            topology.update_stream(JOB).name, take, offset=accepted.body.offset
        )
        try:
            env = await asyncio.wait_for(got, 10)
        finally:
            await reader.cancel()
        assert env.sender == accepted.body.client
        return env.body.tensors

    async def close(self) -> None:
        for reader in self.readers:
            await reader.cancel()


@pytest.fixture
async def world(bus_factory, tmp_path: Path) -> AsyncIterator[tuple[Driver, MemoryFederation, Any]]:
    bus = await bus_factory()
    fed = make_federation(clients=3, client_prefix=f"p{uuid.uuid4().hex[:6]}")
    settings = Settings(data_dir=tmp_path, services=MappingProxyType({"ingest": {"replica": "r1"}}))
    ingest = await build_service(
        "ingest", settings, bus=bus, identity=fed["ingest"], trust=fed.trust()
    )
    await ingest.start()
    driver = Driver(bus, fed)
    await driver.setup()
    sub = await bus.consume(
        QueueSpec("driver", bindings=((topology.EVENTS, "update.*.*"),)), driver.on_event
    )
    try:
        yield driver, fed, bus_factory
    finally:
        await sub.cancel()
        await driver.close()
        await ingest.stop()


def participant(fed: MemoryFederation, cid: str, bus: Bus, **kw: Any) -> Participant:
    kit = Kit(
        fed[cid],
        fed.trust(),
        fed["ingest"].cert,
        aggregator_cert=fed["aggregator"].cert,
        detector_cert=fed["detector"].cert,
    )
    torch.manual_seed(0)
    return Participant(
        kit,
        torch.nn.Linear(2, 1),
        kw.pop("train", add_quarter),
        broker=bus,
        prefix=bus.prefix,
        jobs=[JOB],
        **kw,
    )


async def test_selected_participants_send_sealed_deltas_that_ingest_accepts(world) -> None:
    driver, fed, bus_factory = world
    a, b, c = fed.clients
    parts = [participant(fed, cid, await bus_factory()) for cid in (a, b, c)]
    for p in parts:
        await p.start()
    try:
        v0 = await driver.publish_model(0)
        await driver.open_round(1, [a, b], v0)  # c is not selected
        got = {}
        for _ in range(2):
            env = await driver.next_accepted()
            got[env.body.client] = env
        assert set(got) == {a, b}
        for env in got.values():
            tensors = await driver.tensors_of(env)
            np.testing.assert_allclose(tensors["weight"], 0.25)
            np.testing.assert_allclose(tensors["bias"], 0.0)
            assert env.body.num_samples == 5 and env.body.base_version == 0
        await asyncio.wait_for(_until(lambda: parts[2].stats.rounds_seen == 1), 10)
        assert parts[2].stats.updates_sent == 0
        # round 2 from the new model: every participant trains from the global, not its own state
        v1 = await driver.publish_model(1)
        await driver.open_round(2, [a, b, c], v1)
        for _ in range(3):
            env = await driver.next_accepted()
            assert env.round == 2
            np.testing.assert_allclose((await driver.tensors_of(env))["weight"], 0.25)
        await driver.end(1, v1)
        for p in parts:
            await asyncio.wait_for(p.ended_event(JOB).wait(), 10)
            assert p.ended[JOB] == "completed"
            # the final global model is left in the user's model
            np.testing.assert_allclose(p.model.weight.detach().numpy(), 1.0)
        assert driver.rejected == []
    finally:
        for p in parts:
            await p.stop()


async def test_a_participant_that_starts_after_its_round_opened_trains_in_it(world) -> None:
    """The announcement waits in the job's broadcast stream: a late participant reads the
    newest one, fetches the model from the model stream and joins the open round."""
    driver, fed, bus_factory = world
    a = fed.clients[0]
    v0 = await driver.publish_model(0)
    await driver.open_round(1, [a], v0)
    await asyncio.sleep(0.3)
    p = participant(fed, a, await bus_factory())
    await p.start()
    try:
        env = await driver.next_accepted()
        assert env.round == 1 and env.body.client == a
        np.testing.assert_allclose((await driver.tensors_of(env))["weight"], 0.25)
    finally:
        await p.stop()


def unroutable_updates(p: Participant, times: int) -> list[str]:
    """Make the participant's first ``times`` update publishes come back unroutable (what
    publish returns when no binding matched); returns the keys so refused."""
    assert p.bus is not None
    real = p.bus.publish
    refused: list[str] = []

    async def publish(exchange: str, key: str, body: bytes, headers: Any = None) -> bool:
        if key.startswith("update.") and len(refused) < times:
            refused.append(key)
            return False
        return await real(exchange, key, body, headers)

    p.bus.publish = publish  # type: ignore[method-assign]
    return refused


async def test_an_update_no_stream_took_is_published_again(world) -> None:
    """A publish that no binding matched (the job's update stream not bound, as for a moment
    when a broker restarts) is not an update sent: the participant publishes it again
    until a stream takes it, and counts it sent only then."""
    driver, fed, bus_factory = world
    a = fed.clients[0]
    p = participant(fed, a, await bus_factory())
    await p.start()
    assert p.bus is not None
    refused = unroutable_updates(p, 3)
    try:
        v0 = await driver.publish_model(0)
        await driver.open_round(1, [a], v0)
        env = await driver.next_accepted()
        assert env.round == 1 and env.body.client == a and len(refused) == 3
        await asyncio.wait_for(_until(lambda: p.stats.updates_sent == 1), 10)
        assert p.stats.rounds_missed == 0
    finally:
        await p.stop()


async def test_an_update_no_stream_takes_before_the_deadline_is_not_counted_sent(world) -> None:
    _driver, fed, bus_factory = world
    a = fed.clients[0]
    p = participant(fed, a, await bus_factory())
    await p.start()
    assert p.bus is not None
    tries = unroutable_updates(p, 1_000_000)
    try:
        info = RoundInfo(JOB, 1, a, 0, b"", time.time() + 0.5, 1.0, (a,), "mean")
        assert not await p._send_update(b"an update", info)
        assert len(tries) >= 2 and set(tries) == {f"update.{JOB}"}
    finally:
        await p.stop()


async def test_a_participant_started_before_its_job_exists_waits_for_the_streams(
    bus_factory,
) -> None:
    bus = await bus_factory()
    fed = make_federation(clients=1, client_prefix=f"w{uuid.uuid4().hex[:6]}")
    p = participant(fed, fed.clients[0], await bus_factory(), declare="passive")
    await p.start()
    try:
        await asyncio.sleep(0.3)  # no stream yet: the participant keeps looking
        assert p.stats.rounds_seen == 0
        driver = Driver(bus, fed)
        await driver.setup()
        v0 = await driver.publish_model(0)
        await driver.open_round(1, [fed.clients[0]], v0)
        await asyncio.wait_for(_until(lambda: p.stats.rounds_seen == 1), 15)
        await driver.close()
    finally:
        await p.stop()


def failing_broadcast_reads(bus: Bus, errors: list[Exception]) -> list[str]:
    """Make ``bus.read_stream`` raise ``errors`` in turn for the broadcast stream (then read
    it); returns the streams asked for."""
    read = bus.read_stream
    asked: list[str] = []

    async def flaky(stream: Any, handler: Any, **kw: Any) -> StreamReader:
        asked.append(str(stream))
        if str(stream) == topology.broadcast_stream(JOB).name and errors:
            raise errors.pop(0)
        return await read(stream, handler, **kw)

    bus.read_stream = flaky  # type: ignore[method-assign]
    return asked


async def test_a_participant_whose_broadcast_read_fails_for_a_while_goes_on_trying(world) -> None:
    """The broker stays away longer than the bus retries an attach (BusUnavailable), then
    an error nobody foresaw: the participant tries again and trains when the round opens.
    Before, its follower died of the error and the participant waited for its job's end
    until its timeout."""
    driver, fed, bus_factory = world
    a = fed.clients[0]
    bus = await bus_factory()
    errors: list[Exception] = [BusUnavailable("broker away"), RuntimeError("an unforeseen fault")]
    asked = failing_broadcast_reads(bus, errors)
    p = participant(fed, a, bus)
    await p.start()
    try:
        await asyncio.wait_for(_until(lambda: len(asked) >= 3), 15)
        v0 = await driver.publish_model(0)
        await driver.open_round(1, [a], v0)
        assert (await driver.next_accepted(timeout=30)).body.client == a
    finally:
        await p.stop()


async def test_a_participant_that_may_not_read_its_jobs_stream_ends_that_job(world) -> None:
    """A refused read of the broadcast stream does not heal by retrying: the job ends for
    the participant as ``access_refused`` and ``run`` returns."""
    _, fed, bus_factory = world
    bus = await bus_factory()
    failing_broadcast_reads(bus, [AccessRefused("may not read broadcast.jc")])
    p = participant(fed, fed.clients[0], bus)
    assert await asyncio.wait_for(p.run(JOB), 15) == ACCESS_REFUSED
    assert p.stats.last_error is not None and "may not read" in p.stats.last_error


async def test_tampered_or_mismatched_models_are_never_trained_on(world) -> None:
    driver, fed, bus_factory = world
    a = fed.clients[0]
    p = participant(fed, a, await bus_factory())
    await p.start()
    try:
        # 1. a model whose tensors do not hash to the digest the aggregator signed
        wrong = await driver.publish_model(0, digest=model_digest(global_model(5)))
        await driver.open_round(1, [a], wrong, digest=model_digest(global_model(5)))
        await asyncio.wait_for(_until(lambda: p.stats.rejected == 1), 10)
        assert p.latest_model(JOB) is None
        # 2. the right model, but a round that names another digest
        good = await driver.publish_model(0)
        await driver.open_round(1, [a], good, digest=model_digest(global_model(7)))
        await asyncio.wait_for(_until(lambda: p.stats.rejected == 2), 10)
        assert p.stats.updates_sent == 0 and "BAD_DIGEST" in p.stats.last_error
        # 3. bytes altered in transit: the envelope digest fails
        body = ModelPublished(
            version=0, digest=model_digest(global_model(0)), epsilon=0.0, tensors=global_model(0)
        )
        data = bytearray(encode("model.published", body, fed["aggregator"], job=JOB, round=0))
        data[-2] ^= 0x40
        altered = await driver.append_model(bytes(data))
        await driver.open_round(1, [a], altered)
        await asyncio.wait_for(_until(lambda: p.stats.rejected == 3), 10)
        # 4. an offset that holds something else than the named version
        await driver.open_round(1, [a], good, digest=model_digest(global_model(1)))
        await asyncio.wait_for(_until(lambda: p.stats.rejected == 4), 10)
        assert p.stats.updates_sent == 0
        # the honest round still works, and the same round.opened again sends nothing twice
        v1 = await driver.publish_model(1)
        opened = await driver.open_round(2, [a], v1, broadcast=False)
        await driver.bus.publish(topology.BROADCAST, f"{JOB}.round.opened", opened)
        env = await driver.next_accepted()
        assert env.round == 2 and env.body.client == a
        await driver.bus.publish(topology.BROADCAST, f"{JOB}.round.opened", opened)
        await asyncio.sleep(0.3)
        assert p.stats.updates_sent == 1 and driver.accepted.empty()
    finally:
        await p.stop()


async def test_byzantine_hook_replaces_the_update(world) -> None:
    driver, fed, bus_factory = world
    a = fed.clients[0]

    def flip(update: dict[str, np.ndarray], info: RoundInfo) -> dict[str, np.ndarray]:
        return {k: -4.0 * v for k, v in update.items()}

    p = participant(fed, a, await bus_factory(), update_transform=flip)
    await p.start()
    try:
        v0 = await driver.publish_model(0)
        await driver.open_round(1, [a], v0)
        env = await driver.next_accepted()
        np.testing.assert_allclose((await driver.tensors_of(env))["weight"], -1.0)
    finally:
        await p.stop()


@pytest.mark.rabbitmq
async def test_participant_recovers_after_its_connection_is_cut(
    rabbit_bus_factory, tmp_path: Path
) -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed")
    bus = await rabbit_bus_factory()
    fed = make_federation(clients=1, client_prefix=f"r{uuid.uuid4().hex[:6]}")
    settings = Settings(data_dir=tmp_path, services=MappingProxyType({"ingest": {"replica": "r1"}}))
    ingest = await build_service(
        "ingest", settings, bus=bus, identity=fed["ingest"], trust=fed.trust()
    )
    await ingest.start()
    driver = Driver(bus, fed)
    await driver.setup()
    sub = await bus.consume(
        QueueSpec("driver", bindings=((topology.EVENTS, "update.*.*"),)), driver.on_event
    )
    name = f"qflare-test-client-{uuid.uuid4().hex[:8]}"
    a = fed.clients[0]
    p = participant(fed, a, await rabbit_bus_factory(connection_name=name, reconnect_interval=0.5))
    await p.start()
    try:
        v0 = await driver.publish_model(0)
        await driver.open_round(1, [a], v0)
        assert (await driver.next_accepted()).round == 1
        await _close_our_connection(name)
        v1 = await driver.publish_model(1)
        await driver.open_round(2, [a], v1)
        env = await driver.next_accepted(timeout=30)
        assert env.round == 2 and env.body.client == a
    finally:
        await p.stop()
        await sub.cancel()
        await driver.close()
        await ingest.stop()


async def _close_our_connection(name: str) -> None:
    """Close our participant's connection from the broker side (found by its name), so
    other users of the shared broker are not disturbed."""

    async def ctl(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    listing = await ctl("list_connections", "pid", "client_properties", "-q", "--no-table-headers")
    pids = [line.split("\t")[0] for line in listing.splitlines() if f'"{name}"' in line]
    assert len(pids) == 1, f"expected one connection named {name}, got {pids}"
    await ctl("close_connection", pids[0], "qflare test: forced close")


async def _until(pred: Any) -> None:
    while not pred():
        await asyncio.sleep(0.01)


async def test_an_update_above_the_part_threshold_goes_as_parts_that_ingest_accepts(
    world,
) -> None:
    """Past ``part_threshold_bytes`` the participant sends its update as a manifest and
    parts (sealed like an update); ingest vouches for the manifest, and a reader opens each
    part under the digest the manifest names. One update counts once, whatever its parts."""
    driver, fed, bus_factory = world
    a = fed.clients[0]
    p = participant(fed, a, await bus_factory(), part_threshold_bytes=1, part_values=2)
    await p.start()
    try:
        v0 = await driver.publish_model(0)
        await driver.open_round(1, [a], v0)
        env = await driver.next_accepted()
        assert env.body.client == a and env.body.num_samples == 5
        # the participant counts its update once its send returns, which can be after
        # ingest has accepted it (the last parts' confirmations)
        await asyncio.wait_for(_until(lambda: p.stats.updates_sent == 1), 10)
        assert p.stats.sent == [(JOB, 1)]
        got: list[bytes] = []
        done = asyncio.Event()

        async def take(d: Delivery) -> Outcome:
            got.append(d.body)
            if len(got) == 3:
                done.set()
            return Outcome.ACK

        reader = await driver.bus.read_stream(
            topology.update_stream(JOB).name, take, offset=env.body.offset
        )
        try:
            await asyncio.wait_for(done.wait(), 10)
        finally:
            await reader.cancel()
        kem = fed["aggregator"].kem
        manifest = open_envelope(
            got[0], fed.trust(), kem_key=kem, vouched_digest=env.body.update_digest
        )
        assert manifest.kind == "update.manifest" and manifest.sender == a
        assert [t.name for t in manifest.body.tensors] == ["bias", "weight"]
        values = [
            open_envelope(data, fed.trust(), kem_key=kem, vouched_digest=digest).body.values
            for data, digest in zip(got[1:], manifest.body.part_digests, strict=True)
        ]
        # Layout order: bias (1 value), then weight (2); 2 values a part
        np.testing.assert_allclose(np.concatenate(values), [0.0, 0.25, 0.25])
    finally:
        await p.stop()


async def test_part_options_are_checked(world) -> None:
    _driver, fed, bus_factory = world
    bus = await bus_factory()
    for option in ("part_values", "part_threshold_bytes"):
        with pytest.raises(ValueError, match=f"{option} must be an int >= 1"):
            participant(fed, fed.clients[0], bus, **{option: 0})
