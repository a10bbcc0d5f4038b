"""Revoking a selected participant mid-job, over the real RabbitMQ with its management API.

The federation, the participants' broker users and the services are this test's own: a
fresh ``qflare provision``, its clients' users from ``build_definitions`` (as ``qflare
broker-definitions`` writes them) imported into a vhost of their own, each participant
logging in as its own user (its id, the password in its kit), the five services as ``qflare
serve`` processes (as ``guest``, an administrator of the vhost).

Four participants, all selected each round (q = 1, DP on), deadline 30 s. Once round 1's
model is published, ``qflare revoke <client> --management-url ...`` runs while the revoked
client's round-2 update is held back. Then:

* the aggregator re-reads the revocation list and stops waiting for the client: round 2
  closes with the other three, rounds 3 and 4 select only them, and every later round takes
  a few seconds, not its 30 s deadline; their DP denominator is q*N of N = 3, the
  population sampled from (the aggregator's log of each opened round);
* the client's broker user is deleted and its connection closed (none left in the
  management API), and a new login as it is refused ACCESS_REFUSED;
* the job completes its four rounds, and the others get the final model.

The vhost and every user are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import aiormq
import pytest
from e2e_harness import (
    SERVICE_NAMES,
    Cluster,
    NumpyParticipant,
    Recorder,
    config_text,
    require_broker,
    require_management,
    write_initial_model,
)

from qflare.bus import connect_bus
from qflare.bus.management import Management, ManagementError
from qflare.client import Kit
from qflare.commands.broker import BrokerUser, build_definitions, client_user
from qflare.crypto import Federation, provision

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.timeout(300)]

MANAGEMENT = os.environ.get("QFLARE_TEST_MANAGEMENT", "http://guest:guest@127.0.0.1:15672/")
HOST = "127.0.0.1:5672"
ROUNDS = 4
DEADLINE_S = 30.0
#: What a round after the revocation may take: well under its deadline (a quiet round of
#: this job takes well under a second; round 2 also waits for `qflare revoke` to finish).
LATER_ROUND_MAX_S = 10.0


def job(root: Path, job_id: str, participants: list[str]) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "rounds": ROUNDS,
        "participants": participants,
        "rule": "mean",
        "sample_rate": 1.0,
        "noise_multiplier": 0.8,
        "clip": 2.0,
        "delta": 1e-5,
        "epsilon_budget": 1000.0,
        "min_updates": 2,
        "deadline_s": DEADLINE_S,
        "seed": 7,
        "initial_model": str(write_initial_model(root / "model0.safetensors")),
    }


async def _import(api: Management, doc: dict[str, Any], user: str, url: str) -> None:
    """Load the definitions and wait until ``user`` can log in with them."""
    await asyncio.to_thread(api.request, "POST", "/api/definitions", doc)
    end = time.monotonic() + 30
    while True:
        try:
            conn = await aio_pika.connect(url, timeout=5)
            await conn.close()
            return
        except aiormq.exceptions.AMQPConnectionError:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


async def test_a_revoked_participant_is_not_waited_for_and_loses_its_broker_login(
    tmp_path: Path, amqp_url: str
) -> None:
    require_broker(amqp_url)
    api = Management.from_url(MANAGEMENT)
    require_management(api)
    tag = uuid.uuid4().hex[:8]
    vhost = f"qflare-revoke-{tag}"
    job_id = f"rv-{tag}"
    fed = Federation.at(provision(tmp_path / "pki", clients=4, client_prefix=f"rv{tag}").root)
    ids = sorted(fed.clients)
    revoked = ids[2]
    passwords = {cid: uuid.uuid4().hex for cid in ids}
    for cid in ids:  # where `qflare broker-definitions --kit` keeps each client's password
        path = fed.clients[cid] / "broker_password"
        path.write_text(passwords[cid] + "\n")
        path.chmod(0o600)
    doc = build_definitions(
        [BrokerUser(client_user(cid), passwords[cid]) for cid in ids],
        vhost=vhost,
        jobs={cid: {job_id} for cid in ids},
    )
    doc["permissions"].append(
        {"user": "guest", "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
    )
    services_url = f"amqp://guest:guest@{HOST}/{quote(vhost, safe='')}"
    clients_url = f"amqp://{HOST}/{quote(vhost, safe='')}"  # each kit fills in its login

    def login(cid: str) -> str:
        return f"amqp://{cid}:{passwords[cid]}@{HOST}/{quote(vhost, safe='')}"

    root = tmp_path / "run"
    root.mkdir()
    config = root / "qflare.toml"
    config.write_text(config_text(job(root, job_id, ids), {"aggregator": {"tick_s": 0.1}}))
    cluster = Cluster(
        root,
        {
            "QFLARE_BROKER": services_url,
            "QFLARE_PREFIX": "",
            "QFLARE_DATA_DIR": str(root / "state"),
            "QFLARE_PKI_DIR": str(fed.root),
            "QFLARE_CONFIG": str(config),
            "QFLARE_LOG_LEVEL": "INFO",
        },
    )
    gate = threading.Event()  # holds the revoked client's round-2 update until it is revoked
    participants = {
        cid: NumpyParticipant(
            Kit.load(fed.clients[cid]),
            gate=gate if cid == revoked else None,
            gate_round=2,
            broker=clients_url,
            prefix="",
            jobs=[job_id],
        )
        for cid in ids
    }
    bus = None
    revocation: dict[str, Any] = {}
    try:
        await _import(api, doc, ids[0], login(ids[0]))
        bus = await connect_bus(services_url)
        recorder = Recorder(fed, job_id)
        await recorder.start(bus, f"rv{tag}")

        async def revoke() -> None:
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "qflare",
                    "revoke",
                    revoked,
                    "--pki-dir",
                    str(fed.root),
                    "--management-url",
                    MANAGEMENT,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    env={k: v for k, v in os.environ.items() if not k.startswith("QFLARE_")},
                )
                out, _ = await proc.communicate()
                revocation.update(rc=proc.returncode, out=out.decode(), at=time.monotonic())
            finally:
                gate.set()

        def on_event(kind: str, round_no: int, _body: Any) -> None:
            if kind == "model.published" and round_no == 1 and "task" not in revocation:
                revocation["task"] = asyncio.get_running_loop().create_task(revoke())

        recorder.hooks.append(on_event)
        for p in participants.values():
            await p.start()
        for name in SERVICE_NAMES:
            cluster.start(name)
            await cluster.ready(name)

        await recorder.until(lambda: "rc" in revocation, 120, "qflare revoke to finish")
        assert revocation["rc"] == 0, revocation["out"]
        told = revocation["out"].splitlines()[-1]
        assert told.startswith(f"broker: user {revoked} deleted, "), revocation["out"]
        assert int(told.split(", ")[1].split()[0]) >= 1, told  # its open connection(s)
        # the broker: no connection of the revoked user is left (the management API's list
        # lags the broker by its statistics interval, 5 s), and it cannot log in again
        end = time.monotonic() + 15
        while await asyncio.to_thread(api.connections_of, revoked):
            assert time.monotonic() < end, "the revoked client's connection is still open"
            await asyncio.sleep(0.5)
        with pytest.raises(aiormq.exceptions.ProbableAuthenticationError, match="ACCESS_REFUSED"):
            await aio_pika.connect(login(revoked), timeout=5)
        # ... while the others still can
        conn = await aio_pika.connect(login(ids[0]), timeout=5)
        await conn.close()
        # the revoked participant's SDK is told by its own reconnect: the job ends for it
        # as access_refused, instead of a login retried every second forever
        await recorder.until(
            lambda: job_id in participants[revoked].ended, 30, "the revoked SDK to give up"
        )
        assert participants[revoked].ended[job_id] == "access_refused"
        assert "ACCESS_REFUSED" in (participants[revoked].stats.last_error or "")

        await recorder.until(lambda: bool(recorder.of("job.ended")), 120, "job.ended")
        assert recorder.of("job.ended")[-1][1].reason == "completed"
        others = [cid for cid in ids if cid != revoked]
        await recorder.until(
            lambda: all(job_id in participants[c].ended for c in others),
            30,
            "the other participants see job.ended",
        )
        assert all(participants[c].latest_model(job_id)[0] == ROUNDS for c in others)  # type: ignore[index]
    finally:
        gate.set()
        for p in participants.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.stop(), 15)
        codes = cluster.stop_all()
        if bus is not None:
            await bus.close()
        with contextlib.suppress(ManagementError, LookupError):
            await asyncio.to_thread(api.request, "DELETE", f"/api/vhosts/{quote(vhost, safe='')}")
        for cid in ids:
            await asyncio.to_thread(api.delete_user, cid)
    assert all(code == 0 for code in codes.values()), codes

    opened: dict[int, tuple[float, Any]] = {}  # the first round.opened (then re-announced)
    closed: dict[int, tuple[float, Any]] = {}
    for t, k, r, b in recorder.events:
        if k in ("round.opened", "round.closed"):
            (opened if k == "round.opened" else closed).setdefault(r, (t, b))
    assert set(opened[1][1].participants) == set(ids)
    # round 2 was open when the revocation came: it closed without the revoked client
    assert revoked in opened[2][1].participants
    assert revoked not in {u.client for u in closed[2][1].updates}
    for r in range(2, ROUNDS + 1):
        took = closed[r][0] - opened[r][0]
        assert took < LATER_ROUND_MAX_S, f"round {r} took {took:.1f}s (deadline {DEADLINE_S}s)"
        if r > 2:
            assert revoked not in opened[r][1].participants
            assert len(closed[r][1].updates) == 3
    # every round after the revocation sampled from the three left (the DP denominator q*N)
    logged = {
        rec["round"]: rec
        for rec in cluster.logs("aggregator")
        if rec.get("event") == "round.opened" and "population" in rec
    }
    assert logged[1]["population"] == 4
    assert all(logged[r]["population"] == 3 for r in range(3, ROUNDS + 1))
    print(
        f"revocation e2e: round 1 (before) took {closed[1][0] - opened[1][0]:.2f}s, rounds "
        f"2-{ROUNDS} took "
        + ", ".join(f"{closed[r][0] - opened[r][0]:.2f}s" for r in range(2, ROUNDS + 1))
        + f" (deadline {DEADLINE_S:.0f}s)"
    )
