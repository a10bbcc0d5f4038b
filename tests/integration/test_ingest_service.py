"""Ingest on a real bus (memory and RabbitMQ): every hostile input is rejected with its
reason code, an ``update.rejected`` and an alert, is dead-lettered, and the next honest
update is still accepted and re-signed by ingest."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest

from qflare.bus import Bus, Delivery, Outcome, QueueSpec, topology
from qflare.crypto.testing import MemoryFederation, make_federation
from qflare.messages import Envelope, Reason, RoundOpened, Update, encode, open_envelope
from qflare.messages.tensors import model_digest
from qflare.runtime import Settings, build_service

JOB = "j1"
SPEC = [
    {"name": "w", "dtype": "float32", "shape": [4, 3]},
    {"name": "b", "dtype": "float32", "shape": [3]},
]


def tensors(scale: float = 0.1) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 3), scale, np.float32), "b": np.full(3, scale, np.float32)}


def round_opened(
    fed: MemoryFederation,
    round_: int,
    *,
    version: int,
    participants: list[str],
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
    seal: bool = False,
    identity: Any = None,
) -> bytes:
    ident = identity or fed[client]
    body = Update(base_version=version, num_samples=10, tensors=t if t is not None else tensors())
    return encode(
        "update", body, ident, job=job, round=round_, seal_to=fed["ingest"].cert if seal else None
    )


@dataclass
class Watcher:
    """Collects the verified events ingest publishes, in arrival order."""

    trust: Any
    events: asyncio.Queue[Envelope] = field(default_factory=asyncio.Queue)
    dead: list[Delivery] = field(default_factory=list)

    async def on_event(self, d: Delivery) -> Outcome:
        await self.events.put(open_envelope(d.body, self.trust))
        return Outcome.ACK

    async def on_dead(self, d: Delivery) -> Outcome:
        self.dead.append(d)
        return Outcome.ACK

    async def next(self, kind: str, timeout: float = 10.0) -> Envelope:
        async with asyncio.timeout(timeout):
            while True:
                env = await self.events.get()
                if env.kind == kind:
                    return env

    async def outcome(self, timeout: float = 10.0) -> Envelope:
        """The next update.accepted or update.rejected (alerts are read by ``alert``)."""
        async with asyncio.timeout(timeout):
            while True:
                env = await self.events.get()
                if env.kind in ("update.accepted", "update.rejected"):
                    return env
                if env.kind == "alert.raised":
                    self._alerts.append(env)

    _alerts: list[Envelope] = field(default_factory=list)

    async def alert(self, timeout: float = 10.0) -> Envelope:
        if self._alerts:
            return self._alerts.pop(0)
        return await self.next("alert.raised", timeout)


@dataclass
class Rig:
    bus: Bus
    fed: MemoryFederation
    watcher: Watcher
    service: Any
    crl_path: Path

    async def send(self, data: bytes, job: str = JOB) -> None:
        await self.bus.publish(topology.CLIENT, f"update.{job}", data)

    async def open_round(self, round_: int, version: int, **kw: Any) -> None:
        await self.bus.publish(
            topology.EVENTS,
            f"round.opened.{kw.get('job', JOB)}",
            round_opened(self.fed, round_, version=version, participants=self.fed.clients, **kw),
        )
        await asyncio.wait_for(
            _until(lambda: (self.service.book.get(kw.get("job", JOB)) or _NoRound).round == round_),
            10,
        )

    async def close_round(self, round_: int) -> None:
        from qflare.messages import RoundClosed

        data = encode(
            "round.closed", RoundClosed(updates=[]), self.fed["aggregator"], job=JOB, round=round_
        )
        await self.bus.publish(topology.EVENTS, f"round.closed.{JOB}", data)
        await asyncio.wait_for(_until(lambda: self.service.book.get(JOB) is None), 10)


class _NoRound:
    round = -1


async def _until(pred: Callable[[], bool]) -> None:
    while not pred():
        await asyncio.sleep(0.01)


@pytest.fixture
async def rig(bus: Bus, tmp_path: Path) -> AsyncIterator[Rig]:
    fed = make_federation(clients=24)
    crl_path = tmp_path / "crl.qrl"
    crl_path.write_bytes(fed.crl.to_bytes())
    settings = Settings(
        data_dir=tmp_path,
        services=MappingProxyType(
            {
                "ingest": {
                    "replica": "r1",
                    "crl_path": str(crl_path),
                    "round_news_wait_s": 0.3,
                    "max_update_norm": 100.0,
                }
            }
        ),
    )
    watcher = Watcher(fed.trust())
    watch = await bus.consume(
        QueueSpec(
            "watch", bindings=((topology.EVENTS, "update.*.*"), (topology.EVENTS, "alert.raised.*"))
        ),
        watcher.on_event,
    )
    dead = await bus.consume(topology.dead_letters("watch-dead", "update.*"), watcher.on_dead)
    service = await build_service(
        "ingest", settings, bus=bus, identity=fed["ingest"], trust=fed.trust()
    )
    await service.start()
    rig = Rig(bus, fed, watcher, service, crl_path)
    await rig.open_round(1, version=0)
    try:
        yield rig
    finally:
        await service.stop()
        await watch.cancel()
        await dead.cancel()


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
        # the envelope's own "sig" key comes after the certificate's; skip the bin16 header
        i = data.rindex(b"\xa3sig") + 4 + 3 + 100
        data[i] ^= 0x01
        return bytes(data)

    def signed_under_another_context() -> bytes:
        # a valid update envelope whose ML-DSA signature was made with the context string
        # of another kind (qflare/v1/chunk): domain separation must refuse it
        import qflare.messages.envelope as envelope_module

        real = envelope_module.context_for
        envelope_module.context_for = lambda kind: real("chunk")
        try:
            return update(fed, "client-009", 1)
        finally:
            envelope_module.context_for = real

    def chunk_as_update() -> bytes:
        body = {"transfer": b"\x00" * 16, "index": 0, "data": b"x"}
        return encode("chunk", body, fed["client-009"], job=JOB, round=1)

    nan = tensors()
    nan["w"] = nan["w"].copy()
    nan["w"][0, 0] = np.nan
    cases: list[tuple[str, Callable[[], bytes], Reason, str]] = [
        ("forged", forged, Reason.BAD_SIGNATURE, JOB),
        ("wrong-kind", chunk_as_update, Reason.WRONG_KIND, JOB),
        ("wrong-context", signed_under_another_context, Reason.BAD_SIGNATURE, JOB),
        (
            "unknown-signer",
            lambda: update(fed, "client-000", 1, identity=_other_ca_client()),
            Reason.UNKNOWN_SIGNER,
            JOB,
        ),
        ("expired", lambda: update(fed, "client-old", 1, identity=expired), Reason.EXPIRED, JOB),
        ("revoked", lambda: update(fed, revoked_client, 1), Reason.REVOKED, JOB),
        ("malformed", lambda: b"\x8b\xa1v\x01garbage", Reason.MALFORMED, JOB),
        (
            "oversized",
            lambda: update(
                fed,
                "client-009",
                1,
                t={"w": np.zeros((4, 3), np.float32), "b": np.zeros(200_000, np.float32)},
            ),
            Reason.TOO_LARGE,
            JOB,
        ),
        ("nan", lambda: update(fed, "client-009", 1, t=nan), Reason.NON_FINITE, JOB),
        (
            "wrong-shape",
            lambda: update(
                fed,
                "client-009",
                1,
                t={"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)},
            ),
            Reason.SHAPE_MISMATCH,
            JOB,
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
            JOB,
        ),
        ("huge-norm", lambda: update(fed, "client-009", 1, t=tensors(1e3)), Reason.TOO_LARGE, JOB),
        ("wrong-job", lambda: update(fed, "client-009", 1, job="j9"), Reason.WRONG_JOB, "j9"),
        ("job-key-mismatch", lambda: update(fed, "client-009", 1, job="j9"), Reason.WRONG_JOB, JOB),
        ("future-round", lambda: update(fed, "client-009", 7), Reason.STALE_ROUND, JOB),
        ("stale-base", lambda: update(fed, "client-009", 1, version=5), Reason.STALE_BASE, JOB),
        (
            "not-participant",
            lambda: update(fed, "client-old2", 1, identity=fed.add("client-x", "client")),
            Reason.NOT_PARTICIPANT,
            JOB,
        ),
        (
            "sealed-to-another",
            lambda: encode(
                "update",
                Update(base_version=0, num_samples=1, tensors=tensors()),
                fed["client-009"],
                job=JOB,
                round=1,
                seal_to=fed["detector"].cert,
            ),
            Reason.UNSEAL_FAILED,
            JOB,
        ),
        ("duplicate", lambda: first_good, Reason.DUPLICATE, JOB),
    ]
    # an honest update first, so "duplicate" has something to duplicate
    await rig.send(first_good)
    ok = await rig.watcher.outcome()
    assert ok.kind == "update.accepted" and ok.sender == "ingest" and ok.body.client == "client-010"
    # revoke through the file, as `qflare revoke` does: ingest reloads it without restart
    rig.crl_path.write_bytes(fed.revoke(revoked_client).to_bytes())

    for name, make, reason, key_job in cases:
        await rig.send(make(), job=key_job)
        got = await rig.watcher.outcome()
        assert got.kind == "update.rejected", f"{name}: expected a rejection, got {got.kind}"
        assert got.body.reason is reason, f"{name}: {got.body.reason} ({got.body.detail})"
        alert = await rig.watcher.alert()
        assert alert.body.reason == reason.value and alert.body.alert_kind == "update.rejected", (
            name
        )
        # the service keeps serving: the next honest update goes through, re-signed by ingest
        client = next(good_clients)
        sealed = name.endswith("another")
        await rig.send(update(fed, client, 1, seal=sealed))
        ok = await rig.watcher.outcome()
        assert ok.kind == "update.accepted", f"after {name}: {ok.body}"
        assert ok.body.client == client and ok.sender == "ingest"
        np.testing.assert_array_equal(ok.body.tensors["w"], tensors()["w"])

    # forged and other unverified senders are not attributed to a client
    assert rig.service.counts["rejected"] == len(cases)
    await asyncio.wait_for(_until(lambda: len(rig.watcher.dead) >= len(cases)), 10)
    assert {d.death_reason for d in rig.watcher.dead} == {"rejected"}


async def test_replayed_update_from_an_older_round_is_stale(rig: Rig) -> None:
    fed = rig.fed
    old = update(fed, "client-001", 1)
    await rig.send(old)
    assert (await rig.watcher.outcome()).kind == "update.accepted"
    await rig.close_round(1)
    # the latest round, closed: ROUND_CLOSED
    await rig.send(update(fed, "client-002", 1))
    got = await rig.watcher.outcome()
    assert got.body.reason is Reason.ROUND_CLOSED
    await rig.open_round(2, version=1)
    await rig.send(old)  # replayed from round 1
    got = await rig.watcher.outcome()
    assert got.kind == "update.rejected" and got.body.reason is Reason.STALE_ROUND
    assert got.body.client == "client-001"  # verified, so attributed
    await rig.send(update(fed, "client-001", 2, version=1))
    assert (await rig.watcher.outcome()).kind == "update.accepted"


async def test_update_past_the_deadline_is_refused(rig: Rig) -> None:
    await rig.open_round(2, version=1, deadline=time.time() - 1)
    await rig.send(update(rig.fed, "client-003", 2, version=1))
    got = await rig.watcher.outcome()
    assert got.body.reason is Reason.ROUND_CLOSED


async def test_update_racing_its_round_announcement_waits_for_it(rig: Rig) -> None:
    # the update for round 2 arrives before round.opened(2): ingest waits for the news
    await rig.send(update(rig.fed, "client-004", 2, version=1))
    await asyncio.sleep(0.05)
    await rig.bus.publish(
        topology.EVENTS,
        f"round.opened.{JOB}",
        round_opened(rig.fed, 2, version=1, participants=rig.fed.clients),
    )
    got = await rig.watcher.outcome()
    assert got.kind == "update.accepted" and got.round == 2


async def test_forged_round_announcement_is_ignored(rig: Rig) -> None:
    # a client cannot open a round: the role check in open_envelope refuses it
    fake = bytearray(round_opened(rig.fed, 5, version=9, participants=["client-001"]))
    fake[-10] ^= 0xFF  # tamper with the body: BAD_DIGEST
    await rig.bus.publish(topology.EVENTS, f"round.opened.{JOB}", bytes(fake))
    alert = await rig.watcher.alert()
    assert alert.body.reason in (Reason.BAD_DIGEST.value, Reason.BAD_SIGNATURE.value)
    assert rig.service.book.get(JOB).round == 1


async def test_two_replicas_share_the_load_and_each_learns_the_rounds(
    rig: Rig, tmp_path: Path
) -> None:
    second = await build_service(
        "ingest",
        Settings(
            data_dir=tmp_path / "second",
            services=MappingProxyType({"ingest": {"replica": "r2", "round_news_wait_s": 0.3}}),
        ),
        bus=rig.bus,
        identity=rig.fed["ingest"],
        trust=rig.fed.trust(),
    )
    await second.start()
    try:
        # the second replica learns round 2 from its own round queue
        await rig.open_round(2, version=1)
        await asyncio.wait_for(_until(lambda: (second.book.get(JOB) or _NoRound).round == 2), 10)
        clients = rig.fed.clients[:20]
        for c in clients:
            await rig.send(update(rig.fed, c, 2, version=1))
        got = [await rig.watcher.outcome() for _ in clients]
        assert all(e.kind == "update.accepted" for e in got)
        assert sorted(e.body.client for e in got) == sorted(clients)
        # a replica counts an update just after publishing it: wait for the counters too
        await asyncio.wait_for(
            _until(
                lambda: rig.service.counts["accepted"] + second.counts["accepted"] >= len(clients)
            ),
            10,
        )
        a, b = rig.service.counts["accepted"], second.counts["accepted"]
        assert a + b == len(clients) and a > 0 and b > 0, (a, b)
    finally:
        await second.stop()


async def test_concurrent_copies_of_one_update_are_accepted_once(rig: Rig) -> None:
    data = update(rig.fed, "client-005", 1)
    for _ in range(4):  # delivered together: ingest handles up to its prefetch concurrently
        await rig.send(data)
    got = [await rig.watcher.outcome() for _ in range(4)]
    assert sorted(e.kind for e in got) == ["update.accepted"] + ["update.rejected"] * 3
    assert {e.body.reason for e in got if e.kind == "update.rejected"} == {Reason.DUPLICATE}
