"""A flood of hostile traffic during a round over the real RabbitMQ (issue 16): 20,000
garbage messages and 1,000 well-formed forgeries, from one connection, into the job's update
stream while round 2 opens and collects. The round takes at most twice its time in a quiet
run of the same seeded job, measured right before in the same test, and the job ends with
the quiet run's model, bit for bit.

What the flood holds (shuffled, seeded):

* garbage: random bytes, truncated envelopes (the first bytes of a real update) and
  msgpack maps that are not envelopes;
* forgeries signed by keys the CA never issued: a second federation's certificates under
  the participants' names, and the participants' real certificates under another key;
* a real participant's (client-009, one of the three Byzantine ones) signed updates for the
  wrong job, for rounds that are not open (the next round among them, on the wrong model:
  it waits for its round, then is refused), and one update of round 1 replayed over and
  over.

A participant's broker user may write only to ``qflare.client`` with the routing key
``update.<job>`` of its jobs (``qflare broker-definitions``); the test checks that this is
every route it may write to, and floods it.

Each participant trains ``TRAIN_S`` a round (on its own machine: a sleep here), so the round
lasts a few seconds and the flood falls into it. It costs about two minutes (two runs of
six service processes) and measures time on a shared machine, so it runs only when asked
locally (QFLARE_FLOOD=1, which also asserts the 2x time bound) and in CI (CI=true: the
model, the judged messages and the printed figures, without the time bound: a timed bound on
a shared 2-core machine is not asserted in the default run; measured here 1.16-1.82x).
The figures it prints are in docs/architecture.md ("Hostile traffic").
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from e2e_harness import (
    BYZANTINE,
    PARTICIPANTS,
    NumpyParticipant,
    RunResult,
    Scenario,
    initial_model,
    require_broker,
    run_scenario,
    write_initial_model,
)
from flood_sender import write_records

from qflare.bus import topology
from qflare.client import Kit
from qflare.commands.broker import client_permissions
from qflare.crypto import Federation, provision
from qflare.messages import encode
from qflare.messages.tensors import model_digest

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        os.environ.get("QFLARE_FLOOD") != "1" and os.environ.get("CI", "").lower() != "true",
        reason="two timed runs of the whole system; opt in with QFLARE_FLOOD=1 (on in CI)",
    ),
]

JOB = "e2e"
FLOOD_ROUND = 2
GARBAGE, FORGERIES = 20_000, 1_000
#: The flooded round may take at most this many times its quiet time.
MAX_RATIO = 2.0
ATTACKER = "client-009"
#: Each participant trains this long per round, on its own machine (a sleep here: it takes
#: no CPU from the services), so the round lasts about this long and the flood falls into it.
TRAIN_S = 3.0
OPTIONS = {"aggregator": {"reopen_interval_s": 1.0}, "ingest": {"shed_report_s": 1.0}}


class TrainingParticipant(NumpyParticipant):
    """A participant whose training takes ``TRAIN_S`` (the servers' CPUs are not used)."""

    def compute_update(self, global_tensors: Any, info: Any) -> Any:
        time.sleep(TRAIN_S)
        return super().compute_update(global_tensors, info)


def participant(kit: Kit, **where: Any) -> NumpyParticipant:
    return TrainingParticipant(kit, byzantine=kit.id in BYZANTINE, **where)


def job(root: Path) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    return {
        "job_id": JOB,
        "rounds": 3,
        "participants": list(PARTICIPANTS),
        "rule": "nnm+multikrum",
        "f": 3,
        "detection": True,
        "noise_multiplier": 1.5,
        "clip": 2.0,
        "delta": 1e-5,
        "epsilon_budget": 100.0,
        "min_updates": 7,
        "deadline_s": 120.0,
        "seed": 20261201,
        "initial_model": str(write_initial_model(root / "model0.safetensors")),
    }


def garbage(rng: np.random.Generator, sample: bytes) -> list[bytes]:
    """Random bytes, truncated envelopes and msgpack maps that are not envelopes."""
    out: list[bytes] = []
    for i in range(GARBAGE):
        kind = i % 3
        if kind == 0:
            out.append(rng.bytes(int(rng.integers(1, 200))))
        elif kind == 1:
            out.append(sample[: int(rng.integers(1, 300))])
        else:
            fields = {
                "kind": "update",
                "job": JOB,
                "round": FLOOD_ROUND,
                "x": rng.bytes(int(rng.integers(0, 64))),
            }
            out.append(msgpack.packb(fields, use_bin_type=True))
    return out


def forgeries(fed: Federation, fake: Federation, rng: np.random.Generator) -> list[bytes]:
    kits = {cid: Kit.load(fed.clients[cid]) for cid in PARTICIPANTS}
    fakes = {cid: Kit.load(fake.clients[cid]) for cid in PARTICIPANTS}
    seal = kits[ATTACKER].readers
    zeros = {k: np.zeros_like(v) for k, v in initial_model().items()}

    def update(kit: Kit, *, job: str = JOB, round_: int = FLOOD_ROUND) -> bytes:
        body = {"base_version": round_ - 1, "num_samples": 48, "tensors": zeros}
        return encode("update", body, kit.identity, job=job, round=round_, seal_to=seal)

    out: list[bytes] = []
    for i in range(400):  # a certificate of another CA, under a participant's name
        out.append(update(fakes[PARTICIPANTS[i % len(PARTICIPANTS)]]))
    for i in range(200):  # a participant's real certificate, signed by another key
        cid = PARTICIPANTS[i % len(PARTICIPANTS)]
        fields = msgpack.unpackb(update(fakes[cid]), raw=False)
        fields["cert"] = kits[cid].identity.cert.to_bytes()
        out.append(msgpack.packb(fields, use_bin_type=True))
    attacker = kits[ATTACKER]
    for i in range(150):  # the attacker's own key, another job
        out.append(update(attacker, job=f"other{i % 3}"))
    for i in range(150):  # the attacker's own key, rounds that are not open
        out.append(update(attacker, round_=(FLOOD_ROUND + 2, 50, 1000)[i % 3]))
    for _ in range(50):  # ... and the next round, on the wrong model (it waits for the round)
        body = {"base_version": 0, "num_samples": 48, "tensors": zeros}
        next_round = FLOOD_ROUND + 1
        out.append(
            encode("update", body, attacker.identity, job=JOB, round=next_round, seal_to=seal)
        )
    replayed = update(attacker, round_=FLOOD_ROUND - 1)
    out += [replayed] * 50  # one round-1 update, replayed
    assert len(out) == FORGERIES
    return out


def participant_routes() -> list[tuple[str, str]]:
    """Every (exchange, routing key) a participant of ``JOB`` may publish to, from the
    permissions ``qflare broker-definitions`` gives it (the default exchange is checked by
    RabbitMQ under the name ``amq.default``)."""
    perms, topic = client_permissions(ATTACKER, [JOB], "v")
    writable = [
        e
        for e in (*topology.EXCHANGES, "amq.default")
        if re.search(perms["write"], e) and not re.search(perms["configure"], e)
    ]
    assert writable == [topology.CLIENT], writable
    assert topic["exchange"] == topology.CLIENT
    keys = [f"update.{JOB}", f"update.{JOB}x", "update.other", f"{JOB}.update", "#"]
    allowed = [k for k in keys if re.search(topic["write"], k)]
    assert allowed == [f"update.{JOB}"], allowed
    return [(topology.CLIENT, k) for k in allowed]


class Flood:
    """The sender process: connected and loaded before the run, released by ``go``."""

    def __init__(self, root: Path, amqp: str, prefix: str, messages: list[bytes]) -> None:
        routes = participant_routes()
        self.count = len(messages)
        self.bytes = sum(len(m) for m in messages)
        path = root / "flood.bin"
        write_records(path, [(routes[i % len(routes)][1], m) for i, m in enumerate(messages)])
        (exchange,) = {e for e, _k in routes}
        sender = str(Path(__file__).with_name("flood_sender.py"))
        self.proc = subprocess.Popen(
            [sys.executable, sender, amqp, prefix + exchange, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.released = False
        self.figures: dict[str, float] = {}

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.released = True
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait(self) -> dict[str, float]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert self.proc.wait(60) == 0 and line, "the flood sender failed"
        self.figures = json.loads(line)
        return self.figures


def _run(
    fed: Federation, root: Path, amqp: str, scenario: Scenario, prefix: str | None = None
) -> RunResult:
    prefix = prefix or f"e2e-{uuid.uuid4().hex[:8]}-"
    return asyncio.run(
        run_scenario(
            fed,
            root,
            amqp,
            prefix,
            job(root),
            PARTICIPANTS,
            BYZANTINE,
            scenario,
            OPTIONS,
        )
    )


def round_times(run: RunResult) -> dict[str, float]:
    """When the flooded round opened and its model was published (the test process's
    monotonic clock), and when the round before it closed."""
    first: dict[tuple[str, int], float] = {}
    for t, kind, round_no, body in run.recorder.events:
        key = (kind, body.version if kind == "model.published" else round_no)
        first.setdefault(key, t)
    return {
        "closed_before": first[("round.closed", FLOOD_ROUND - 1)],
        "opened": first[("round.opened", FLOOD_ROUND)],
        "published": first[("model.published", FLOOD_ROUND)],
    }


def test_a_flood_during_a_round_costs_at_most_twice_its_quiet_time(
    e2e_federation: Federation, tmp_path: Path
) -> None:
    amqp = os.environ.get("QFLARE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
    require_broker(amqp)
    fake = Federation.at(provision(tmp_path / "fake-ca", clients=len(PARTICIPANTS)).root)
    rng = np.random.default_rng(16)
    sample = forgeries(e2e_federation, fake, rng)
    messages = garbage(rng, sample[0]) + sample
    order = rng.permutation(len(messages))
    messages = [messages[i] for i in order]

    quiet = _run(
        e2e_federation, tmp_path / "quiet", amqp, Scenario("quiet", participant=participant)
    )
    quiet_t = round_times(quiet)

    prefix = f"e2e-{uuid.uuid4().hex[:8]}-"
    flood = Flood(tmp_path, amqp, prefix, messages)

    def release(kind: str, round_no: int, _body: Any) -> None:
        if kind == "round.opened" and round_no == FLOOD_ROUND and not flood.released:
            flood.go()

    async def sent_all() -> None:
        # the job may end before the last of the flood is sent: the run (and the exchanges
        # it deletes at the end) waits for the sender
        await asyncio.to_thread(flood.wait)

    scenario = Scenario(
        "flood",
        participant=participant,
        hooks=(release,),
        before_stop=sent_all,
        timeout=300,
    )
    try:
        flooded = _run(e2e_federation, tmp_path / "flood", amqp, scenario, prefix)
    finally:
        if flood.proc.poll() is None:
            flood.proc.kill()
            flood.proc.wait(10)
    sent = flood.figures
    flood_t = round_times(flooded)

    quiet_s = quiet_t["published"] - quiet_t["opened"]
    flood_s = flood_t["published"] - flood_t["opened"]
    send_s = sent["end"] - sent["start"]
    # what ingest did with the flood: each message reported (a signed update.rejected and
    # an alert, within a sender's budget) or shed (counted, summarised each second)
    log = flooded.cluster.logs("ingest-a")
    summaries = [r for r in log if r.get("event") == "updates.shed"]
    shed = sum(r["count"] for r in summaries)
    reported = sum(1 for r in log if r.get("event") == "message.rejected")
    print(
        f"\nflood: {sent['sent']} messages ({flood.bytes / 1e6:.1f} MB) from one connection in "
        f"{send_s:.2f}s ({sent['sent'] / send_s:.0f}/s), from {sent['start'] - flood_t['opened']:.2f}s "
        f"after round {FLOOD_ROUND} opened\n"
        f"round {FLOOD_ROUND} (opened -> model published): quiet {quiet_s:.3f}s, flooded "
        f"{flood_s:.3f}s, ratio {flood_s / quiet_s:.2f} (at most {MAX_RATIO})\n"
        f"ingest: {reported} rejections reported one by one, {shed} shed; shed per second "
        f"(1 s summaries): {[r['per_s'] for r in summaries]}"
    )
    assert quiet.end_reason == flooded.end_reason == "completed"
    # the flood was on while the round was: it started before the round's model was out
    # and went on after the round opened
    assert sent["sent"] == GARBAGE + FORGERIES
    assert sent["start"] < flood_t["published"] and sent["end"] > flood_t["opened"]
    # ingest judged every message of the flood, and reported few of them one by one
    assert reported + shed == GARBAGE + FORGERIES, (reported, shed)
    assert shed >= 0.9 * (GARBAGE + FORGERIES), (reported, shed)
    # the flood changed nothing: the same updates in every round, the same final model
    for name, run in (("quiet", quiet), ("flooded", flooded)):
        closed = {
            r: sorted(u.client for u in b.updates) for r, b in run.recorder.of("round.closed")
        }
        assert closed == {r: sorted(PARTICIPANTS) for r in (1, 2, 3)}, name
    assert flooded.final_version == quiet.final_version == 3
    assert model_digest(flooded.final_model) == model_digest(quiet.final_model)
    # the time bound (issue 16: at most 2x) is asserted where it was asked for; in CI the
    # figures are printed and everything above is checked (docs/architecture.md, "Hostile
    # traffic": 1.16-1.82x on this 2-core machine)
    if os.environ.get("QFLARE_FLOOD") == "1":
        assert flood_s <= MAX_RATIO * quiet_s, (quiet_s, flood_s)
