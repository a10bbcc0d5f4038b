"""The RabbitMQ definitions file, loaded into a throwaway vhost of the real broker.

Shows the broker half of the trust model (docs/architecture.md, "The data plane"), as each
service role and as a participant, every allowed and every forbidden operation: a
participant reads only its jobs' ``broadcast.<job>`` and ``models.<job>`` streams and
publishes only ``update.<its job>`` to ``qflare.client``; the aggregator declares, reads and
deletes the job streams; ingest and the detector read the update streams by name and cannot
declare or delete them; no service publishes where its role does not, and none may declare
or delete an exchange (services run with ``declare="passive"``, ``[qflare]
broker_declare``: the file creates the exchanges and their durable queues). The matrix at the end
tries, as each of the seven users, every operation on every resource of the vhost (publish,
declare and delete on the five exchanges and the default one; read, declare, delete and bind
on the six streams of two jobs and the queues) and compares with what the role needs
(``MAY``). Needs ``rabbitmqctl`` with rights on the local node (root here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import numpy as np
import pytest

from qflare.bus import topology
from qflare.commands.broker import (
    ROLES,
    BrokerUser,
    build_definitions,
    client_permissions,
    permissions,
    rabbit_password_hash,
)

pytestmark = [pytest.mark.rabbitmq]

HOST = "127.0.0.1:5672"
#: Each participant's one job; the aggregator declares these jobs' streams in the fixture.
#: j7 is declared by a test (a reader that starts first), j9 deleted by one.
JOB_OF = {"a": "j1", "b": "j2", "p": "j8"}
STREAM_OF = {
    "updates": topology.update_stream,
    "models": topology.model_stream,
    "broadcast": topology.broadcast_stream,
}


def _ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def loaded() -> Iterator[dict[str, Any]]:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed")
    from qflare.crypto.testing import make_federation

    tag = uuid.uuid4().hex[:8]
    vhost = f"qflare-test-{tag}"
    # real identities: a client whose id is its broker user (the SDK test) and every service
    fed = make_federation(1, client_prefix=f"cp{tag}")
    clients = {"a": f"ca{tag}", "b": f"cb{tag}", "p": f"cp{tag}-000"}
    # broker users are global, not per vhost: the roles' users get names of their own
    roles = {role: f"qflare-{role}-{tag}" for role in ROLES}
    names = {**clients, **roles}
    pw = {k: uuid.uuid4().hex for k in names}
    doc = build_definitions(
        [BrokerUser(clients[k], pw[k]) for k in clients],
        [],
        vhost=vhost,  # queues: the services' own QUEUES
        jobs={clients[k]: {job} for k, job in JOB_OF.items()},
    )
    for role, user in roles.items():
        doc["users"].append(
            {
                "name": user,
                "password_hash": rabbit_password_hash(pw[role]),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
        )
        doc["permissions"].append(permissions(role, user, vhost))
    # the test itself plays an administrator through guest
    doc["permissions"].append(
        {"user": "guest", "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
    )
    # Debian's rabbitmqctl runs as the rabbitmq user: the file must be readable by it
    # (pytest's tmp_path is 0700), and this rabbitmqctl does not read "-" (stdin).
    fd, name = tempfile.mkstemp(prefix="qflare-defs-", suffix=".json")
    path = Path(name)
    info = {"vhost": vhost, "names": names, "pw": pw, "doc": doc, "fed": fed, "tag": tag}
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
        path.chmod(0o644)
        result = _ctl("import_definitions", str(path))
        assert result.returncode == 0, result.stderr + result.stdout
        asyncio.run(_wait_imported(info))
        # what the aggregator does when a job is submitted, as its own user
        asyncio.run(_declare_jobs(_url(info, "aggregator"), sorted(JOB_OF.values())))
        yield info
    finally:
        path.unlink(missing_ok=True)
        # in parallel: each rabbitmqctl start costs about a second of Erlang boot
        procs = [
            subprocess.Popen(
                ["rabbitmqctl", "-q", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            for cmd in (["delete_vhost", vhost], *(["delete_user", u] for u in names.values()))
        ]
        for proc in procs:
            proc.wait(timeout=60)


async def _wait_imported(info: dict[str, Any], timeout: float = 30.0) -> None:
    # import_definitions returns before the import finished ("asynchronous" in 3.10): wait
    # until the last user can log in and see the queues (over AMQP: cheaper than rabbitmqctl)
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await aio_pika.connect(_url(info, "operator"), timeout=5)
            try:
                ch = await conn.channel()
                await ch.get_queue("alerting.dead", ensure=True)  # passive: no right needed
                return
            finally:
                await conn.close()
        except Exception:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"definitions for {info['vhost']} not imported within {timeout}s"
                ) from None
            await asyncio.sleep(0.3)


async def _declare_jobs(url: str, jobs: list[str]) -> None:
    from qflare.bus import connect_bus

    bus = await connect_bus(url, connect_timeout=5, declare="passive")
    try:
        for job in jobs:
            for stream in topology.job_streams(job):
                await bus.declare_stream(stream)
    finally:
        await bus.close()


def _url(info: dict[str, Any], who: str) -> str:
    return f"amqp://{info['names'][who]}:{info['pw'][who]}@{HOST}/{info['vhost']}"


def _admin(info: dict[str, Any]) -> str:
    return f"amqp://guest:guest@{HOST}/{info['vhost']}"


# -- every operation, allowed or not, as each user --------------------------------------------
#: An operation on the broker, done on a channel of its own: ("publish", exchange, key)
#: ("" is the default exchange), ("read", stream) from its first offset, ("declare", stream)
#: with the job stream's own arguments, ("delete", queue), ("bind", queue, exchange, key),
#: ("queue", name) a transient queue of that name.
Op = tuple[str, ...]


async def _do(ch: aio_pika.abc.AbstractChannel, op: Op) -> None:
    from qflare.bus.rabbitmq import stream_arguments

    what, target, *rest = op
    if what == "publish":
        ex = ch.default_exchange if target == "" else await ch.get_exchange(target, ensure=True)
        await ex.publish(aio_pika.Message(b"x"), rest[0], timeout=10)
    elif what == "read":
        await ch.set_qos(prefetch_count=1)
        q = await ch.get_queue(target, ensure=True)  # passive: no right needed
        tag = await q.consume(_ack, arguments={"x-stream-offset": "first"})
        await q.cancel(tag)
    elif what == "declare":
        kind, job = target.split(".", 1)
        spec = STREAM_OF[kind](job)
        await ch.declare_queue(target, durable=True, arguments=stream_arguments(spec))
    elif what == "delete":
        await ch.queue_delete(target)
    elif what == "bind":
        q = await ch.get_queue(target, ensure=True)
        await q.bind(rest[0], rest[1])
    elif what == "queue":
        await ch.declare_queue(
            target, exclusive=True, auto_delete=True, arguments={"x-queue-type": "classic"}
        )
    else:
        raise ValueError(f"unknown operation {op!r}")


async def _ack(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    await message.ack()


async def _allowed(url: str, op: Op) -> bool:
    """Whether the broker lets the user of ``url`` do ``op`` (False: ACCESS_REFUSED)."""
    conn = await aio_pika.connect(url, timeout=10)
    try:
        ch = await conn.channel(publisher_confirms=True)
        try:
            await _do(ch, op)
        except aiormq.exceptions.ChannelAccessRefused:
            return False
        return True
    finally:
        await conn.close()


C, E, B, A = topology.CLIENT, topology.EVENTS, topology.BROADCAST, topology.ALERTS
#: (who, operation, allowed). "a" is a participant of j1 only; the job streams of j1 and
#: j2 exist (declared by the aggregator's user).
CASES: list[tuple[str, Op, bool]] = [
    # a participant: its job's announcements and models, its own job's updates, nothing else
    ("a", ("publish", C, "update.j1"), True),
    ("a", ("read", "broadcast.j1"), True),
    ("a", ("read", "models.j1"), True),
    ("a", ("read", "broadcast.j2"), False),  # another job's streams
    ("a", ("read", "models.j2"), False),
    ("a", ("read", "updates.j1"), False),  # other participants' updates
    ("a", ("publish", C, "update.j2"), False),  # topic permission: its jobs only
    ("a", ("publish", C, "round.opened.j1"), False),
    ("a", ("publish", B, "j1.model.published"), False),  # a model
    ("a", ("publish", B, "j1.round.opened"), False),
    ("a", ("publish", E, "update.accepted.j1"), False),
    ("a", ("publish", "", "models.j1"), False),  # straight into a stream
    ("a", ("declare", "broadcast.j1"), False),  # configure: nothing
    ("a", ("delete", "models.j1"), False),
    ("a", ("bind", "broadcast.j1", B, "#"), False),  # every job's models into its stream
    ("a", ("queue", "client.a"), False),  # no queue of its own any more
    # the aggregator: the job streams, events and broadcasts
    ("aggregator", ("publish", E, "round.opened.j1"), True),
    ("aggregator", ("publish", B, "j1.round.opened"), True),
    ("aggregator", ("read", "updates.j1"), True),
    ("aggregator", ("read", "models.j1"), True),
    ("aggregator", ("declare", "updates.j1"), True),  # idempotent: needs configure
    ("aggregator", ("declare", "models.j1"), True),
    ("aggregator", ("declare", "broadcast.j1"), True),
    ("aggregator", ("bind", "models.j1", B, "j1.model.published"), True),
    ("aggregator", ("queue", "aggregator.probe"), True),
    ("aggregator", ("publish", A, "critical.x.j1"), False),
    ("aggregator", ("publish", C, "update.j1"), False),  # no client's update
    ("aggregator", ("publish", "", "updates.j1"), False),
    ("aggregator", ("queue", "detector.probe"), False),  # another role's queue
    ("aggregator", ("delete", "alerting"), False),
    # ingest and the detector: the update streams, read by name
    ("ingest", ("publish", E, "update.accepted.j1"), True),
    ("ingest", ("read", "updates.j1"), True),
    ("ingest", ("read", "updates.j2"), True),
    ("ingest", ("queue", "ingest.rounds.probe"), True),
    ("ingest", ("declare", "updates.j1"), False),
    ("ingest", ("delete", "updates.j1"), False),
    ("ingest", ("bind", "updates.j1", E, "#"), False),
    ("ingest", ("read", "models.j1"), False),
    ("ingest", ("read", "broadcast.j1"), False),
    ("ingest", ("publish", B, "j1.model.published"), False),
    ("ingest", ("publish", A, "critical.x.j1"), False),
    ("ingest", ("publish", C, "update.j1"), False),
    ("detector", ("publish", E, "round.verdict.j1"), True),
    ("detector", ("read", "updates.j1"), True),
    ("detector", ("queue", "detector.probe"), True),
    ("detector", ("declare", "updates.j1"), False),
    ("detector", ("delete", "updates.j1"), False),
    ("detector", ("read", "models.j1"), False),
    ("detector", ("publish", B, "j1.model.published"), False),
    ("detector", ("publish", A, "critical.x.j1"), False),
    # the accountant, alerting and the operator's console: no stream at all
    ("accountant", ("publish", E, "privacy.granted.j1"), True),
    ("accountant", ("queue", "accountant.probe"), True),
    ("accountant", ("read", "updates.j1"), False),
    ("accountant", ("read", "models.j1"), False),
    ("accountant", ("publish", B, "j1.round.opened"), False),
    ("accountant", ("publish", A, "critical.x.j1"), False),
    ("alerting", ("publish", A, "critical.x.j1"), True),
    ("alerting", ("publish", E, "alert.raised.j1"), True),
    ("alerting", ("read", "updates.j1"), False),
    ("alerting", ("read", "broadcast.j1"), False),
    ("alerting", ("publish", B, "j1.round.opened"), False),
    ("alerting", ("publish", C, "update.j1"), False),
    ("operator", ("publish", E, "job.ended.j1"), True),
    ("operator", ("queue", "console.probe"), True),
    ("operator", ("read", "updates.j1"), False),
    ("operator", ("read", "models.j1"), False),
    ("operator", ("publish", A, "critical.x.j1"), False),
    ("operator", ("publish", B, "j1.job.ended"), False),
    ("operator", ("queue", "aggregator.probe"), False),
]


def _case_id(case: tuple[str, Op, bool]) -> str:
    who, op, allowed = case
    what = " ".join(part or "''" for part in op)
    return f"{'participant' if who == 'a' else who} {'may' if allowed else 'may not'} {what}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
async def test_each_user_may_do_what_its_role_needs_and_nothing_else(
    loaded: dict[str, Any], case: tuple[str, Op, bool]
) -> None:
    who, op, allowed = case
    assert await _allowed(_url(loaded, who), op) is allowed


def test_definitions_declare_the_topology_but_no_job_stream(loaded: dict[str, Any]) -> None:
    doc = loaded["doc"]
    assert {e["name"] for e in doc["exchanges"]} == set(topology.EXCHANGES)
    # every durable queue a service consumes (a passive service only checks it); no
    # per-client queue and no ingest queue: updates and models travel in job streams, which
    # the aggregator declares at submission (a file loaded at every broker boot would
    # re-create deleted ones)
    assert {q["name"] for q in doc["queues"]} == set(topology.SERVICE_QUEUES)
    assert {p["name"] for p in doc["policies"]} == {"qflare-dead-letters"}
    listed = _ctl("list_queues", "-p", loaded["vhost"], "name", "type")
    assert re.search(r"^broadcast\.j1\s+stream$", listed.stdout, re.M), listed.stdout


def test_participant_permissions_name_only_its_jobs() -> None:
    perm, topic = client_permissions("c1", ["j1", "j-2"], "v", prefix="P.")
    read, write = re.compile(perm["read"]), re.compile(topic["write"])
    assert perm["configure"] == "^$" and perm["write"] == r"^P\.qflare\.client$"
    for name, ok in [
        ("P.broadcast.j1", True),
        ("P.models.j-2", True),
        ("P.updates.j1", False),
        ("P.broadcast.j10", False),  # a job whose id starts like one of its own
        ("broadcast.j1", False),  # another federation's prefix
        ("P.qflare.broadcast", False),
    ]:
        assert bool(read.fullmatch(name)) is ok, name
    for key, ok in [("update.j1", True), ("update.j-2", True), ("update.j10", False)]:
        assert bool(write.fullmatch(key)) is ok, key
    assert topic["exchange"] == "P.qflare.client" and topic["read"] == "^$"
    # a client in no job can log in (a permission row exists) and do nothing else
    none, none_topic = client_permissions("c2", [], "v")
    assert none["configure"] == none["write"] == none["read"] == none_topic["write"] == "^$"


async def test_aggregator_declares_reads_and_deletes_a_jobs_streams_as_its_own_user(
    loaded: dict[str, Any],
) -> None:
    from qflare.bus import Outcome, StreamNotFound, connect_bus

    async def ignore(_: object) -> Outcome:
        return Outcome.ACK

    bus = await connect_bus(_url(loaded, "aggregator"), connect_timeout=5, declare="passive")
    try:
        for stream in topology.job_streams("j9"):  # as the aggregator does at submission
            await bus.declare_stream(stream)
        reader = await bus.read_stream(topology.model_stream("j9"), ignore, offset="next")
        await reader.cancel()
        for stream in topology.job_streams("j9"):  # ... and when the job ended
            await bus.delete_stream(stream.name)
    finally:
        await bus.close()
    admin = await connect_bus(_admin(loaded), connect_timeout=5)
    try:
        for stream in topology.job_streams("j9"):
            with pytest.raises(StreamNotFound):
                await admin.read_stream(stream.name, ignore)
    finally:
        await admin.close()


@pytest.mark.parametrize("role", ["ingest", "detector"])
async def test_update_readers_read_by_name_and_cannot_declare(
    loaded: dict[str, Any], role: str
) -> None:
    # why ingest and the detector read the update stream by name: declaring it again, even
    # with the same arguments, needs configure on it, which would also let them delete it
    from qflare.bus import AccessRefused, Outcome, connect_bus

    async def ignore(_: object) -> Outcome:
        return Outcome.ACK

    bus = await connect_bus(_url(loaded, role), connect_timeout=5, declare="passive")
    try:
        reader = await bus.read_stream(topology.update_stream("j1").name, ignore, offset="first")
        await reader.cancel()
        with pytest.raises(AccessRefused):
            await bus.read_stream(topology.update_stream("j1"), ignore)
        with pytest.raises(AccessRefused):
            await bus.delete_stream(topology.update_stream("j2").name)
    finally:
        await bus.close()


async def test_update_feed_waits_for_a_stream_the_aggregator_declares_later(
    loaded: dict[str, Any],
) -> None:
    # the detector starts before the aggregator (qflare up's order): its read-ahead of a
    # job whose stream does not exist yet waits for it instead of declaring it
    from qflare.bus import connect_bus
    from qflare.messages import Update, encode
    from qflare.runtime.updates import UpdateFeed

    fed, pid = loaded["fed"], loaded["names"]["p"]
    seen: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    def wants(round_no: int, sender: str) -> bool:
        seen.put_nowait((round_no, sender))
        return False  # only the header is looked at

    async def sink(_: object) -> None:
        raise AssertionError("nothing is wanted")

    bus = await connect_bus(_url(loaded, "detector"), connect_timeout=5, declare="passive")
    feed = UpdateFeed(
        bus, "j7", trust=fed.trust(), kem_key=fed["detector"].kem, wants=wants, sink=sink
    )
    try:
        await feed.start("next")
        assert feed.next_offset is None  # waiting: no reader yet
        await _declare_jobs(_url(loaded, "aggregator"), ["j7"])
        update = Update(base_version=0, num_samples=1, tensors={"w": np.zeros(2, np.float32)})
        data = encode("update", update, fed[pid], job="j7", round=1)
        admin = await connect_bus(_admin(loaded), connect_timeout=5)
        try:
            assert await admin.publish(topology.CLIENT, "update.j7", data) is True
        finally:
            await admin.close()
        # written after the feed started, before or after it found the stream: read anyway
        assert await asyncio.wait_for(seen.get(), 15) == (1, pid)
    finally:
        await feed.stop()
        await bus.close()


async def test_participant_bus_reads_its_jobs_streams_by_name_as_its_restricted_user(
    loaded: dict[str, Any],
) -> None:
    from qflare.bus import AccessRefused, Delivery, Outcome, connect_bus

    a = _url(loaded, "a")
    # full declaration needs configure on the exchanges, which a client user lacks
    with pytest.raises(AccessRefused) as info:
        await connect_bus(a, connect_timeout=5)
    assert info.value.reason == "ACCESS_REFUSED" and "passive" in str(info.value)

    got: asyncio.Queue[Delivery] = asyncio.Queue()

    async def keep(d: Delivery) -> Outcome:
        await got.put(d)
        return Outcome.ACK

    bus = await connect_bus(a, connect_timeout=5, declare="passive")
    aggregator = await connect_bus(_url(loaded, "aggregator"), connect_timeout=5, declare="passive")
    try:
        reader = await bus.read_stream("broadcast.j1", keep, offset="next")
        assert await aggregator.publish(topology.BROADCAST, "j1.round.opened", b"announce")
        d = await asyncio.wait_for(got.get(), 10)
        assert (d.body, d.routing_key, d.offset is not None) == (
            b"announce",
            "j1.round.opened",
            True,
        )
        await reader.cancel()

        with pytest.raises(AccessRefused):  # declaring (even idempotently) needs configure
            await bus.read_stream(topology.broadcast_stream("j1"), keep)
        with pytest.raises(AccessRefused):
            await bus.read_stream("updates.j1", keep)
        with pytest.raises(AccessRefused):
            await bus.read_stream("models.j2", keep)
        with pytest.raises(AccessRefused):
            await bus.publish(topology.EVENTS, "update.accepted.j1", b"forged")
        with pytest.raises(AccessRefused):  # topic permission: update.<its job> only
            await bus.publish(topology.CLIENT, "update.j2", b"forged")
        # the refusals closed channels, not the bus: its own update still goes, into the
        # job's update stream
        updates = await aggregator.read_stream("updates.j1", keep, offset="next")
        assert await bus.publish(topology.CLIENT, "update.j1", b"delta") is True
        d = await asyncio.wait_for(got.get(), 10)
        assert (d.body, d.routing_key) == (b"delta", "update.j1")
        await updates.cancel()
    finally:
        await bus.close()
        await aggregator.close()


async def test_sdk_participant_follows_its_job_as_its_own_broker_user(
    loaded: dict[str, Any],
) -> None:
    from qflare.client import Kit, Participant
    from qflare.client.participant import declare_mode

    fed, pid = loaded["fed"], loaded["names"]["p"]
    assert declare_mode(_url(loaded, "p"), pid) == "passive"
    assert declare_mode(f"amqp://guest:guest@{HOST}/", pid) == "full"
    kit = Kit(fed[pid], fed.trust(), None, broker_password=loaded["pw"]["p"])
    p = Participant(
        kit,
        None,
        lambda model, info: 1,
        broker=f"amqp://{HOST}/{loaded['vhost']}",
        jobs=[JOB_OF["p"]],
        seal=False,
    )
    await p.start()  # the kit's credentials are filled in: its own user, so passive
    try:
        assert p.bus is not None and p.bus.passive is True
        conn = await aio_pika.connect(_url(loaded, "aggregator"), timeout=10)
        try:
            ch = await conn.channel(publisher_confirms=True)
            ex = await ch.get_exchange(topology.BROADCAST, ensure=True)
            deadline = time.monotonic() + 15
            # not an envelope: it arrives through broadcast.j8 and is refused as garbage
            # (again until the participant's reader, which starts at the newest, is attached)
            while p.stats.rejected < 1:
                assert time.monotonic() < deadline, "the broadcast did not reach the participant"
                await ex.publish(aio_pika.Message(b"x"), f"{JOB_OF['p']}.round.opened", timeout=10)
                await asyncio.sleep(0.3)
        finally:
            await conn.close()
    finally:
        await p.stop()


async def test_services_declare_their_queues_as_their_own_users_without_conflict(
    loaded: dict[str, Any], tmp_path: Path
) -> None:
    # each service's real queue specs (its consumers), declared and consumed as its own
    # broker user; a re-declaration with other arguments than the file's would fail
    # (PRECONDITION_FAILED -> TopologyError), so the file and the services agree
    from qflare.bus import AccessRefused, QueueSpec, connect_bus
    from qflare.commands.broker import service_queues
    from qflare.runtime import load_settings
    from qflare.runtime.bootstrap import SERVICES, build_service

    fed = loaded["fed"]
    settings = load_settings(None, env={}, data_dir=str(tmp_path))
    memory = await connect_bus("memory://")
    specs: dict[str, list[QueueSpec]] = {}
    try:
        for name in SERVICES:
            service = await build_service(
                name, settings, bus=memory, identity=fed[name], trust=fed.trust()
            )
            specs[name] = [c.spec for c in service.consumers()]
    finally:
        await memory.close()
    # the operator's console queue (tui/feed.py)
    specs["operator"] = [
        QueueSpec(
            f"console.test.{os.getpid()}",
            bindings=((topology.EVENTS, "#"), (topology.ALERTS, "#")),
            dead_letter=False,
            transient=True,
        )
    ]
    declared = {q["name"] for q in loaded["doc"]["queues"]}
    assert declared == {s.name for s in service_queues()}
    assert declared <= {s.name for ss in specs.values() for s in ss}
    for role, role_specs in specs.items():
        # a full declaration (the exchanges) is refused: services run passive
        with pytest.raises(AccessRefused, match="broker_declare"):
            await connect_bus(_url(loaded, role), connect_timeout=5)
        bus = await connect_bus(_url(loaded, role), connect_timeout=5, declare="passive")
        try:
            for spec in role_specs:
                sub = await bus.consume(spec, _noop)
                await sub.cancel()
        finally:
            await bus.close()


@pytest.mark.parametrize("role", ["aggregator", "ingest"])
async def test_a_service_started_by_bootstrap_runs_passive_as_its_own_user(
    loaded: dict[str, Any], tmp_path: Path, role: str
) -> None:
    # the wiring a `qflare serve` process uses: broker_declare from the settings reaches
    # the bus, and the service starts (consumes its queue) without configure on an exchange
    from qflare.runtime import load_settings
    from qflare.runtime.bootstrap import build_service

    fed = loaded["fed"]
    settings = load_settings(
        None,
        env={"QFLARE_BROKER_DECLARE": "passive"},
        broker=_url(loaded, role),
        data_dir=str(tmp_path),
    )
    service = await build_service(role, settings, identity=fed[role], trust=fed.trust())
    try:
        assert service.bus.passive is True  # type: ignore[attr-defined]
        await service.start()
        await service.stop()
    finally:
        await service.bus.close()


@pytest.mark.parametrize("declare", ["full", "passive"])
async def test_operator_console_watches_only_passively_as_its_own_user(
    loaded: dict[str, Any], declare: str
) -> None:
    # `qflare tui --declare passive` (or QFLARE_BROKER_DECLARE): the operator's user may
    # declare its console queue but no exchange, so a full declaration never connects
    from qflare.tui.events import Link, LinkChanged
    from qflare.tui.feed import Feed

    links: list[LinkChanged] = []

    def sink(events: Any) -> None:
        links.extend(e for e in events if isinstance(e, LinkChanged))

    feed = Feed(sink, url=_url(loaded, "operator"), declare=declare, retry_interval=0.2)
    task = asyncio.create_task(feed.run())
    try:
        deadline = time.monotonic() + (10 if declare == "passive" else 3)
        while time.monotonic() < deadline and not any(e.link is Link.CONNECTED for e in links):
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    connected = any(e.link is Link.CONNECTED for e in links)
    assert connected is (declare == "passive"), links[-3:]
    if declare == "full":
        assert any("ACCESS_REFUSED" in e.detail for e in links), links[-3:]


async def test_ingest_replica_declares_its_transient_round_queue_as_its_own_user(
    loaded: dict[str, Any],
) -> None:
    from qflare.bus import TopologyError, connect_bus
    from qflare.services.ingest.service import rounds_queue

    spec = rounds_queue("r-test")
    bus = await connect_bus(_url(loaded, "ingest"), connect_timeout=5, declare="passive")
    try:
        sub = await bus.consume(spec, _noop)  # transient: declared even by a passive bus
        other = await connect_bus(_url(loaded, "ingest"), connect_timeout=5, declare="passive")
        try:
            with pytest.raises(TopologyError):  # a second live replica of the same name
                await other.consume(spec, _noop)
        finally:
            await other.close()
        await sub.cancel()
    finally:
        await bus.close()
    listed = _ctl("list_queues", "-p", loaded["vhost"], "name")
    assert "ingest.rounds.r-test" not in listed.stdout, "the broker removed it with its consumer"


async def _noop(_: object) -> object:
    from qflare.bus import Outcome

    return Outcome.ACK


def test_wrong_password_cannot_log_in(loaded: dict[str, Any]) -> None:
    async def attempt() -> None:
        url = f"amqp://{loaded['names']['a']}:nope@{HOST}/{loaded['vhost']}"
        conn = await aio_pika.connect(url, timeout=10)
        await conn.close()

    with pytest.raises(Exception) as info:
        asyncio.run(attempt())
    assert (
        "ACCESS_REFUSED" in repr(info.value)
        or "authentication" in repr(info.value).lower()
        or isinstance(info.value, (aiormq.exceptions.ProbableAuthenticationError, ConnectionError))
    )


def test_password_hash_matches_rabbitmq_scheme() -> None:
    import base64
    import hashlib

    h = base64.b64decode(rabbit_password_hash("secret", salt=b"abcd"))
    assert h[:4] == b"abcd" and h[4:] == hashlib.sha256(b"abcdsecret").digest()
    with pytest.raises(ValueError):
        rabbit_password_hash("x", salt=b"ab")


# -- the command: where the jobs come from ----------------------------------------------------
def _definitions(argv: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> Any:
    out = tmp_path / "defs.json"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QFLARE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "qflare", "broker-definitions", *argv, "--out", str(out)],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), proc.stderr


def test_jobs_come_from_the_configs_participants_and_from_job_flags(tmp_path: Path) -> None:
    (tmp_path / "m.safetensors").write_bytes(b"")
    config = tmp_path / "fed.toml"
    config.write_text(
        '[qflare]\nprefix = "P-"\n'
        '[[jobs]]\njob_id = "alpha"\nrounds = 1\nparticipants = ["c1", "c2"]\n'
        'initial_model = "m.safetensors"\n'
        '[[jobs]]\njob_id = "beta"\nrounds = 1\nparticipants = ["c2", "c9"]\n'
        'initial_model = "m.safetensors"\n'
    )
    doc, err = _definitions(
        ["--clients", "c1", "c2", "c3", "--job", "gamma"],
        tmp_path,
        env={"QFLARE_CONFIG": str(config)},
    )
    assert "jobs: alpha, beta, gamma" in err
    read = {p["user"]: p["read"] for p in doc["permissions"]}
    topic = {t["user"]: t["write"] for t in doc["topic_permissions"]}
    assert read["c1"] == r"^P\-(broadcast|models)\.(alpha|gamma)$"
    assert topic["c2"] == r"^update\.(alpha|beta|gamma)$"
    assert topic["c3"] == r"^update\.(gamma)$"  # c9 has no user: not a listed client
    assert {e["name"] for e in doc["exchanges"]} == {"P-" + e for e in topology.EXCHANGES}
    # --prefix wins over the configuration's
    doc, _ = _definitions(["--clients", "c1", "--config", str(config), "--prefix", ""], tmp_path)
    assert doc["permissions"][0]["read"] == r"^(broadcast|models)\.(alpha)$"


def test_without_jobs_participants_get_nothing_and_the_command_says_so(tmp_path: Path) -> None:
    doc, err = _definitions(["--clients", "c1"], tmp_path)
    assert "jobs: none" in err and "--job" in err
    (perm,) = [p for p in doc["permissions"] if p["user"] == "c1"]
    assert perm["configure"] == perm["write"] == perm["read"] == "^$"


# -- compose/ ------------------------------------------------------------------------------------
COMPOSE = Path(__file__).resolve().parents[2] / "compose"
#: compose/definitions.json is written by this command (a sample: no passwords, one job):
#:   qflare broker-definitions --clients client-000 ... client-009 --job digits \
#:       --vhost qflare --out compose/definitions.json
SAMPLE_CLIENTS = [f"client-{i:03d}" for i in range(10)]
SAMPLE_JOB = "digits"


def test_example_file_in_compose_is_current() -> None:
    doc = json.loads((COMPOSE / "definitions.json").read_text())
    expected = build_definitions(
        [BrokerUser(c, None) for c in SAMPLE_CLIENTS],
        [BrokerUser(f"qflare-{r}", None) for r in ROLES],
        vhost="qflare",
        jobs={c: {SAMPLE_JOB} for c in SAMPLE_CLIENTS},
    )
    assert doc == expected, "regenerate it with the command above"
    assert not any(q["name"].startswith(("client.", "ingest")) for q in doc["queues"])


def test_compose_file_runs_a_service_per_role_with_its_own_broker_user() -> None:
    import yaml

    doc = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    services = doc["services"]
    replicas = {
        name: services[name]["deploy"]["replicas"]
        for name in ("ingest", "detector", "aggregator", "accountant", "alerting")
    }
    assert replicas["ingest"] >= 2 and replicas["alerting"] >= 1
    assert all(replicas[n] == 1 for n in ("detector", "aggregator", "accountant"))
    for name in replicas:
        command = " ".join(services[name]["command"])
        assert f"qflare serve {name}" in command
        assert (
            f"amqp://qflare-{name}:" in command
            and f"/pki/services/{name}/broker_password" in command
        )
    assert (
        "load_definitions = /etc/qflare-broker/definitions.json"
        in (COMPOSE / "rabbitmq.conf").read_text()
    )
    assert all(not v.startswith("pki:") for v in services["rabbitmq"]["volumes"]), (
        "the broker sees no keys"
    )
    provision = services["provision"]
    assert "qflare broker-definitions --kit /pki" in " ".join(provision["command"])
    # the definitions take the participants' jobs from the configuration ($QFLARE_CONFIG)
    assert any(v.endswith(":/etc/qflare/qflare.toml:ro") for v in provision["volumes"])
    assert "client." not in (COMPOSE / "docker-compose.yml").read_text()


def test_kit_command_writes_passwords_beside_each_identity(tmp_path: Path) -> None:
    from qflare.commands.broker import definitions_for_kit
    from qflare.crypto import provision

    provision(tmp_path, clients=2)
    doc = definitions_for_kit(tmp_path, vhost="qflare", prefix="", example=False)
    pw = tmp_path / "clients" / "client-000" / "broker_password"
    assert pw.exists() and oct(pw.stat().st_mode & 0o777) == "0o600"
    users = {u["name"]: u for u in doc["users"]}
    assert set(users) >= {"client-000", "client-001", "qflare-ingest", "qflare-aggregator"}
    assert all(u["password_hash"] for u in users.values())
    # a second run keeps the passwords (so running services keep working)
    first = pw.read_text()
    again = definitions_for_kit(tmp_path, vhost="qflare", prefix="", example=False)
    assert pw.read_text() == first and len(again["users"]) == len(doc["users"])


def test_compose_config_file_loads() -> None:
    from qflare.runtime import load_settings

    settings = load_settings(
        COMPOSE / "qflare.toml", env={"QFLARE_BROKER": "amqp://u:p@rabbitmq:5672/qflare"}
    )
    assert settings.broker.startswith("amqp://") and str(settings.data_dir) == "/data"
    assert settings.broker_declare == "passive"  # the roles' users configure no exchange
    assert settings.services.ingest.norm_bound is None  # max_update_norm = 0: finiteness only


# -- the whole matrix: every user, every operation on every resource ---------------------------
#: Every operation the matrix tries, as each user. Exchanges: publish (write; the participant's
#: topic permission decides per routing key), declare and delete (configure; a delete is
#: ``if_unused`` on an exchange kept in use, so a permitted one fails PRECONDITION_FAILED
#: instead of deleting it). Queues and streams: read (consume), declare and delete
#: (configure; a permitted delete is undone at once), bind a queue or stream to an exchange
#: (write on the queue, read on the exchange). ``<role>.own`` is a queue of each role's own
#: name space (``console.own`` the operator's), made by the test; ``<role>.fresh`` one that
#: does not exist yet. "a" takes part in job j1 only.
X_KEYS = {C: "update.j1", E: "round.opened.j1", B: "j1.round.opened", A: "critical.x.j1"}
D = topology.DEAD
X_KEYS[D] = "update.j1"
PROBE_OWNERS = ("ingest", "detector", "aggregator", "accountant", "alerting", "console")
STREAMS = [f"{k}.{j}" for j in ("j1", "j2") for k in ("updates", "models", "broadcast")]
USERS = ("a", "ingest", "detector", "aggregator", "accountant", "alerting", "operator")


def _universe() -> list[Op]:
    ops: list[Op] = [("publish", x, key) for x, key in X_KEYS.items()]
    ops += [("publish", C, "update.j2"), ("publish", "", "updates.j1")]
    ops += [("xdeclare", x) for x in X_KEYS] + [("xdelete", x) for x in X_KEYS]
    queues = [*STREAMS, "alerting", "alerting.dead", *(f"{o}.own" for o in PROBE_OWNERS)]
    ops += [("read", q) for q in queues]
    ops += [("declare", s) for s in STREAMS[:3]]
    ops += [("queue", f"{o}.fresh") for o in PROBE_OWNERS] + [("queue", "client.a")]
    ops += [("delete", s) for s in STREAMS[:3]] + [("delete", f"{o}.own") for o in PROBE_OWNERS]
    ops += [("bind", "updates.j1", C, "update.#"), ("bind", "models.j1", B, "#")]
    return ops


def _own(probe: str, *exchanges: str) -> set[Op]:
    """What a service role may do in its own name space: read, declare (a new queue), delete
    and bind ``probe`` from the exchanges it reads."""
    new = probe.replace(".own", ".fresh")
    return {("read", probe), ("queue", new), ("delete", probe)} | {
        ("bind", probe, x, "#") for x in exchanges
    }


#: No role declares or deletes an exchange: services run passive (the file creates the
#: exchanges). Only ingest declares a queue that dead-letters (its transient round queue;
#: RabbitMQ checks write on qflare.dead at that declaration), so only ingest may publish there.
_DEAD = {("publish", D, X_KEYS[D])}
_UPDATES = {("read", "updates.j1"), ("read", "updates.j2")}
#: What each user may do; everything else in the universe is refused.
MAY: dict[str, set[Op]] = {
    "a": {("publish", C, "update.j1"), ("read", "broadcast.j1"), ("read", "models.j1")},
    "ingest": {("publish", E, X_KEYS[E])} | _DEAD | _UPDATES | _own("ingest.own", E),
    "detector": {("publish", E, X_KEYS[E])} | _UPDATES | _own("detector.own", E),
    "aggregator": {("publish", E, X_KEYS[E]), ("publish", B, X_KEYS[B])}
    | _UPDATES
    | {("read", "models.j1"), ("read", "models.j2")}
    | {("declare", s) for s in STREAMS[:3]}
    | {("delete", s) for s in STREAMS[:3]}
    | {("bind", "updates.j1", C, "update.#"), ("bind", "models.j1", B, "#")}
    | _own("aggregator.own", E, C, B),
    "accountant": {("publish", E, X_KEYS[E])} | _own("accountant.own", E),
    "alerting": {("publish", E, X_KEYS[E]), ("publish", A, X_KEYS[A])}
    | {("read", "alerting"), ("read", "alerting.dead")}
    | _own("alerting.own", E, D),
    "operator": {("publish", E, X_KEYS[E])} | _own("console.own", E, A),
}


def _matrix_ops(user: str) -> list[Op]:
    ops = _universe()
    probe = "console.own" if user == "operator" else f"{user}.own"
    if user != "a":
        ops += [("bind", probe, x, "#") for x in X_KEYS]
    return ops


@pytest.fixture(scope="module")
def probes(loaded: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The probe queues, and a queue of the test's own bound to every exchange (so an
    exchange delete that is permitted finds it in use)."""

    async def setup() -> None:
        conn = await aio_pika.connect(_admin(loaded), timeout=10)
        try:
            ch = await conn.channel()
            for owner in PROBE_OWNERS:
                await ch.declare_queue(f"{owner}.own", durable=True)
            guard = await ch.declare_queue("guard.in-use", durable=True)
            for x in X_KEYS:
                await guard.bind(x, "#")
        finally:
            await conn.close()

    asyncio.run(setup())
    yield loaded


