"""The detector's (and the aggregator's) crash safety around a decided round, on the
embedded bus through the production bootstrap. The test plays ingest (``update.accepted``) and the aggregator
(``round.closed``, sent again as the aggregator's ticker does while it waits for a verdict).

The bug these pin down: a copy of ``round.closed`` that read "no verdict yet" before the
verdict committed stored the round as pending again after the verdict had removed it and
deleted the round's update files; deciding that pending round then read a deleted file
(FileNotFoundError), and the stale row made every later start of the detector fail the
same way.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qflare.bus import Bus, Delivery, Outcome, QueueSpec, connect_bus, topology
from qflare.crypto import Federation, provision
from qflare.messages import encode, open_envelope
from qflare.runtime import JobSpec, load_settings, run_in_process
from qflare.services.detector.store import DetectorStore

CLIENTS = tuple(f"c{i}" for i in range(6))
JOB = "jd"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return provision(tmp_path_factory.mktemp("pki"), clients=0)


def spec() -> JobSpec:
    return JobSpec.model_validate(
        dict(
            job_id=JOB,
            rounds=3,
            participants=CLIENTS,
            rule="median",
            f=1,
            detection=True,
            noise_multiplier=0.0,
            clip=2.0,
            seed=7,
            deadline_s=30.0,
            min_updates=4,
            initial_model=None,
        )
    )


def tensors(client: str, round_no: int) -> dict[str, np.ndarray]:
    seed = int.from_bytes(hashlib.sha256(f"{client}/{round_no}".encode()).digest()[:4], "big")
    return {"w": np.random.default_rng(seed).standard_normal(12).astype(np.float32)}


def digest(client: str, round_no: int) -> bytes:
    return hashlib.sha256(f"{client}/{round_no}".encode()).digest()


class Wire:
    """Signs as ingest / aggregator and records the verdicts the detector publishes."""

    def __init__(self, fed: Federation, bus: Bus) -> None:
        self.fed, self.bus = fed, bus
        self.verdicts: list[int] = []
        self.changed = asyncio.Event()

    async def start(self) -> None:
        await self.bus.consume(
            QueueSpec("watch", bindings=((topology.EVENTS, "round.verdict.*"),)), self.on_verdict
        )

    async def on_verdict(self, d: Delivery) -> Outcome:
        self.verdicts.append(open_envelope(d.body, self.fed.trust()).round)
        self.changed.set()
        return Outcome.ACK

    async def send(self, role: str, kind: str, body: dict[str, Any], round_no: int) -> None:
        data = encode(kind, body, self.fed.identity(role), job=JOB, round=round_no)
        await self.bus.publish(topology.EVENTS, f"{kind}.{JOB}", data)

    async def update(self, client: str, round_no: int) -> None:
        await self.send(
            "ingest",
            "update.accepted",
            {
                "client": client,
                "update_digest": digest(client, round_no),
                "base_version": round_no - 1,
                "num_samples": 10,
                "tensors": tensors(client, round_no),
            },
            round_no,
        )

    async def closed(self, round_no: int) -> None:
        await self.send(
            "aggregator",
            "round.closed",
            {"updates": [{"client": c, "digest": digest(c, round_no)} for c in CLIENTS]},
            round_no,
        )

    async def verdict_count(self, round_no: int, n: int, timeout: float = 10.0) -> None:
        async def wait() -> None:
            while self.verdicts.count(round_no) < n:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


async def until(predicate: Any, timeout: float = 10.0) -> None:
    async def wait() -> None:
        while not await predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), timeout)


async def test_a_round_closed_copy_racing_the_verdict_leaves_no_pending_round(
    federation: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copy B of ``round.closed`` reads "no verdict" while copy A decides; B stores the
    round as pending only after A's verdict committed and its files were dropped. B must
    not bring the decided round back, and the detector must start again afterwards."""
    from qflare.services.detector.service import Detector

    decided = asyncio.Event()
    b_done = asyncio.Event()
    calls = 0
    real_add_pending = DetectorStore.add_pending
    real_record = DetectorStore.record_verdict
    real_try = Detector._try_decide

    async def add_pending(self: DetectorStore, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # copy B: its verdict check is done, A has not decided yet
            await asyncio.wait_for(decided.wait(), 10)
            await until(lambda: _no_files(tmp_path / "detector", 1))
        return await real_add_pending(self, *args)

    async def record_verdict(self: DetectorStore, *args: Any) -> Any:
        out = await real_record(self, *args)
        decided.set()
        return out

    async def try_decide(self: Detector, *args: Any) -> None:
        after_b = calls >= 2 and decided.is_set()
        try:
            await real_try(self, *args)
        finally:
            if after_b:
                b_done.set()

    monkeypatch.setattr(DetectorStore, "add_pending", add_pending)
    monkeypatch.setattr(DetectorStore, "record_verdict", record_verdict)
    monkeypatch.setattr(Detector, "_try_decide", try_decide)
    bus = await connect_bus(f"memory://det-{tmp_path.name}")
    settings = load_settings(None, env={}, data_dir=str(tmp_path))
    ids = {"detector": (federation.identity("detector"), federation.trust())}
    wire = Wire(federation, bus)
    await wire.start()
    try:
        async with run_in_process(settings, bus, services=["detector"], identities=ids) as running:
            await running.services["detector"].submit_job(spec())
            for c in CLIENTS:
                await wire.update(c, 1)
            store = running.services["detector"].store
            await until(lambda: _held(store, 1))
            await wire.closed(1)
            await wire.closed(1)  # the aggregator's ticker re-sends while it waits
            await wire.verdict_count(1, 1)
            await asyncio.wait_for(b_done.wait(), 10)  # copy B has stored and tried the round
            assert calls == 2
            assert await store.pending() == [], "a decided round came back as pending"
            monkeypatch.undo()
            # the next start re-tries pending rounds: it must not meet a dropped file
            await running.restart("detector", identities=ids)
            await running.services["detector"].submit_job(spec())
            store = running.services["detector"].store
            assert await store.pending() == []
            # and the detector still works: the next round is decided
            for c in CLIENTS:
                await wire.update(c, 2)
            await wire.closed(2)
            await wire.verdict_count(2, 1)
    finally:
        await bus.close()


async def test_a_late_update_of_a_decided_round_writes_no_file(
    federation: Federation, tmp_path: Path
) -> None:
    """An ``update.accepted`` of a round already decided (a client outside the closed set,
    or a copy arriving after the verdict) is acknowledged without a file: the round's files
    are gone and nothing would ever remove a new one."""
    store = await DetectorStore.open(tmp_path)
    try:
        for c in CLIENTS:
            assert await store.add_update(JOB, 1, c, digest(c, 1), tensors(c, 1)) == "stored"
        assert await store.add_update(JOB, 1, "c0", digest("c0", 1), tensors("c0", 1)) == "held"
        from qflare.robust import Reputation

        await store.add_pending(JOB, 1, [(c, digest(c, 1)) for c in CLIENTS])
        assert await store.record_verdict(
            JOB, 1, {"kept": list(CLIENTS), "flagged": []}, Reputation()
        )
        await store.drop_round_files(JOB, 1)
        assert (
            await store.add_update(JOB, 1, "late", digest("late", 1), tensors("late", 1))
            == "decided"
        )
        assert not (tmp_path / "updates" / JOB / "r1").exists()
        # a round.closed copy after the verdict does not make the round pending again
        await store.add_pending(JOB, 1, [(c, digest(c, 1)) for c in CLIENTS])
        assert await store.pending() == []
    finally:
        await store.close()


async def test_dropping_a_round_waits_for_a_write_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A late update whose file is being written when the round's files are dropped: the
    drop waits for it, so the write neither loses its temporary file nor leaves a file
    behind in a folder nobody will clean."""
    import threading

    from qflare.robust import Reputation
    from qflare.services.detector import store as store_module

    gate = threading.Event()
    entered = threading.Event()
    real_write = store_module.fsync_write

    def slow_write(path: Path, data: bytes) -> None:
        if "late" in path.name:
            entered.set()
            gate.wait(10)
        real_write(path, data)

    monkeypatch.setattr(store_module, "fsync_write", slow_write)
    store = await DetectorStore.open(tmp_path)
    try:
        for c in CLIENTS:
            await store.add_update(JOB, 1, c, digest(c, 1), tensors(c, 1))
        late = asyncio.create_task(
            store.add_update(JOB, 1, "late", digest("late", 1), tensors("late", 1))
        )
        await asyncio.to_thread(entered.wait, 10)
        assert await store.record_verdict(
            JOB, 1, {"kept": list(CLIENTS), "flagged": []}, Reputation()
        )
        drop = asyncio.create_task(store.drop_round_files(JOB, 1))
        await asyncio.sleep(0.1)
        assert not drop.done(), "the drop did not wait for the write in flight"
        gate.set()
        assert await late == "stored"
        await drop
        assert not (tmp_path / "updates" / JOB / "r1").exists()
    finally:
        gate.set()
        await store.close()


async def _held(store: DetectorStore, round_no: int, count: int = len(CLIENTS)) -> bool:
    return len(await store.held(JOB, round_no)) == count


async def _no_files(root: Path, round_no: int) -> bool:
    return not (root / "updates" / JOB / f"r{round_no}").exists()


async def test_the_aggregator_drops_a_round_only_after_its_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The aggregator's store has the same hazard: a late update being written (the round
    closed at its deadline meanwhile) while the published round's files are dropped."""
    import threading

    from qflare.services.aggregator import store as agg_module
    from qflare.services.aggregator.store import AggregatorStore

    gate, entered = threading.Event(), threading.Event()
    real_write = agg_module.fsync_write

    def slow_write(path: Path, data: bytes) -> None:
        if path.name.startswith("late"):
            entered.set()
            gate.wait(10)
        real_write(path, data)

    monkeypatch.setattr(agg_module, "fsync_write", slow_write)
    store = await AggregatorStore.open(tmp_path)
    try:
        await store.add_update(JOB, 1, "c0", digest("c0", 1), b"n0", 10, tensors("c0", 1))
        late = asyncio.create_task(
            store.add_update(JOB, 1, "late", digest("late", 1), b"n1", 10, tensors("late", 1))
        )
        await asyncio.to_thread(entered.wait, 10)
        drop = asyncio.create_task(store.drop_round_files(JOB, 1))
        await asyncio.sleep(0.1)
        assert not drop.done(), "the drop did not wait for the write in flight"
        gate.set()
        assert await late is None
        await drop
        assert not (tmp_path / "updates" / JOB / "r1").exists()
    finally:
        gate.set()
        await store.close()


async def test_a_job_submitted_at_run_time_survives_a_restart(
    federation: Federation, tmp_path: Path
) -> None:
    """A job given to the detector in process (not in its configuration) is remembered in
    its store: after a restart in the middle of a round it still takes the round's last
    update and decides the pending round."""
    bus = await connect_bus(f"memory://det-{tmp_path.name}")
    settings = load_settings(None, env={}, data_dir=str(tmp_path))  # no [[jobs]]
    ids = {"detector": (federation.identity("detector"), federation.trust())}
    wire = Wire(federation, bus)
    await wire.start()
    try:
        async with run_in_process(settings, bus, services=["detector"], identities=ids) as running:
            await running.services["detector"].submit_job(spec())
            for c in CLIENTS[:-1]:
                await wire.update(c, 1)
            store = running.services["detector"].store
            await until(lambda: _held(store, 1, len(CLIENTS) - 1))
            await wire.closed(1)  # pending: the last client's update is still on its way
            await until(lambda: _pending(store, 1))
            await running.restart("detector", identities=ids)  # no submit_job this time
            restarted = running.services["detector"]
            assert restarted.specs[JOB].f == 1 and restarted.specs[JOB].detection
            assert restarted.specs[JOB].seed == 0, "the secret seed is not kept by the detector"
            await wire.update(CLIENTS[-1], 1)
            await wire.verdict_count(1, 1)
    finally:
        await bus.close()


async def _pending(store: DetectorStore, round_no: int) -> bool:
    return any(r == round_no for _j, r, _refs in await store.pending(JOB))
