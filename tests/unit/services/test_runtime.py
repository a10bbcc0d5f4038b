"""qflare.runtime: settings, job specs, the SQLite helper and the one handler wrapper."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path

import pytest

from qflare.bus import Bus, Delivery, Outcome, QueueSpec, connect_bus, topology
from qflare.crypto import Federation, provision
from qflare.messages import MessageRejected, Reason, open_envelope
from qflare.runtime import (
    Consumer,
    Database,
    JobSpec,
    Service,
    ServiceContext,
    fsync_write,
    load_settings,
)
from qflare.runtime.envelopes import emit, open_delivery
from qflare.runtime.logging import JsonFormatter


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return provision(tmp_path_factory.mktemp("pki"), clients=1)


def _job(**kw: object) -> dict[str, object]:
    return {"job_id": "j1", "rounds": 3, "participants": ["a", "b", "c"], **kw}


# -- settings ---------------------------------------------------------------------------
def test_settings_file_env_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "m.safetensors").write_bytes(b"")
    cfg = tmp_path / "q.toml"
    cfg.write_text(
        '[qflare]\nbroker = "amqp://u:secret@h:5672/"\ndata_dir = "state"\nprefix = "p-"\n'
        "[services.aggregator]\nreopen_interval_s = 2.5\n"
        '[[jobs]]\njob_id = "j1"\nrounds = 2\nparticipants = ["b", "a", "c"]\nseed = 7182818284\n'
        'initial_model = "m.safetensors"\n'
    )
    s = load_settings(cfg, env={"QFLARE_PREFIX": "env-", "QFLARE_PASSPHRASE": "pass-Zq81"})
    assert s.broker == "amqp://u:secret@h:5672/" and s.prefix == "env-"
    assert s.data_dir == tmp_path / "state" and s.passphrase == "pass-Zq81"
    assert s.options("aggregator")["reopen_interval_s"] == 2.5
    job = s.job("j1")
    assert job.participants == ("a", "b", "c") and job.initial_model == tmp_path / "m.safetensors"
    assert "secret" not in json.dumps(s.safe_dict()) and "pass-Zq81" not in repr(s)
    # a seed no temporary path can contain by chance
    assert "7182818284" not in repr(job) and "seed" not in job.public()
    assert load_settings(cfg, env={}, broker="memory://").embedded
    assert load_settings(None, env={}).broker == "memory://"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[qflare]\nbrokr = 1\n", "\\[qflare\\] brokr: unknown option"),
        ("[other]\n", "unknown top-level"),
        ("[qflare\n", "not valid TOML"),
        ('[qflare]\nbroker = "http://x"\n', "memory://, amqp://"),
        ('[qflare]\nlog_format = "xml"\n', "log_format"),
    ],
)
def test_settings_errors_name_the_value(tmp_path: Path, text: str, match: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_settings(cfg, env={})


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_settings(tmp_path / "none.toml", env={})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"f": 2}, "2f < n"),
        ({"participants": ["a", "a", "b"]}, "duplicates"),
        ({"participants": ["a b"]}, "routing-key word"),
        ({"job_id": "j.1"}, "routing-key word"),
        ({"min_updates": 4}, "exceeds"),
        ({"sample_rate": 0.0}, "greater than 0"),
        ({"surprise": 1}, "Extra inputs"),
    ],
)
def test_jobspec_rejects_inconsistent_jobs(change: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        JobSpec.model_validate(_job(**change))


# -- sqlite + files -----------------------------------------------------------------------
async def test_database_transactions_and_wal(tmp_path: Path) -> None:
    db = await Database.open(
        tmp_path / "s.sqlite", "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INT);"
    )
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO t VALUES ('a', 1)")
    with pytest.raises(sqlite3.IntegrityError):
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO t VALUES ('b', 2)")
            await conn.execute("INSERT INTO t VALUES ('a', 3)")  # violates the key: all rolled back
    rows = await db.fetchall("SELECT k, v FROM t ORDER BY k")
    assert [tuple(r) for r in rows] == [("a", 1)]
    assert (await db.fetchone("PRAGMA journal_mode"))[0] == "wal"
    await db.close()
    # The schema is idempotent: reopening keeps the data.
    db = await Database.open(
        tmp_path / "s.sqlite", "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INT);"
    )
    assert (await db.fetchone("SELECT v FROM t WHERE k='a'"))[0] == 1
    await db.close()


async def test_a_file_from_an_older_version_gains_the_new_columns_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    """The aggregator's rounds table as it was before adaptive clipping (no clip,
    next_clip): the store opens it, adds the columns, and the stored round is still there."""
    from qflare.services.aggregator.store import SCHEMA, AggregatorStore

    old = SCHEMA.replace("    clip REAL,\n    next_clip REAL,\n", "")
    assert old != SCHEMA
    path = tmp_path / AggregatorStore.FILE
    with sqlite3.connect(path) as conn:
        for statement in old.split(";"):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO rounds (job_id, round, state, base_version, updated) "
            "VALUES ('j', 1, 'published', 0, 1.0)"
        )
    store = await AggregatorStore.open(tmp_path)
    try:
        row = await store.db.fetchone("SELECT state, clip, next_clip FROM rounds WHERE round=1")
        assert row is not None and tuple(row) == ("published", None, None)
    finally:
        await store.close()
    # a column the old rows cannot have (NOT NULL, no default) is refused, naming it
    with pytest.raises(sqlite3.DatabaseError, match="lacks column created"):
        await Database.open(
            tmp_path / AggregatorStore.FILE,
            "CREATE TABLE IF NOT EXISTS rounds (created REAL NOT NULL)",
        )


async def test_concurrent_writers_on_one_connection_do_not_collide(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "c.sqlite", "CREATE TABLE t (k INT PRIMARY KEY)")

    async def txn(i: int) -> None:
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO t VALUES (?)", (i,))
            await asyncio.sleep(0)  # let the others try to interleave
            await conn.execute("INSERT INTO t VALUES (?)", (1000 + i,))

    await asyncio.gather(
        *(txn(i) for i in range(20)),
        *(db.execute("INSERT INTO t VALUES (?)", (5000 + i,)) for i in range(20)),
    )
    assert (await db.fetchone("SELECT COUNT(*) FROM t"))[0] == 60
    await db.close()


def test_fsync_write_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "d" / "x.bin"
    fsync_write(target, b"one")
    fsync_write(target, memoryview(b"two"))
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["x.bin"]


def test_json_log_lines_carry_fields() -> None:
    record = logging.LogRecord("qflare.x", logging.INFO, __file__, 1, "round.opened", None, None)
    record.fields = {"job": "j1", "round": 2, "epsilon": float("inf")}
    line = json.loads(
        JsonFormatter("aggregator").format(record), parse_constant=lambda c: pytest.fail(c)
    )
    assert line["epsilon"] == "inf"
    assert line["event"] == "round.opened" and line["service"] == "aggregator"
    assert line["job"] == "j1" and line["round"] == 2 and line["level"] == "INFO"


# -- the handler wrapper ------------------------------------------------------------------
class Probe(Service):
    """Settles each message as its body says, through the real wrapper."""

    name = "detector"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.seen: list[tuple[str, int]] = []

    def consumers(self) -> list[Consumer]:
        return [
            Consumer(
                QueueSpec("probe", bindings=((topology.EVENTS, "probe.*"),), delivery_limit=3),
                self.on_probe,
            )
        ]

    async def on_probe(self, delivery: Delivery) -> Outcome | None:
        self.seen.append((delivery.body.decode(), delivery.delivery_count))
        match delivery.body:
            case b"ok":
                return None
            case b"bad":
                raise MessageRejected(Reason.MALFORMED, "probe says bad")
            case b"flaky" if delivery.delivery_count == 1:
                raise OSError("disk busy")
            case b"flaky":
                return None
            case b"wait" if delivery.delivery_count < 2:
                return Outcome.RETRY
            case b"wait":
                return Outcome.ACK
            case _:
                raise RuntimeError("a bug")


def _context(federation: Federation, tmp_path: Path, bus: Bus, name: str) -> ServiceContext:
    """The context of service ``name`` on ``bus``, its data in ``tmp_path``."""
    return ServiceContext(
        name=name,
        settings=load_settings(None, env={}, data_dir=str(tmp_path)),
        bus=bus,
        identity=federation.identity(name),
        trust=federation.trust(),
        data_dir=tmp_path,
    )


async def test_wrapper_settles_by_outcome_and_alerts_on_rejects(
    federation: Federation, tmp_path: Path
) -> None:
    bus = await connect_bus("memory://wrapper")
    ctx = _context(federation, tmp_path, bus, "detector")
    probe = Probe(ctx)
    alerts: list[bytes] = []
    dead: list[Delivery] = []
    got_alert = asyncio.Event()

    async def on_alert(d: Delivery) -> Outcome:
        alerts.append(d.body)
        got_alert.set()
        return Outcome.ACK

    async def on_dead(d: Delivery) -> Outcome:
        dead.append(d)
        return Outcome.ACK

    await bus.consume(
        QueueSpec("alerts", bindings=((topology.EVENTS, "alert.raised.*"),)), on_alert
    )
    await bus.consume(topology.dead_letters(), on_dead)
    await probe.start()
    for body in (b"ok", b"bad", b"flaky", b"wait", b"bug"):
        await bus.publish(topology.EVENTS, "probe.j7", body)
    await asyncio.wait_for(got_alert.wait(), 5)
    for _ in range(200):
        if len(dead) >= 2 and len(probe.seen) >= 9:
            break
        await asyncio.sleep(0.01)
    await probe.stop()
    await bus.close()

    counts: dict[str, int] = {}
    for body, _n in probe.seen:
        counts[body] = counts.get(body, 0) + 1
    assert counts == {"ok": 1, "bad": 1, "flaky": 2, "wait": 2, "bug": 3}
    assert sorted((d.body, d.death_reason) for d in dead) == [
        (b"bad", "rejected"),
        (b"bug", "delivery_limit"),
    ]
    assert len(alerts) == 1
    env = open_envelope(alerts[0], federation.trust(), expect_kind="alert.raised")
    assert env.sender == "detector" and env.job == "j7"
    assert env.body.reason == "MALFORMED" and env.body.alert_kind == "message.rejected"
    assert "probe says bad" in env.body.detail


class FailingStore(Service):
    """A service whose store fails for its first ``failures`` attempts of each message."""

    name = "aggregator"

    def __init__(self, ctx: ServiceContext, failures: int, error: BaseException) -> None:
        super().__init__(ctx)
        self.failures, self.error = failures, error
        self.attempts: dict[bytes, int] = {}
        self.done: list[bytes] = []

    def consumers(self) -> list[Consumer]:
        return [
            Consumer(
                QueueSpec("store-probe", bindings=((topology.EVENTS, "sp.*"),), delivery_limit=2),
                self.on_message,
            )
        ]

    async def on_message(self, delivery: Delivery) -> None:
        n = self.attempts[delivery.body] = self.attempts.get(delivery.body, 0) + 1
        if delivery.body.startswith(b"free") or n > self.failures:
            self.done.append(delivery.body)  # "free...": a handler that writes nothing
            return
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        sqlite3.OperationalError("disk I/O error"),
        sqlite3.OperationalError("database or disk is full"),
        OSError(28, "No space left on device"),  # ENOSPC
        OSError(30, "Read-only file system"),  # EROFS
    ],
    ids=["sqlite-io", "sqlite-full", "enospc", "erofs"],
)
async def test_a_failing_store_holds_the_message_and_alerts_once(
    federation: Federation, tmp_path: Path, error: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage faults hold, never drop: more failures than the queue's delivery limit (2), no
    dead letter, one critical alert for the whole episode, and the message is handled once
    the store works again."""
    monkeypatch.setattr("qflare.runtime.service.STORAGE_RETRY_S", (0.01, 0.05))
    bus = await connect_bus(f"memory://store-{type(error).__name__}-{id(error)}")
    ctx = _context(federation, tmp_path, bus, "aggregator")
    svc = FailingStore(ctx, failures=6, error=error)
    alerts: list[bytes] = []
    dead: list[Delivery] = []

    async def on_alert(d: Delivery) -> Outcome:
        alerts.append(d.body)
        return Outcome.ACK

    async def on_dead(d: Delivery) -> Outcome:
        dead.append(d)
        return Outcome.ACK

    await bus.consume(
        QueueSpec("alerts", bindings=((topology.EVENTS, "alert.raised.*"),)), on_alert
    )
    await bus.consume(topology.dead_letters(), on_dead)
    await svc.start()
    for body in (b"m1", b"m2"):
        await bus.publish(topology.EVENTS, "sp.j", body)
    for _ in range(500):
        if sorted(svc.done) == [b"m1", b"m2"]:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    await svc.stop()
    await bus.close()
    assert sorted(svc.done) == [b"m1", b"m2"] and dead == []
    assert svc.attempts == {b"m1": 7, b"m2": 7}
    kinds = [open_envelope(a, federation.trust()).body for a in alerts]
    assert [(k.alert_kind, k.severity) for k in kinds] == [("storage.fault", "critical")]