async def _try(conn: aio_pika.abc.AbstractConnection, op: Op) -> bool:
    """Whether the broker lets the connection's user do ``op``: False for ACCESS_REFUSED; a
    permitted ``if_unused`` delete of an exchange in use answers PRECONDITION_FAILED."""
    from qflare.bus.rabbitmq import stream_arguments

    ch = await conn.channel(publisher_confirms=True)
    try:
        what, target, *_rest = op
        if what == "xdeclare":
            await ch.declare_exchange(target, aio_pika.ExchangeType.TOPIC, durable=True)
        elif what == "xdelete":
            ex = await ch.get_exchange(target, ensure=True)
            try:
                await ex.delete(if_unused=True)
            except aiormq.exceptions.ChannelPreconditionFailed:
                return True
            raise AssertionError(f"exchange {target} was not in use: the test deleted it")
        elif what == "read" and not target.startswith(tuple(STREAM_OF)):
            q = await ch.get_queue(target, ensure=True)
            tag = await q.consume(_ack)
            await q.cancel(tag)
        elif what == "declare":
            kind, job = target.split(".", 1)
            await ch.declare_queue(
                target, durable=True, arguments=stream_arguments(STREAM_OF[kind](job))
            )
        else:
            await _do(ch, op)
        return True
    except aiormq.exceptions.ChannelAccessRefused:
        return False
    finally:
        if not ch.is_closed:
            await ch.close()


