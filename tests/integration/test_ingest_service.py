"""Ingest on a real bus (memory and RabbitMQ), on the data plane of docs/architecture.md
("The data plane"): the test writes client updates into the job's stream ``updates.<job>``
as clients do, plays the aggregator (declares the stream, announces and closes rounds) and
reads ingest's verdicts. Every message in the stream gets exactly one verdict naming its
offset: ``update.accepted`` with the digest of the bytes at that offset, or
``update.rejected`` with the reason code and an alert; hostile messages never stop the
honest ones behind them. Deadlines are the aggregator's: ingest refuses ROUND_CLOSED only
once it heard ``round.closed``."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest

from qflare.bus import Bus, BusUnavailable, Delivery, Outcome, QueueSpec, StreamReader, topology
from qflare.crypto.testing import MemoryFederation, make_federation
from qflare.messages import (
    Envelope,
    Reason,
    RoundClosed,
    RoundOpened,
    Update,
    encode,
    open_envelope,
)
from qflare.messages.bodies import TensorShape, UpdateManifest, UpdatePart
from qflare.messages.envelope import peek_header
from qflare.messages.parts import encode_update_parts
from qflare.messages.tensors import model_digest
from qflare.runtime import Settings, build_service
from qflare.services.ingest.service import SHARE_ENV

JOB = "j1"
SPEC = [
    {"name": "w", "dtype": "float32", "shape": [4, 3]},
    {"name": "b", "dtype": "float32", "shape": [3]},
]
#: The services an update is sealed for (docs/architecture.md, "The data plane").
READERS = ("ingest", "aggregator", "detector")


def tensors(scale: float = 0.1) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 3), scale, np.float32), "b": np.full(3, scale, np.float32)}


def round_opened(
    fed: MemoryFederation,
    round_: int,
    *,
    version: int,
    participants: list[str],
    updates_from: int = 0,
    deadline: float | None = None,
    job: str = JOB,
) -> bytes:
    body = RoundOpened(
        model_version=version,
        model_digest=model_digest(tensors(0.0)),
        participants=sorted(participants),
        deadline=deadline if deadline is not None else time.time() + 600,
        min_updates=1,
        clip_norm=1.0,
        tensor_spec=SPEC,
        rule="mean",
        model_offset=version,
        updates_from=updates_from,
    )
    return encode("round.opened", body, fed["aggregator"], job=job, round=round_)


def update(
    fed: MemoryFederation,
    client: str,
    round_: int,
    *,
    version: int = 0,
    job: str = JOB,
    t: dict[str, np.ndarray] | None = None,
    seal_to: tuple[str, ...] = READERS,
    identity: Any = None,
) -> bytes:
    """A client's update as clients write it: signed, sealed once for ``seal_to``."""
    ident = identity or fed[client]
    body = Update(base_version=version, num_samples=10, tensors=t if t is not None else tensors())
    readers = [fed[r].cert for r in seal_to] or None
    return encode("update", body, ident, job=job, round=round_, seal_to=readers)


@dataclass
class Tap:
    """The job's update stream as written, read by the test from its first message: the
    offsets the verdicts must name."""

    written: list[tuple[int, bytes]] = field(default_factory=list)
    grew: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_message(self, d: Delivery) -> Outcome:
        assert d.offset is not None
        self.written.append((d.offset, d.body))
        self.grew.set()
        return Outcome.ACK

    @property
    def offsets(self) -> list[int]:
        return [o for o, _ in self.written]


