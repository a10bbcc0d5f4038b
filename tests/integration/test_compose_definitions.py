"""The RabbitMQ definitions file, loaded into a throwaway vhost of the real broker.

Shows the broker half of the trust model (docs/architecture.md): a client user can publish only to ``qflare.client``
(with ``update.*`` keys) and read only its own broadcast queue; a service user cannot publish
where its role does not. Needs ``rabbitmqctl`` with rights on the local node (root here).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import aiormq
import pytest

from qflare.bus import topology
from qflare.commands.broker import BrokerUser, build_definitions, client_queue, rabbit_password_hash

pytestmark = [pytest.mark.rabbitmq]

HOST = "127.0.0.1:5672"


def _ctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, input=stdin
    )


@pytest.fixture(scope="module")
def loaded() -> Iterator[dict]:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed")
    from qflare.crypto.testing import make_federation

    tag = uuid.uuid4().hex[:8]
    vhost = f"qflare-test-{tag}"
    # a real client identity whose id is its broker user, for the SDK test
    fed = make_federation(1, services=("aggregator",), client_prefix=f"cp{tag}")
    names = {
        "a": f"ca{tag}",
        "b": f"cb{tag}",
        "ingest": f"qflare-ingest-{tag}",
        "p": f"cp{tag}-000",
    }
    pw = {k: uuid.uuid4().hex for k in names}
    doc = build_definitions(
        [
            BrokerUser(names["a"], pw["a"]),
            BrokerUser(names["b"], pw["b"]),
            BrokerUser(names["p"], pw["p"]),
        ],
        [],
        vhost=vhost,  # queues: the services' own QUEUES
    )
    # a service user under a unique name with the ingest role's permissions
    from qflare.commands.broker import permissions

    doc["users"].append(
        {
            "name": names["ingest"],
            "password_hash": rabbit_password_hash(pw["ingest"]),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": [],
        }
    )
    doc["permissions"].append(permissions("ingest", names["ingest"], vhost))
    # the test itself plays operator through guest
    doc["permissions"].append(
        {"user": "guest", "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
    )
    # Debian's rabbitmqctl runs as the rabbitmq user: the file must be readable by it
    # (pytest's tmp_path is 0700), and this rabbitmqctl does not read "-" (stdin).
    fd, name = tempfile.mkstemp(prefix="qflare-defs-", suffix=".json")
    path = Path(name)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
        path.chmod(0o644)
        result = _ctl("import_definitions", str(path))
        assert result.returncode == 0, result.stderr + result.stdout
        asyncio.run(_wait_imported(vhost, names["b"], pw["b"]))
        yield {"vhost": vhost, "names": names, "pw": pw, "doc": doc, "fed": fed}
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


async def _wait_imported(vhost: str, user: str, password: str, timeout: float = 30.0) -> None:
    # import_definitions returns before the import finished ("asynchronous" in 3.10): wait
    # until the last user can log in and see its queue (over AMQP: cheaper than rabbitmqctl)
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await aio_pika.connect(f"amqp://{user}:{password}@{HOST}/{vhost}", timeout=5)
            try:
                ch = await conn.channel()
                await ch.get_queue(f"client.{user}", ensure=True)
                return
            finally:
                await conn.close()
        except Exception:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"definitions for {vhost} not imported within {timeout}s"
                ) from None
            await asyncio.sleep(0.3)


def _url(loaded: dict, who: str) -> str:
    return f"amqp://{loaded['names'][who]}:{loaded['pw'][who]}@{HOST}/{loaded['vhost']}"


async def _publish(conn: aio_pika.abc.AbstractConnection, exchange: str, key: str) -> None:
    ch = await conn.channel(publisher_confirms=True)
    ex = await ch.get_exchange(exchange, ensure=True)  # passive declare: no configure right needed
    await ex.publish(aio_pika.Message(b"x"), key, timeout=10)
    await ch.close()


async def _read(
    conn: aio_pika.abc.AbstractConnection, queue: str
) -> aio_pika.abc.AbstractIncomingMessage | None:
    ch = await conn.channel()
    q = await ch.get_queue(queue, ensure=True)
    async with q.iterator(timeout=5) as it:
        async for message in it:
            await message.ack()
            await ch.close()
            return message
    return None


def test_definitions_declare_the_topology(loaded: dict) -> None:
    doc = loaded["doc"]
    assert {e["name"] for e in doc["exchanges"]} == set(topology.EXCHANGES)
    queues = {q["name"]: q for q in doc["queues"]}
    a = loaded["names"]["a"]
    assert queues[f"client.{a}"]["arguments"]["x-queue-type"] == "quorum"
    listed = _ctl("list_queues", "-p", loaded["vhost"], "name", "policy")
    assert f"client.{a}" in listed.stdout and "qflare-client-queues" in listed.stdout


async def test_client_writes_only_to_qflare_client_and_reads_only_its_queue(loaded: dict) -> None:
    a, b = loaded["names"]["a"], loaded["names"]["b"]
    conn = await aio_pika.connect(_url(loaded, "a"), timeout=10)
    try:
        await _publish(conn, topology.CLIENT, "update.j1")  # allowed
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await _publish(conn, topology.EVENTS, "update.accepted.j1")
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await _publish(conn, topology.BROADCAST, "j1.model.published")
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await _publish(
                conn, topology.CLIENT, "round.opened.j1"
            )  # topic permission: update.* only
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await _read(conn, f"client.{b}")
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await _read(conn, "ingest")
        ch = await conn.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await ch.declare_exchange(topology.EVENTS, aio_pika.ExchangeType.TOPIC, durable=True)
    finally:
        await conn.close()

    # the broadcast the aggregator (here: the ingest-role user cannot, see below) would send
    # reaches client a's own queue, which it may read and bind to a job.
    admin = await aio_pika.connect(f"amqp://guest:guest@{HOST}/{loaded['vhost']}", timeout=10)
    try:
        await _publish(admin, topology.BROADCAST, "j1.round.opened")
    finally:
        await admin.close()
    conn = await aio_pika.connect(_url(loaded, "a"), timeout=10)
    try:
        message = await _read(conn, f"client.{a}")
        assert message is not None and message.routing_key == "j1.round.opened"
        ch = await conn.channel()
        spec = client_queue(a, "j2.#")
        from qflare.bus.rabbitmq import queue_arguments

        q = await ch.declare_queue(spec.name, durable=True, arguments=queue_arguments(spec, ""))
        await q.bind(topology.BROADCAST, "j2.#")  # binding its own queue is allowed
        await ch.close()
    finally:
        await conn.close()


async def test_ingest_role_publishes_events_but_not_broadcasts(loaded: dict) -> None:
    conn = await aio_pika.connect(_url(loaded, "ingest"), timeout=10)
    try:
        await _publish(conn, topology.EVENTS, "update.accepted.j1")
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await _publish(conn, topology.BROADCAST, "j1.model.published")
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await _publish(conn, topology.ALERTS, "critical.x.j1")
    finally:
        await conn.close()


def test_wrong_password_cannot_log_in(loaded: dict) -> None:
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


def test_example_file_in_compose_is_current() -> None:
    path = Path(__file__).resolve().parents[2] / "compose" / "definitions.json"
    doc = json.loads(path.read_text())
    assert {e["name"] for e in doc["exchanges"]} == set(topology.EXCHANGES)
    clients = [p for p in doc["permissions"] if p["user"].startswith("client-")]
    assert clients and all(
        p["read"].endswith(re.escape(f"client.{p['user']}") + ")$") for p in clients
    )
    assert {q["name"] for q in doc["queues"]} >= {
        "ingest",
        "alerting",
        "alerting.dead",
        "client.client-000",
    }
    # ingest's round queues are transient: no expiry policy, nothing pre-declared
    assert "qflare-ingest-rounds" not in {p["name"] for p in doc["policies"]}
    assert not any(q["name"].startswith("ingest.rounds.") for q in doc["queues"])


def test_compose_file_runs_a_service_per_role_with_its_own_broker_user() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2] / "compose"
    doc = yaml.safe_load((root / "docker-compose.yml").read_text())
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
        in (root / "rabbitmq.conf").read_text()
    )
    assert all(not v.startswith("pki:") for v in services["rabbitmq"]["volumes"]), (
        "the broker sees no keys"
    )
    assert "qflare broker-definitions --kit /pki" in " ".join(services["provision"]["command"])


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


async def test_services_declare_their_queues_against_the_file_without_conflict(
    loaded: dict,
) -> None:
    # a re-declaration with other arguments fails (PRECONDITION_FAILED -> TopologyError), so
    # this shows the file and the services agree on every queue the file declares
    from qflare.bus import connect_bus
    from qflare.commands.broker import service_queues
    from qflare.services.alerting.service import ALERTS_IN, DEAD_IN
    from qflare.services.ingest.service import UPDATES

    specs = service_queues()
    assert {s.name for s in specs} >= {UPDATES.name, ALERTS_IN.name, DEAD_IN.name}
    declared = {q["name"] for q in loaded["doc"]["queues"]}
    bus = await connect_bus(f"amqp://guest:guest@{HOST}/{loaded['vhost']}", connect_timeout=5)
    try:
        for spec in [*specs, client_queue(loaded["names"]["a"], "j1.#")]:
            assert spec.name in declared
            sub = await bus.consume(spec, _noop)
            await sub.cancel()
    finally:
        await bus.close()


async def test_ingest_replica_declares_its_transient_round_queue_as_its_own_user(
    loaded: dict,
) -> None:
    from qflare.bus import TopologyError, connect_bus
    from qflare.services.ingest.service import rounds_queue

    spec = rounds_queue("r-test")
    bus = await connect_bus(_url(loaded, "ingest"), connect_timeout=5)
    try:
        sub = await bus.consume(spec, _noop)
        other = await connect_bus(_url(loaded, "ingest"), connect_timeout=5)
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


async def test_participant_connects_through_the_bus_as_its_restricted_user(loaded: dict) -> None:
    from qflare.bus import AccessRefused, Delivery, Outcome, QueueSpec, connect_bus

    a = loaded["names"]["a"]
    # full declaration needs configure on the exchanges, which a client user lacks
    with pytest.raises(AccessRefused) as info:
        await connect_bus(_url(loaded, "a"), connect_timeout=5)
    assert info.value.reason == "ACCESS_REFUSED" and "passive" in str(info.value)

    got: asyncio.Queue[Delivery] = asyncio.Queue()

    async def keep(d: Delivery) -> Outcome:
        await got.put(d)
        return Outcome.ACK

    bus = await connect_bus(_url(loaded, "a"), connect_timeout=5, declare="passive")
    admin = await connect_bus(f"amqp://guest:guest@{HOST}/{loaded['vhost']}", connect_timeout=5)
    try:
        # the queue the file created, bound to one job as the SDK does
        await bus.consume(QueueSpec(f"client.{a}", bindings=((topology.BROADCAST, "j7.#"),)), keep)
        assert await admin.publish(topology.BROADCAST, "j7.round.opened", b"broadcast") is True
        d = await asyncio.wait_for(got.get(), 10)
        assert (d.body, d.exchange, d.routing_key) == (
            b"broadcast",
            topology.BROADCAST,
            "j7.round.opened",
        )

        with pytest.raises(AccessRefused) as info:
            await bus.publish(topology.EVENTS, "update.accepted.j7", b"forged")
        assert info.value.reason == "ACCESS_REFUSED"
        with pytest.raises(AccessRefused):  # topic permission: update.<job> only
            await bus.publish(topology.CLIENT, "round.opened.j7", b"forged")
        # the refusals closed a channel, not the bus: its own kind of message still goes
        seen: asyncio.Queue[Delivery] = asyncio.Queue()

        async def keep_update(d: Delivery) -> Outcome:
            await seen.put(d)
            return Outcome.ACK

        await admin.consume(
            QueueSpec("", bindings=((topology.CLIENT, "update.*"),), transient=True), keep_update
        )
        assert await bus.publish(topology.CLIENT, "update.j7", b"delta") is True
        assert (await asyncio.wait_for(seen.get(), 10)).body == b"delta"
        with pytest.raises(AccessRefused):  # another client's queue
            await bus.consume(QueueSpec(f"client.{loaded['names']['b']}"), keep)
    finally:
        await bus.close()
        await admin.close()


async def test_sdk_declares_passively_as_its_own_broker_user(loaded: dict) -> None:
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
        jobs=["j8"],
        seal=False,
    )
    await p.start()  # the kit's credentials are filled in: its own user, so passive
    try:
        assert p.bus is not None and p.bus.passive is True
        admin = await aio_pika.connect(f"amqp://guest:guest@{HOST}/{loaded['vhost']}", timeout=10)
        try:
            await _publish(admin, topology.BROADCAST, "j8.round.opened")  # not an envelope
        finally:
            await admin.close()
        deadline = time.monotonic() + 10
        while p.stats.rejected < 1:  # it arrived, and was refused as garbage
            assert time.monotonic() < deadline, "the broadcast did not reach the participant"
            await asyncio.sleep(0.05)
    finally:
        await p.stop()


async def _noop(_: object) -> object:
    from qflare.bus import Outcome

    return Outcome.ACK


def test_compose_config_file_loads() -> None:
    from qflare.runtime import load_settings
    from qflare.services.ingest.service import IngestOptions

    root = Path(__file__).resolve().parents[2] / "compose"
    settings = load_settings(
        root / "qflare.toml", env={"QFLARE_BROKER": "amqp://u:p@rabbitmq:5672/qflare"}
    )
    assert settings.broker.startswith("amqp://") and str(settings.data_dir) == "/data"
    assert IngestOptions.from_settings(settings.options("ingest"), None).max_update_norm is None