async def _restore(info: dict[str, Any], op: Op) -> None:
    """Undo a delete the broker permitted: the stream (as the aggregator declares it) or
    the probe queue."""
    target = op[1]
    if target.startswith(tuple(STREAM_OF)):
        await _declare_jobs(_url(info, "aggregator"), [target.split(".", 1)[1]])
        return
    conn = await aio_pika.connect(_admin(info), timeout=10)
    try:
        await (await conn.channel()).declare_queue(target, durable=True)
    finally:
        await conn.close()


@pytest.mark.parametrize("user", USERS, ids=lambda u: "participant" if u == "a" else u)
def test_each_user_is_refused_everything_its_role_does_not_need(
    probes: dict[str, Any], user: str
) -> None:
    """As ``user``, every operation of the matrix (about 60 on 5 exchanges, the default
    exchange, 6 streams of two jobs and 8 queues): exactly the ones in ``MAY[user]`` are
    permitted. Each mismatch is listed."""
    ops = _matrix_ops(user)
    assert MAY[user] <= set(ops), sorted(MAY[user] - set(ops))

    async def run() -> list[str]:
        wrong: list[str] = []
        conn = await aio_pika.connect(_url(probes, user), timeout=10)
        try:
            for op in ops:
                allowed = await _try(conn, op)
                if allowed and op[0] == "delete":
                    await _restore(probes, op)
                if allowed is not (op in MAY[user]):
                    what = " ".join(part or "''" for part in op)
                    wrong.append(f"{what}: {'permitted' if allowed else 'refused'}")
        finally:
            await conn.close()
        return wrong

    assert asyncio.run(run()) == []