@dataclass
class Watcher:
    """The verified events ingest publishes: verdicts by (job, offset), alerts in order."""

    trust: Any
    verdicts: dict[tuple[str, int], list[Envelope[Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    alerts: list[Envelope[Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_event(self, d: Delivery) -> Outcome:
        env = open_envelope(d.body, self.trust)
        if env.kind == "alert.raised":
            self.alerts.append(env)
        else:
            self.verdicts[(env.job, env.body.offset)].append(env)
        self.changed.set()
        return Outcome.ACK

    async def until(self, pred: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()

    async def verdict(self, offset: int, job: str = JOB) -> Envelope[Any]:
        """The verdict on the message at ``offset``."""
        await self.until(lambda: bool(self.verdicts.get((job, offset))))
        return self.verdicts[(job, offset)][0]

    async def alert(self, reason: Reason) -> Envelope[Any]:
        """The oldest alert with ``reason`` not taken yet."""

        def found() -> Envelope[Any] | None:
            return next((a for a in self.alerts if a.body.reason == reason.value), None)

        await self.until(lambda: found() is not None)
        alert = found()
        assert alert is not None
        self.alerts.remove(alert)
        return alert

    def verdicts_of(self, job: str = JOB) -> dict[int, list[Envelope[Any]]]:
        return {o: envs for (j, o), envs in self.verdicts.items() if j == job}


@dataclass
class Rig:
    bus: Bus
    fed: MemoryFederation
    watcher: Watcher
    service: Any
    crl_path: Path
    taps: dict[str, Tap] = field(default_factory=dict)
    readers: list[StreamReader] = field(default_factory=list)

    async def declare_job(self, job: str) -> Tap:
        """What the aggregator does when a job is submitted: declare its update stream
        (the test also reads it, to know each message's offset)."""
        if job not in self.taps:
            tap = self.taps[job] = Tap()
            spec = topology.update_stream(job)
            await self.bus.declare_stream(spec)
            self.readers.append(await self.bus.read_stream(spec, tap.on_message, offset="first"))
        return self.taps[job]

    async def send(self, data: bytes, job: str = JOB) -> int:
        """Write ``data`` into the job's update stream, as a client does; its offset."""
        tap = await self.declare_job(job)
        n = len(tap.written)
        assert await self.bus.publish(topology.CLIENT, f"update.{job}", data)
        async with asyncio.timeout(10):
            while len(tap.written) <= n:
                tap.grew.clear()
                await tap.grew.wait()
        offset, written = tap.written[n]
        assert written == data
        return offset

    def next_offset(self, job: str = JOB) -> int:
        """No update of a round opened now sits before this offset (``updates_from``)."""
        tap = self.taps.get(job)
        return tap.written[-1][0] + 1 if tap and tap.written else 0

    async def announce(self, round_: int, version: int, **kw: Any) -> None:
        job = kw.setdefault("job", JOB)
        await self.declare_job(job)
        kw.setdefault("updates_from", self.next_offset(job))
        data = round_opened(self.fed, round_, version=version, participants=self.fed.clients, **kw)
        await self.bus.publish(topology.EVENTS, f"round.opened.{job}", data)

    async def open_round(
        self, round_: int, version: int, *, replicas: tuple[Any, ...] = (), **kw: Any
    ) -> None:
        """Announce the round and wait until ``replicas`` (default: the rig's) read it."""
        job = kw.get("job", JOB)
        await self.announce(round_, version, **kw)
        for service in replicas or (self.service,):
            await until(lambda s=service: (s.book.get(job) or _NoRound).round == round_)
            await until(lambda s=service: job in s._readers)

    async def close_round(self, round_: int, job: str = JOB) -> None:
        data = encode(
            "round.closed", RoundClosed(updates=[]), self.fed["aggregator"], job=job, round=round_
        )
        await self.bus.publish(topology.EVENTS, f"round.closed.{job}", data)
        await until(lambda: self.service.book.get(job) is None)

    async def check(self, data: bytes) -> Envelope[Any]:
        """Write ``data`` and return ingest's verdict on it (offset checked)."""
        offset = await self.send(data)
        got = await self.watcher.verdict(offset)
        assert got.sender == "ingest" and got.body.offset == offset
        return got

    def assert_each_message_judged_once(self, job: str = JOB) -> None:
        verdicts = self.watcher.verdicts_of(job)
        tap = self.taps[job]
        assert sorted(verdicts) == tap.offsets, "a message without a verdict, or a stray one"
        twice = {o: [e.kind for e in envs] for o, envs in verdicts.items() if len(envs) > 1}
        assert not twice, f"offsets judged more than once: {twice}"


class _NoRound:
    round = -1


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)


def ingest_settings(tmp_path: Path, replica: str, **options: Any) -> Settings:
    return Settings(
        data_dir=tmp_path,
        services=MappingProxyType(
            {
                "ingest": {
                    "replica": replica,
                    "round_news_wait_s": 0.3,
                    "report_burst": 1000,
                    **options,
                }
            }
        ),
    )


@contextlib.asynccontextmanager
async def running_rig(bus: Bus, tmp_path: Path, **options: Any) -> AsyncIterator[Rig]:
    fed = make_federation(clients=24)
    tmp_path.mkdir(parents=True, exist_ok=True)
    crl_path = tmp_path / "crl.qrl"
    crl_path.write_bytes(fed.crl.to_bytes())
    settings = ingest_settings(
        tmp_path, "r1", crl_path=str(crl_path), max_update_norm=100.0, **options
    )
    watcher = Watcher(fed.trust())
    watch = await bus.consume(
        QueueSpec(
            "watch", bindings=((topology.EVENTS, "update.*.*"), (topology.EVENTS, "alert.raised.*"))
        ),
        watcher.on_event,
        prefetch=64,
    )
    service = await build_service(
        "ingest", settings, bus=bus, identity=fed["ingest"], trust=fed.trust()
    )
    await service.start()
    rig = Rig(bus, fed, watcher, service, crl_path)
    await rig.open_round(1, version=0)
    try:
        yield rig
    finally:
        await rig.service.stop()
        for reader in rig.readers:
            await reader.cancel()
        await watch.cancel()


@pytest.fixture
async def rig(bus: Bus, tmp_path: Path) -> AsyncIterator[Rig]:
    async with running_rig(bus, tmp_path) as rig:
        yield rig


def _other_ca_client() -> Any:
    return make_federation(clients=1, services=())["client-000"]


async def test_hostile_updates_are_rejected_with_codes_and_good_ones_keep_flowing(rig: Rig) -> None:
    fed = rig.fed
    good_clients = iter(
        [c for c in fed.clients if c not in ("client-009", "client-010", "client-011")]
    )
    expired = fed.add("client-old", "client", valid_days=1, now=time.time() - 3 * 86400)
    revoked_client = "client-011"
    first_good = update(fed, "client-010", 1)

    def forged() -> bytes:
        data = bytearray(update(fed, "client-009", 1))
        # a byte inside the envelope's ML-DSA signature (it follows body_digest; bin16: 3
        # header bytes), not inside the certificate's
        i = data.index(b"\xa3sig\xc5", data.index(b"\xabbody_digest")) + 4 + 3 + 100
        data[i] ^= 0x01
        return bytes(data)

    def tampered() -> bytes:
        data = bytearray(update(fed, "client-009", 1))
        data[-1] ^= 0x01  # the body comes last: it no longer hashes to the signed digest
        return bytes(data)

    def signed_under_another_context() -> bytes:
        # a valid update envelope whose ML-DSA signature was made with the context string
        # of another kind the client signs (qflare/v1/update.part): domain separation must
        # refuse it
        import qflare.messages.envelope as envelope_module

        real = envelope_module.context_for
        envelope_module.context_for = lambda kind: real("update.part")
        try:
            return update(fed, "client-009", 1)
        finally:
            envelope_module.context_for = real

    def bad_schema() -> bytes:
        # signed by client-009 over exactly this body, which is no update
        import qflare.messages.envelope as envelope_module

        real = envelope_module.body_to_wire
        envelope_module.body_to_wire = lambda _model: {"base_version": "one"}
        try:
            return update(fed, "client-009", 1)
        finally:
            envelope_module.body_to_wire = real

    def model_part_as_update() -> bytes:
        # a signed envelope of a kind ingest does not take: the aggregator's model part,
        # which every participant reads, written back into the update stream
        body = {"transfer": b"\x00" * 16, "index": 0, "data": np.zeros(8, np.uint8)}
        return encode("model.part", body, fed["aggregator"], job=JOB, round=1)

    nan = tensors()
    nan["w"] = nan["w"].copy()
    nan["w"][0, 0] = np.nan
    # (name, the message, its reason, the client the verdict names)
    cases: list[tuple[str, Callable[[], bytes], Reason, str]] = [
        ("forged", forged, Reason.BAD_SIGNATURE, "client-009 (unverified)"),
        ("tampered", tampered, Reason.BAD_DIGEST, "client-009 (unverified)"),
        ("wrong-kind", model_part_as_update, Reason.WRONG_KIND, "aggregator (unverified)"),
        (
            "wrong-context",
            signed_under_another_context,
            Reason.BAD_SIGNATURE,
            "client-009 (unverified)",
        ),
        (
            "unknown-signer",
            lambda: update(fed, "client-000", 1, identity=_other_ca_client()),
            Reason.UNKNOWN_SIGNER,
            "client-000 (unverified)",
        ),
        (
            "expired",
            lambda: update(fed, "client-old", 1, identity=expired),
            Reason.EXPIRED,
            "client-old (unverified)",
        ),
        (
            "revoked",
            lambda: update(fed, revoked_client, 1),
            Reason.REVOKED,
            "client-011 (unverified)",
        ),
        ("garbage", lambda: b"\x8b\xa1v\x01garbage", Reason.MALFORMED, "?"),
        ("random-bytes", lambda: bytes(range(256)) * 4, Reason.MALFORMED, "?"),
        (
            "oversized",
            lambda: update(
                fed,
                "client-009",
                1,
                t={"w": np.zeros((4, 3), np.float32), "b": np.zeros(200_000, np.float32)},
            ),
            Reason.TOO_LARGE,
            "client-009 (unverified)",
        ),
        ("nan", lambda: update(fed, "client-009", 1, t=nan), Reason.NON_FINITE, "client-009"),
        (
            "wrong-shape",
            lambda: update(
                fed,
                "client-009",
                1,
                t={"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)},
            ),
            Reason.SHAPE_MISMATCH,
            "client-009",
        ),
        (
            "wrong-dtype",
            lambda: update(
                fed,
                "client-009",
                1,
                t={"w": np.zeros((4, 3), np.float64), "b": np.zeros(3, np.float32)},
            ),
            Reason.DTYPE_NOT_ALLOWED,
            "client-009",
        ),
        (
            "huge-norm",
            lambda: update(fed, "client-009", 1, t=tensors(1e3)),
            Reason.TOO_LARGE,
            "client-009",
        ),
        # an update for another job written into this job's stream
        (
            "wrong-job",
            lambda: update(fed, "client-009", 1, job="j9"),
            Reason.WRONG_JOB,
            "client-009",
        ),
        ("future-round", lambda: update(fed, "client-009", 7), Reason.STALE_ROUND, "client-009"),
        (
            "stale-base",
            lambda: update(fed, "client-009", 1, version=5),
            Reason.STALE_BASE,
            "client-009",
        ),
        (
            "not-participant",
            lambda: update(fed, "client-x", 1, identity=fed.add("client-x", "client")),
            Reason.NOT_PARTICIPANT,
            "client-x",
        ),
        # signed bodies that fail after the signature and digest verified: the signer's own
        (
            "sealed-to-others",
            lambda: update(fed, "client-009", 1, seal_to=("aggregator", "detector")),
            Reason.UNSEAL_FAILED,
            "client-009",
        ),
        ("bad-schema", bad_schema, Reason.BAD_SCHEMA, "client-009"),
        ("replayed", lambda: first_good, Reason.DUPLICATE, "client-010"),
    ]
    # an honest update first, so "replayed" has something to replay
    ok = await rig.check(first_good)
    assert ok.kind == "update.accepted" and ok.body.client == "client-010"
    assert ok.body.update_digest == peek_header(first_good).body_digest
    # revoke through the file, as `qflare revoke` does: ingest reloads it without restart
    rig.crl_path.write_bytes(fed.revoke(revoked_client).to_bytes())

    for name, make, reason, who in cases:
        data = make()
        got = await rig.check(data)
        assert got.kind == "update.rejected", f"{name}: expected a rejection, got {got.body}"
        assert got.body.reason is reason, f"{name}: {got.body.reason} ({got.body.detail})"
        # a client is named only once its signature verified: a forger cannot blame one
        assert got.body.client == who, name
        if name == "wrong-job":  # reported for the stream it sits in, in none of its rounds
            assert (got.job, got.round) == (JOB, 0)
        alert = await rig.watcher.alert(reason)
        assert alert.body.alert_kind == "update.rejected", name
        assert alert.body.client == (None if who.endswith(("(unverified)", "?")) else who), name
        # the reader moves on: the next honest update behind it is accepted, with the
        # digest of exactly the bytes at its offset
        client = next(good_clients)
        data = update(fed, client, 1)
        ok = await rig.check(data)
        assert ok.kind == "update.accepted", f"after {name}: {ok.body}"
        assert ok.body.client == client and ok.body.update_digest == peek_header(data).body_digest
        assert (ok.body.base_version, ok.body.num_samples) == (0, 10)

    # a replica counts a verdict just after publishing it: wait for the counters too
    expected = {"accepted": len(cases) + 1, "rejected": len(cases), "shed": 0}
    await until(lambda: rig.service.counts == expected)
    rig.assert_each_message_judged_once()


async def test_replayed_update_from_an_older_round_is_stale(rig: Rig) -> None:
    fed = rig.fed
    old = update(fed, "client-001", 1)
    assert (await rig.check(old)).kind == "update.accepted"
    await rig.close_round(1)
    # the latest round, closed: ROUND_CLOSED
    got = await rig.check(update(fed, "client-002", 1))
    assert got.body.reason is Reason.ROUND_CLOSED and got.body.client == "client-002"
    await rig.open_round(2, version=1)
    got = await rig.check(old)  # replayed from round 1
    assert got.kind == "update.rejected" and got.body.reason is Reason.STALE_ROUND
    assert got.body.client == "client-001"  # verified, so attributed
    assert (await rig.check(update(fed, "client-001", 2, version=1))).kind == "update.accepted"
    rig.assert_each_message_judged_once()


async def test_an_update_past_the_deadline_is_accepted_until_round_closed(rig: Rig) -> None:
    """One truth for deadlines (issue 16): the aggregator closes rounds. Ingest accepts an
    update after the deadline ``round.opened`` names and refuses ROUND_CLOSED only once it
    heard ``round.closed``."""
    await rig.open_round(2, version=1, deadline=time.time() - 60)
    got = await rig.check(update(rig.fed, "client-003", 2, version=1))
    assert got.kind == "update.accepted" and got.body.client == "client-003"
    await rig.close_round(2)
    got = await rig.check(update(rig.fed, "client-004", 2, version=1))
    assert got.kind == "update.rejected" and got.body.reason is Reason.ROUND_CLOSED
    assert got.body.client == "client-004"
    rig.assert_each_message_judged_once()


async def test_update_racing_its_round_announcement_waits_for_it(rig: Rig) -> None:
    # the update for round 2 is in the stream before round.opened(2): ingest waits for news
    offset = await rig.send(update(rig.fed, "client-004", 2, version=1))
    await rig.announce(2, version=1, updates_from=offset)
    got = await rig.watcher.verdict(offset)
    assert got.kind == "update.accepted" and got.round == 2 and got.body.offset == offset
    rig.assert_each_message_judged_once()


async def test_forged_round_announcement_is_ignored(rig: Rig) -> None:
    fake = bytearray(round_opened(rig.fed, 5, version=9, participants=["client-001"]))
    fake[-10] ^= 0xFF  # tamper with the body: BAD_DIGEST
    await rig.bus.publish(topology.EVENTS, f"round.opened.{JOB}", bytes(fake))
    alert = await rig.watcher.alert(Reason.BAD_DIGEST)
    assert alert.body.alert_kind == "message.rejected"
    assert rig.service.book.get(JOB).round == 1
    # and round 1 still takes its updates
    assert (await rig.check(update(rig.fed, "client-001", 1))).kind == "update.accepted"


async def test_two_replicas_split_the_offsets_and_judge_every_update_once(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica r1 has ``share = "0/2"`` in its options, r2 ``1/2`` from QFLARE_INGEST_SHARE;
    r2 starts late and reads from the ``updates_from`` of the round it hears of. Each checks
    the offsets of its share; together every message gets exactly one verdict."""
    async with running_rig(bus, tmp_path / "r1", share="0/2") as rig:
        monkeypatch.setenv(SHARE_ENV, "1/2")
        second = await build_service(
            "ingest",
            ingest_settings(tmp_path / "r2", "r2"),
            bus=bus,
            identity=rig.fed["ingest"],
            trust=rig.fed.trust(),
        )
        monkeypatch.delenv(SHARE_ENV)
        assert (rig.service.share, rig.service.shares) == (0, 2)
        assert (second.share, second.shares) == (1, 2)
        await second.start()
        try:
            # r2 learns round 2 from its own round queue and reads from its updates_from
            start = rig.next_offset()
            await rig.open_round(2, version=1, replicas=(rig.service, second))
            clients = rig.fed.clients[:20]
            offsets, hostile = [], []
            for i, c in enumerate(clients):
                offsets.append(await rig.send(update(rig.fed, c, 2, version=1)))
                if i % 7 == 3:  # a rejection now and then, on either replica
                    hostile.append(await rig.send(b"\x8b\xa1v\x01garbage"))
            written = [o for o in rig.taps[JOB].offsets if o >= start]
            assert sorted(offsets + hostile) == written
            await rig.watcher.until(lambda: all((JOB, o) in rig.watcher.verdicts for o in written))

            # the counters tell what each replica published: wait for them to add up too
            def total(s: Any) -> int:
                return int(s.counts["accepted"] + s.counts["rejected"])

            await until(lambda: total(rig.service) + total(second) >= len(written))
            assert total(rig.service) == sum(1 for o in written if o % 2 == 0)
            assert total(second) == sum(1 for o in written if o % 2 == 1)
            assert total(rig.service) > 0 and total(second) > 0
            verdicts = {o: rig.watcher.verdicts[(JOB, o)] for o in written}
            assert all(len(v) == 1 for v in verdicts.values()), verdicts
            accepted = {
                o: v[0].body.client for o, v in verdicts.items() if v[0].kind == "update.accepted"
            }
            assert sorted(accepted) == offsets and sorted(accepted.values()) == sorted(clients)
            assert {verdicts[o][0].body.reason for o in hostile} == {Reason.MALFORMED}
            rig.assert_each_message_judged_once()
        finally:
            await second.stop()


async def test_a_restarted_replica_reads_the_open_round_again_with_the_same_verdicts(
    rig: Rig, tmp_path: Path
) -> None:
    """Ingest keeps nothing durable: a fresh replica that hears the open round (the
    aggregator re-announces it) reads again from its ``updates_from`` and judges each
    message as before (same offsets, digests, reasons): idempotent for the services."""
    first = [
        await rig.check(update(rig.fed, "client-001", 1)),
        await rig.check(b"garbage"),
        await rig.check(update(rig.fed, "client-002", 1)),
    ]
    await rig.service.stop()
    rig.service = await build_service(
        "ingest",
        ingest_settings(tmp_path / "again", "r1"),
        bus=rig.bus,
        identity=rig.fed["ingest"],
        trust=rig.fed.trust(),
    )
    await rig.service.start()
    await rig.open_round(1, version=0, updates_from=0)
    await rig.watcher.until(lambda: all(len(v) == 2 for v in rig.watcher.verdicts_of().values()))
    for before in first:
        again = rig.watcher.verdicts[(JOB, before.body.offset)][1]
        assert again.kind == before.kind and again.body == before.body


async def test_copies_of_one_update_are_accepted_once(rig: Rig) -> None:
    data = update(rig.fed, "client-005", 1)
    got = [await rig.check(data) for _ in range(4)]
    assert [e.kind for e in got] == ["update.accepted"] + ["update.rejected"] * 3
    assert {e.body.reason for e in got[1:]} == {Reason.DUPLICATE}
    assert len({e.body.offset for e in got}) == 4
    rig.assert_each_message_judged_once()


async def test_repeated_round_announcements_start_one_reader_per_job(rig: Rig) -> None:
    """The aggregator announces an open round again (its ticker, a redelivery); copies that
    arrive together must not start a second reader of the job's stream, which would judge
    every update twice."""
    job = "j2"
    await rig.declare_job(job)
    for _ in range(4):
        await rig.announce(1, version=0, job=job, updates_from=0)
    await until(lambda: job in rig.service._readers)
    for c in ("client-001", "client-002"):
        offset = await rig.send(update(rig.fed, c, 1, job=job), job=job)
        got = await rig.watcher.verdict(offset, job=job)
        assert got.kind == "update.accepted" and got.body.client == c
    readers = [s for s in rig.service._subs if isinstance(s, StreamReader)]
    assert len(readers) == 2, "one reader per job (j1 and j2)"
    await until(lambda: rig.service.counts == {"accepted": 2, "rejected": 0, "shed": 0})
    rig.assert_each_message_judged_once(job)


async def test_updates_for_unannounced_rounds_wait_once_per_client(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the next round can be announced late (round.opened reaches ingest on another
    queue than the update), and only one update per client and round waits for it: a
    participant writing many updates for unannounced rounds keeps nothing waiting but one."""
    waits: list[tuple[str, int]] = []
    real = type(rig.service)._await_news

    async def await_news(self: Any, job: str, round_: int) -> None:
        waits.append((job, round_))
        await real(self, job, round_)

    monkeypatch.setattr(type(rig.service), "_await_news", await_news)
    stale = [update(rig.fed, "client-007", r, version=r - 1) for r in (2, 2, 2, 9, 9, 40)]
    for data in stale:
        got = await rig.check(data)
        assert got.kind == "update.rejected" and got.body.reason is Reason.STALE_ROUND
    assert waits == [(JOB, 2)]
    assert (await rig.check(update(rig.fed, "client-008", 1))).kind == "update.accepted"
    rig.assert_each_message_judged_once()


async def test_an_update_waiting_for_its_round_does_not_hold_the_reader(
    bus: Bus, tmp_path: Path
) -> None:
    """A participant's update for the next round waits for ``round.opened`` beside the
    reader: the honest updates behind it in the stream are judged meanwhile (a participant
    cannot stall ingest for ``round_news_wait_s`` with one update per round), and it is
    judged when its round is announced."""
    async with running_rig(bus, tmp_path, round_news_wait_s=30.0) as rig:
        early = await rig.send(update(rig.fed, "client-007", 2, version=1))
        honest = update(rig.fed, "client-008", 1)
        got = await rig.check(honest)
        assert got.kind == "update.accepted" and got.body.client == "client-008"
        assert not rig.watcher.verdicts.get((JOB, early)), "judged before its round was announced"
        await rig.close_round(1)
        await rig.announce(2, version=1, updates_from=early)
        got = await rig.watcher.verdict(early)
        assert got.kind == "update.accepted" and got.round == 2 and got.body.client == "client-007"
        rig.assert_each_message_judged_once()


SHED_DETAIL = re.compile(
    r"(?P<count>\d+) rejected messages in [0-9.]+s not reported one by one "
    r"\(.*?\): (?P<reasons>.+); from (?P<senders>.+)"
)


def shed_summary(alert: Envelope[Any]) -> tuple[int, Counter[str], Counter[str]]:
    """An ``updates.shed`` alert's count, by reason and by sender, read from its detail
    (``report_shed``: "39 rejected messages in 0.2s ...: MALFORMED 37; from unverified
    senders 37")."""
    m = SHED_DETAIL.fullmatch(alert.body.detail)
    assert m, alert.body.detail

    def counts(listed: str) -> Counter[str]:
        pairs = [item.rsplit(" ", 1) for item in listed.split(", ")]
        return Counter({name: int(n) for name, n in pairs})

    return int(m["count"]), counts(m["reasons"]), counts(m["senders"])


async def test_a_flood_of_rejections_is_shed_and_summarised_not_reported_one_by_one(
    bus: Bus, tmp_path: Path
) -> None:
    """Beyond a burst per sender, rejections are counted, not signed and published one by
    one (two signatures each): garbage (no verified sender) shares one budget, a client's
    own bad updates another, and one ``updates.shed`` alert per interval summarises them.
    The honest update behind the flood is accepted; an honest client keeps its own budget.
    On a loaded machine the flood can span intervals: the summaries together count each
    shed rejection once."""
    interval = 0.2
    started = time.monotonic()
    async with running_rig(
        bus, tmp_path, report_burst=3, report_per_s=0.0, shed_report_s=interval
    ) as rig:
        for i in range(40):
            await rig.send(b"\x93garbage" + bytes([i]))
        for r in (5, 6, 7, 8, 9):  # client-009's own key, rounds that are not open
            await rig.send(update(rig.fed, "client-009", r, version=r - 1))
        # a forger cannot spend client-001's budget: its refusal is still reported
        refused = await rig.check(update(rig.fed, "client-001", 1, version=4))
        assert refused.body.reason is Reason.STALE_BASE and refused.body.client == "client-001"
        ok = await rig.check(update(rig.fed, "client-002", 1))
        assert ok.kind == "update.accepted"
        await until(lambda: rig.service.counts["shed"] == 37 + 2)
        verdicts = rig.watcher.verdicts_of()
        rejected = [e for envs in verdicts.values() for e in envs if e.kind == "update.rejected"]
        assert (
            sorted(e.body.client for e in rejected)
            == ["?"] * 3 + ["client-001"] + ["client-009"] * 3
        )

        def sheds() -> list[Envelope[Any]]:
            return [a for a in rig.watcher.alerts if a.body.alert_kind == "updates.shed"]

        await rig.watcher.until(lambda: sum(shed_summary(a)[0] for a in sheds()) >= 39)
        alerts = sheds()
        summaries = [shed_summary(a) for a in alerts]
        elapsed = time.monotonic() - started
        assert sum(count for count, _, _ in summaries) == 39, [a.body.detail for a in alerts]
        assert sum((by for _, by, _ in summaries), Counter()) == {
            Reason.MALFORMED.value: 37,
            Reason.STALE_ROUND.value: 2,
        }
        assert sum((by for _, _, by in summaries), Counter()) == {
            "unverified senders": 37,
            "client-009": 2,
        }
        for shed, (count, reasons, senders) in zip(alerts, summaries, strict=True):
            assert shed.job == JOB and shed.body.severity == "warning", shed.body
            assert count == reasons.total() == senders.total(), shed.body.detail
            # the alert's reason is its summary's most common one
            assert reasons[shed.body.reason] == max(reasons.values()), shed.body.detail
        # one summary per interval, not one alert per rejection
        assert 1 <= len(summaries) <= elapsed / interval + 1, (len(summaries), elapsed)
        assert rig.service.counts == {"accepted": 1, "rejected": 7, "shed": 39}


async def test_a_shed_summary_whose_alert_fails_goes_out_with_the_next(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alert of a summary that cannot be published (the broker away) is not lost: the
    next summary of the job counts its rejections too."""
    async with running_rig(
        bus, tmp_path, report_burst=1, report_per_s=0.0, shed_report_s=3600.0
    ) as rig:
        for i in range(5):
            await rig.send(b"\x93garbage" + bytes([i]))
        await until(lambda: rig.service.counts["shed"] == 4)
        publish = rig.service.alert
        tries: list[str] = []

        async def away(**fields: Any) -> None:
            tries.append(fields["kind"])
            raise BusUnavailable("the broker is away")

        monkeypatch.setattr(rig.service, "alert", away)
        await rig.service.report_shed()
        assert tries == ["updates.shed"] and rig.service.budget.pending == 0
        for i in range(2):
            await rig.send(b"\x93garbage" + bytes([10 + i]))
        await until(lambda: rig.service.counts["shed"] == 6)
        monkeypatch.setattr(rig.service, "alert", publish)
        await rig.service.report_shed()

        def sheds() -> list[Envelope[Any]]:
            return [a for a in rig.watcher.alerts if a.body.alert_kind == "updates.shed"]

        await rig.watcher.until(lambda: bool(sheds()))
        (alert,) = sheds()
        count, reasons, senders = shed_summary(alert)
        assert count == 6 and reasons == {Reason.MALFORMED.value: 6}
        assert senders == {"unverified senders": 6}
        await rig.service.report_shed()  # nothing new, nothing kept: no further alert
        await asyncio.sleep(0.2)
        assert len(sheds()) == 1


# --- updates in parts (qflare.messages.parts) -------------------------------------------
#
# SPEC's 15 values (b: 3, then w: 12, the Layout order) travel 4 a part: 4 parts of 4, 4,
# 4 and 3 values. The verdict names the manifest (its offset and body digest); the parts get
# no verdict of their own unless they belong to no transfer ingest knows.

PART_VALUES = 4


def parts(
    fed: MemoryFederation,
    client: str,
    round_: int = 1,
    *,
    version: int = 0,
    t: dict[str, np.ndarray] | None = None,
    seal_to: tuple[str, ...] = READERS,
) -> list[bytes]:
    """A client's update as a participant sends it in parts: manifest, then each part."""
    readers = [fed[r].cert for r in seal_to] or None
    return list(
        encode_update_parts(
            fed[client],
            t if t is not None else tensors(),
            job=JOB,
            round=round_,
            base_version=version,
            num_samples=10,
            seal_to=readers,
            part_values=PART_VALUES,
        )
    )


def crafted(
    fed: MemoryFederation, client: str, values: list[np.ndarray], *, transfer: bytes
) -> list[bytes]:
    """A manifest naming exactly these parts (whatever their sizes), then the parts."""
    encoded = [
        encode(
            UpdatePart.KIND,
            UpdatePart(transfer=transfer, index=i, values=v),
            fed[client],
            job=JOB,
            round=1,
            seal_to=[fed[r].cert for r in READERS],
        )
        for i, v in enumerate(values)
    ]
    manifest = UpdateManifest(
        base_version=0,
        num_samples=10,
        transfer=transfer,
        tensors=[TensorShape(name="b", shape=[3]), TensorShape(name="w", shape=[4, 3])],
        part_values=PART_VALUES,
        part_digests=[peek_header(e).body_digest for e in encoded],
    )
    head = encode(
        UpdateManifest.KIND,
        manifest,
        fed[client],
        job=JOB,
        round=1,
        seal_to=[fed[r].cert for r in READERS],
    )
    return [head, *encoded]


def transfer_of(fed: MemoryFederation, manifest: bytes) -> bytes:
    env = open_envelope(manifest, fed.trust(), kem_key=fed["ingest"].kem)
    return bytes(env.body.transfer)


async def send_all(rig: Rig, messages: list[bytes]) -> list[int]:
    return [await rig.send(m) for m in messages]


async def assert_no_transfer_left(rig: Rig) -> None:
    await until(lambda: not rig.service._transfers and rig.service.assembler.pending == 0)


@pytest.fixture
async def prig(bus: Bus, tmp_path: Path) -> AsyncIterator[Rig]:
    async with running_rig(bus, tmp_path, part_ttl_s=0.5) as rig:
        yield rig


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "plain"])
async def test_an_update_in_parts_is_accepted_under_its_manifest(prig: Rig, sealed: bool) -> None:
    rig = prig
    messages = parts(rig.fed, "client-001", seal_to=READERS if sealed else ())
    assert len(messages) == 1 + 4
    offsets = await send_all(rig, messages)
    got = await rig.watcher.verdict(offsets[0])
    assert got.kind == "update.accepted" and got.sender == "ingest"
    assert got.body.client == "client-001" and got.body.offset == offsets[0]
    assert got.body.update_digest == peek_header(messages[0]).body_digest
    assert got.body.num_samples == 10 and got.body.base_version == 0
    await assert_no_transfer_left(rig)
    # one verdict, on the manifest; the parts get none
    assert sorted(rig.watcher.verdicts_of()) == [offsets[0]]
    # a second update of that client for the round, in parts or whole, is a duplicate
    again = parts(rig.fed, "client-001")
    refused = await rig.watcher.verdict((await send_all(rig, again))[0])
    assert refused.body.reason is Reason.DUPLICATE
    assert (await rig.check(update(rig.fed, "client-001", 1))).body.reason is Reason.DUPLICATE
    await assert_no_transfer_left(rig)


async def refused_transfer(rig: Rig, manifest_offset: int, reason: Reason) -> Envelope[Any]:
    """The refusal of the transfer whose manifest sits at ``manifest_offset``: the verdict
    names the reason, an alert goes out, ingest holds nothing of it."""
    got = await rig.watcher.verdict(manifest_offset)
    assert got.kind == "update.rejected" and got.body.reason is reason, got.body
    alert = await rig.watcher.alert(reason)
    assert alert.body.alert_kind == "update.rejected"
    await assert_no_transfer_left(rig)
    return got


async def test_a_transfer_whose_parts_stop_coming_is_refused_after_its_ttl(prig: Rig) -> None:
    rig = prig
    messages = parts(rig.fed, "client-002")
    offsets = await send_all(rig, messages[:3])  # manifest and parts 0, 1 of 4
    assert rig.service._transfers, "the transfer is held while its parts come"
    got = await refused_transfer(rig, offsets[0], Reason.CHUNK_MISMATCH)
    assert got.body.client == "client-002" and "incomplete" in got.body.detail
    assert got.body.update_digest == peek_header(messages[0]).body_digest
    # its late parts are passed over, not accepted, not reported one by one
    late = await send_all(rig, messages[3:])
    assert (await rig.check(update(rig.fed, "client-003", 1))).kind == "update.accepted"
    assert not any((JOB, o) in rig.watcher.verdicts for o in late)


@pytest.mark.parametrize(
    ("order", "reason"),
    [
        ([0, 2, 1, 3], Reason.CHUNK_MISMATCH),  # reordered
        ([0, 1, 3], Reason.CHUNK_MISMATCH),  # one missing, the next one comes
        ([0, 1, 1, 2, 3], Reason.DUPLICATE),  # a part twice
    ],
    ids=["reordered", "missing", "duplicated"],
)
async def test_parts_out_of_order_are_refused_with_their_transfer(
    prig: Rig, order: list[int], reason: Reason
) -> None:
    rig = prig
    manifest, *rest = parts(rig.fed, "client-004")
    offsets = await send_all(rig, [manifest, *(rest[i] for i in order)])
    got = await refused_transfer(rig, offsets[0], reason)
    assert got.body.client == "client-004"
    # nothing but the manifest has a verdict; the rest of the transfer is passed over
    assert (await rig.check(update(rig.fed, "client-005", 1))).kind == "update.accepted"
    assert sorted(o for o in rig.watcher.verdicts_of() if o in offsets) == [offsets[0]]


async def test_a_surplus_part_refuses_its_transfer(prig: Rig) -> None:
    rig = prig
    messages = parts(rig.fed, "client-006")
    transfer = transfer_of(rig.fed, messages[0])
    surplus = encode(
        UpdatePart.KIND,
        UpdatePart(transfer=transfer, index=4, values=np.zeros(3, np.float32)),
        rig.fed["client-006"],
        job=JOB,
        round=1,
        seal_to=[rig.fed[r].cert for r in READERS],
    )
    offsets = await send_all(rig, [*messages[:3], surplus, *messages[3:]])
    got = await refused_transfer(rig, offsets[0], Reason.CHUNK_MISMATCH)
    assert "out of range" in got.body.detail


async def test_an_oversized_part_is_too_large(prig: Rig) -> None:
    rig = prig
    values = [np.ones(n, np.float32) for n in (4, 6, 4, 3)]  # part 1 holds 6 values, not 4
    messages = crafted(rig.fed, "client-007", values, transfer=b"\x07" * 16)
    offsets = await send_all(rig, messages)
    got = await refused_transfer(rig, offsets[0], Reason.TOO_LARGE)
    assert "part 1" in got.body.detail


async def test_forged_parts_are_refused_and_the_honest_transfer_goes_on(prig: Rig) -> None:
    """A part signed by another client with the transfer's id belongs to no transfer of its
    signer (refused, naming the signer); a part whose bytes were changed does not open
    (refused, naming no one) and the transfer, missing that part, is refused at the next."""
    rig = prig
    manifest, *rest = parts(rig.fed, "client-008")
    transfer = transfer_of(rig.fed, manifest)
    by_other = encode(
        UpdatePart.KIND,
        UpdatePart(transfer=transfer, index=1, values=np.ones(4, np.float32)),
        rig.fed["client-009"],
        job=JOB,
        round=1,
        seal_to=[rig.fed[r].cert for r in READERS],
    )
    offsets = await send_all(rig, [manifest, rest[0], by_other, *rest[1:]])
    forged = await rig.watcher.verdict(offsets[2])
    assert forged.kind == "update.rejected" and forged.body.reason is Reason.CHUNK_MISMATCH
    assert forged.body.client == "client-009" and forged.body.offset == offsets[2]
    await rig.watcher.alert(Reason.CHUNK_MISMATCH)
    honest = await rig.watcher.verdict(offsets[0])
    assert honest.kind == "update.accepted" and honest.body.client == "client-008"
    await assert_no_transfer_left(rig)

    manifest, *rest = parts(rig.fed, "client-010")
    tampered = bytearray(rest[1])
    tampered[-1] ^= 0x01
    offsets = await send_all(rig, [manifest, rest[0], bytes(tampered), *rest[2:]])
    bad = await rig.watcher.verdict(offsets[2])
    assert bad.kind == "update.rejected" and bad.body.client.endswith("(unverified)")
    await rig.watcher.alert(bad.body.reason)
    await refused_transfer(rig, offsets[0], Reason.CHUNK_MISMATCH)


async def test_a_manifest_whose_layout_differs_from_the_round_is_shape_mismatch(
    prig: Rig,
) -> None:
    rig = prig
    t = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(4, np.float32)}
    offsets = await send_all(rig, parts(rig.fed, "client-011", t=t))
    got = await refused_transfer(rig, offsets[0], Reason.SHAPE_MISMATCH)
    assert got.body.client == "client-011"
    assert sorted(o for o in rig.watcher.verdicts_of() if o in offsets) == [offsets[0]]


async def test_a_part_with_nan_is_non_finite(prig: Rig) -> None:
    rig = prig
    t = tensors()
    t["w"][2, 1] = np.nan
    offsets = await send_all(rig, parts(rig.fed, "client-012", t=t))
    got = await refused_transfer(rig, offsets[0], Reason.NON_FINITE)
    assert "w[2, 1]" in got.body.detail


async def test_a_restarted_replica_never_accepts_a_transfer_it_did_not_read_whole(
    prig: Rig, tmp_path: Path
) -> None:
    """Ingest commits no offset: a replica reads the job's stream from the open round's
    ``updates_from``, where every manifest of the round lies after. One started between a
    manifest and its parts (a stream read from a later offset) refuses those parts as
    belonging to no transfer; one that reads from the round's start accepts the update."""
    rig = prig
    messages = parts(rig.fed, "client-013")
    first = await send_all(rig, messages[:2])
    await rig.service.stop()

    async def fresh(name: str, updates_from: int) -> None:
        rig.service = await build_service(
            "ingest",
            ingest_settings(tmp_path / name, name, part_ttl_s=0.5),
            bus=rig.bus,
            identity=rig.fed["ingest"],
            trust=rig.fed.trust(),
        )
        await rig.service.start()
        await rig.open_round(1, version=0, updates_from=updates_from)

    rest = await send_all(rig, messages[2:])
    await fresh("late", rest[0])
    for o in rest:
        got = await rig.watcher.verdict(o)
        assert got.kind == "update.rejected" and got.body.reason is Reason.CHUNK_MISMATCH
        assert got.body.client == "client-013"
    assert not rig.watcher.verdicts.get((JOB, first[0]))
    await rig.service.stop()

    await fresh("again", first[0])
    got = await rig.watcher.verdict(first[0])
    assert got.kind == "update.accepted" and got.body.client == "client-013"
    await assert_no_transfer_left(rig)


async def test_two_replicas_check_each_transfer_once_by_its_manifest_offset(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_rig(bus, tmp_path / "r1", share="0/2") as rig:
        monkeypatch.setenv(SHARE_ENV, "1/2")
        second = await build_service(
            "ingest",
            ingest_settings(tmp_path / "r2", "r2"),
            bus=bus,
            identity=rig.fed["ingest"],
            trust=rig.fed.trust(),
        )
        monkeypatch.delenv(SHARE_ENV)
        await second.start()
        try:
            await rig.open_round(2, version=1, replicas=(rig.service, second))
            manifests = []
            for c in ("client-001", "client-002", "client-003"):
                manifests.append((await send_all(rig, parts(rig.fed, c, 2, version=1)))[0])
            for o in manifests:
                got = await rig.watcher.verdict(o)
                assert got.kind == "update.accepted"
            assert {m % 2 for m in manifests} == {0, 1}, "both replicas own a transfer"
            await until(lambda: rig.service.counts["accepted"] + second.counts["accepted"] == 3)
            assert rig.service.counts["accepted"] == sum(1 for m in manifests if m % 2 == 0)
            assert rig.service.counts["rejected"] + second.counts["rejected"] == 0
            assert sorted(rig.watcher.verdicts_of()) == manifests
        finally:
            await second.stop()