async def test_handlers_that_write_nothing_do_not_end_a_storage_episode(
    federation: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a held message keeps failing, others that touch no store go through (several
    deliveries are in flight): the episode stays one alert until the held message itself
    goes through."""
    monkeypatch.setattr("qflare.runtime.service.STORAGE_RETRY_S", (0.02, 0.02))
    bus = await connect_bus("memory://store-episode")
    ctx = _context(federation, tmp_path, bus, "aggregator")
    svc = FailingStore(ctx, failures=20, error=OSError(28, "No space left on device"))
    alerts: list[bytes] = []

    async def on_alert(d: Delivery) -> Outcome:
        alerts.append(d.body)
        return Outcome.ACK

    await bus.consume(
        QueueSpec("alerts", bindings=((topology.EVENTS, "alert.raised.*"),)), on_alert
    )
    await svc.start()
    await bus.publish(topology.EVENTS, "sp.j", b"held")
    for i in range(6):
        await asyncio.sleep(0.03)
        await bus.publish(topology.EVENTS, "sp.j", b"free%d" % i)
    for _ in range(500):
        if b"held" in svc.done:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    await svc.stop()
    await bus.close()
    assert svc.done[-1] == b"held" and len(svc.done) == 7
    assert svc.attempts[b"held"] == 21
    assert len(alerts) == 1


async def test_an_oserror_that_is_not_the_disk_is_retried_as_before(
    federation: Federation, tmp_path: Path
) -> None:
    bus = await connect_bus("memory://store-notdisk")
    ctx = _context(federation, tmp_path, bus, "aggregator")
    svc = FailingStore(ctx, failures=5, error=ConnectionResetError("peer went away"))
    dead: list[Delivery] = []

    async def on_dead(d: Delivery) -> Outcome:
        dead.append(d)
        return Outcome.ACK

    await bus.consume(topology.dead_letters(), on_dead)
    await svc.start()
    await bus.publish(topology.EVENTS, "sp.j", b"m")
    for _ in range(300):
        if dead:
            break
        await asyncio.sleep(0.01)
    await svc.stop()
    await bus.close()
    # a transient fault that is not the local store keeps the queue's bound: 2 deliveries
    assert svc.attempts == {b"m": 2} and [d.death_reason for d in dead] == ["delivery_limit"]


async def test_envelopes_round_trip_and_forgery_is_rejected(
    federation: Federation, tmp_path: Path
) -> None:
    bus = await connect_bus("memory://env")
    ctx = _context(federation, tmp_path, bus, "detector")
    probe = Probe(ctx)
    got: list[Delivery] = []
    await bus.consume(
        QueueSpec("v", bindings=((topology.EVENTS, "round.verdict.*"),)), lambda d: _keep(got, d)
    )
    sent = await emit(probe, "round.verdict", {"kept": ["a"], "flagged": []}, job="j1", round=4)
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.01)
    env = await open_delivery(probe, got[0], expect_kind="round.verdict")
    assert got[0].routing_key == "round.verdict.j1" and got[0].body == sent
    assert env.round == 4 and env.body.kept == ["a"]
    forged = bytearray(sent)
    forged[-3] ^= 0xFF
    with pytest.raises(MessageRejected) as err:
        await open_delivery(
            probe, Delivery(bytes(forged), "round.verdict.j1", topology.EVENTS, {}, False, 1)
        )
    assert err.value.reason in (Reason.BAD_DIGEST, Reason.BAD_SIGNATURE, Reason.MALFORMED)
    with pytest.raises(ValueError, match="may not send"):
        await emit(
            probe,
            "model.published",
            {"version": 1, "digest": b"x" * 32, "epsilon": 0.0},
            job="j1",
            round=1,
        )
    await bus.close()


async def _keep(box: list[Delivery], d: Delivery) -> Outcome:
    box.append(d)
    return Outcome.ACK
