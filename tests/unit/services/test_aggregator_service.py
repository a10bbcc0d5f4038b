"""The aggregator and detector services together on the embedded bus, driven through the
same bootstrap as production. The test itself plays the clients, ingest and the accountant:
it writes real client updates (signed, sealed for ingest, aggregator and detector) into the
job's update stream, reads them there as ingest would and signs ``update.accepted`` (with the
offset) with ingest's identity, and ``privacy.granted`` with the accountant's."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qflare.bus import Bus, Delivery, Outcome, QueueSpec, connect_bus, topology
from qflare.crypto import Federation, provision
from qflare.messages import encode, open_envelope
from qflare.messages.tensors import model_digest
from qflare.runtime import JobSpec, load_settings, run_in_process

CLIENTS = tuple(f"c-{i:03d}" for i in range(10))
BYZANTINE = {"c-007", "c-008", "c-009"}
C0, C8, C9 = "c-000", "c-008", "c-009"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return provision(tmp_path_factory.mktemp("pki"), clients=10, client_prefix="c")


def initial_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((8, 6)).astype(np.float32), "b": np.zeros(6, np.float32)}


def delta(client: str, round_no: int) -> dict[str, np.ndarray]:
    direction = np.random.default_rng(round_no).standard_normal(54).astype(np.float32)
    seed = int.from_bytes(hashlib.sha256(f"{client}/{round_no}".encode()).digest()[:4], "big")
    noise = 0.2 * np.random.default_rng(seed).standard_normal(54).astype(np.float32)
    flat = (-6.0 * direction) if client in BYZANTINE else (0.1 * direction + 0.02 * noise)
    return {"w": flat[:48].reshape(8, 6), "b": flat[48:]}


@dataclass
class Harness:
    """Plays ingest and the accountant; records what the services publish."""

    fed: Federation
    bus: Bus
    epsilon_per_round: float = 0.5
    budget_rounds: int = 99
    hold_round: int | None = None  # send only half the updates of this round until released
    release: asyncio.Event = field(default_factory=asyncio.Event)
    published: dict[int, bytes] = field(default_factory=dict)
    verdicts: dict[int, tuple[list[str], list[str]]] = field(default_factory=dict)
    alerts: list[tuple[str, str | None, str]] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str = ""
    opened: list[int] = field(default_factory=list)
    dup_round: int | None = None  # in this round, c0's verdict goes out twice, then a 2nd update
    dup_sent: bool = False
    aggregator: Any = None
    play_accountant: bool = True
    send_only: int | None = None  # participants that answer each round (the rest stay silent)
    closed: dict[int, list[str]] = field(default_factory=dict)
    grants: list[tuple[int, float]] = field(default_factory=list)
    requests: list[tuple[int, float, float, str]] = field(default_factory=list)
    coverages: list[str] = field(default_factory=list)  # of privacy.granted, as echoed
    refuse: tuple[str, ...] = ()  # ingest refuses these clients' updates (update.rejected)
    refuse_label: str = "{}"  # how ingest names the client ("{} (unverified)": signature failed)
    refuse_then_send: tuple[str, ...] = ()  # refused first, then a valid update
    broadcast_opened: list[int] = field(default_factory=list)  # round.opened seen by clients
    # the clip norm each round's privacy.request and round.opened named, and what
    # model.published reported (adaptive clipping)
    request_clips: dict[int, float] = field(default_factory=dict)
    opened_clips: dict[int, float] = field(default_factory=dict)
    published_metrics: dict[int, dict[str, float]] = field(default_factory=dict)

    async def start(self) -> None:
        watch = QueueSpec(
            "harness",
            bindings=(
                (topology.EVENTS, "privacy.request.*"),
                (topology.EVENTS, "round.opened.*"),
                (topology.EVENTS, "model.published.*"),
                (topology.EVENTS, "round.verdict.*"),
                (topology.EVENTS, "alert.raised.*"),
                (topology.EVENTS, "job.ended.*"),
                (topology.EVENTS, "privacy.granted.*"),
                (topology.EVENTS, "round.closed.*"),
            ),
        )
        await self.bus.consume(watch, self.on_event, prefetch=64)
        self.streams: set[str] = set()
        await self.bus.consume(
            QueueSpec("harness.broadcast", bindings=((topology.BROADCAST, "#"),)),
            self.on_broadcast,
            prefetch=64,
        )

    async def on_broadcast(self, d: Delivery) -> Outcome:
        env = open_envelope(d.body, self.fed.trust())
        if env.kind == "round.opened":
            self.broadcast_opened.append(env.round)
        return Outcome.ACK

    async def on_event(self, d: Delivery) -> Outcome:
        env = open_envelope(d.body, self.fed.trust())
        if env.kind == "privacy.request":
            self.request_clips.setdefault(env.round, env.body.clip)
        elif env.kind == "round.opened":
            self.opened_clips.setdefault(env.round, env.body.clip_norm)
        elif env.kind == "model.published":
            self.published_metrics.setdefault(env.body.version, dict(env.body.metrics))
        if env.kind == "privacy.request" and self.play_accountant:
            if env.round > self.budget_rounds:
                body = {
                    "reason": "budget",
                    "epsilon_spent": self.epsilon_per_round * self.budget_rounds,
                    "budget": 1.0,
                    "coverage": env.body.coverage,
                }
                await self.send("accountant", "privacy.denied", body, env.job, env.round)
            else:
                body = {
                    "epsilon_round": self.epsilon_per_round,
                    "epsilon_total": self.epsilon_per_round * env.round,
                    "delta": 1e-5,
                    "coverage": env.body.coverage,
                }
                self.requests.append((env.round, env.body.q, env.body.z, env.body.coverage))
                await self.send("accountant", "privacy.granted", body, env.job, env.round)
        elif env.kind == "round.opened" and env.round not in self.opened:
            self.opened.append(env.round)
            if env.job not in self.streams:  # play ingest: check the job's update stream
                self.streams.add(env.job)
                await self.bus.read_stream(
                    topology.update_stream(env.job), self.on_update, offset=env.body.updates_from
                )
            asyncio.get_running_loop().create_task(self.send_updates(env.job, env.round, env.body))
        elif env.kind == "privacy.granted":
            self.grants.append((env.round, env.body.epsilon_total))
            self.coverages.append(env.body.coverage)
        elif env.kind == "model.published":
            self.published[env.body.version] = env.body.digest
        elif env.kind == "round.closed":
            self.closed[env.round] = [u.client for u in env.body.updates]
        elif env.kind == "round.verdict":
            self.verdicts[env.round] = (list(env.body.kept), [f.client for f in env.body.flagged])
        elif env.kind == "alert.raised":
            self.alerts.append((env.body.alert_kind, env.body.client, env.body.reason))
        elif env.kind == "job.ended":
            self.end_reason = env.body.reason
            self.ended.set()
        return Outcome.ACK

    async def send(self, role: str, kind: str, body: dict, job: str, round_no: int) -> None:
        data = encode(kind, body, self.fed.identity(role), job=job, round=round_no)
        await self.bus.publish(topology.EVENTS, f"{kind}.{job}", data)

    async def send_update(
        self, job: str, round_no: int, client: str, version: int, tensors: dict
    ) -> None:
        """The client's update, written into the job's update stream."""
        readers = [self.fed.identity(r).cert for r in ("ingest", "aggregator", "detector")]
        body = {"base_version": version, "num_samples": 10, "tensors": tensors}
        data = encode(
            "update", body, self.fed.identity(client), job=job, round=round_no, seal_to=readers
        )
        await self.bus.publish(topology.CLIENT, f"update.{job}", data)

    async def on_update(self, d: Delivery) -> Outcome:
        """Ingest's part: every update in the stream is accepted, with its offset."""
        env = open_envelope(d.body, self.fed.trust(), kem_key=self.fed.identity("ingest").kem)
        body = {
            "client": env.sender,
            "update_digest": env.body_digest,
            "base_version": env.body.base_version,
            "num_samples": env.body.num_samples,
            "offset": d.offset,
        }
        data = encode(
            "update.accepted", body, self.fed.identity("ingest"), job=env.job, round=env.round
        )
        await self.bus.publish(topology.EVENTS, f"update.accepted.{env.job}", data)
        if env.round == self.dup_round and env.sender == C0 and not self.dup_sent:
            self.dup_sent = True
            asyncio.get_running_loop().create_task(self.send_again(env, data))
        return Outcome.ACK

    async def send_again(self, env: Any, verdict: bytes) -> None:
        # once the first is held: the same verdict again is a redelivery (no effect, no
        # alert); a second, different update of the same client is a duplicate
        while (
            self.aggregator is None
            or await self.aggregator.store.held(env.job, env.round, env.sender) is None
        ):
            await asyncio.sleep(0.01)
        await self.bus.publish(topology.EVENTS, f"update.accepted.{env.job}", verdict)
        other = {k: 2 * v for k, v in env.body.tensors.items()}
        await self.send_update(env.job, env.round, env.sender, env.body.base_version, other)

    async def send_updates(self, job: str, round_no: int, opened) -> None:
        clients = list(opened.participants)[: self.send_only]
        for c in (*self.refuse, *self.refuse_then_send):
            body = {
                "client": self.refuse_label.format(c),
                "reason": "NON_FINITE",
                "detail": "w[0] is inf",
            }
            await self.send("ingest", "update.rejected", body, job, round_no)
        clients = [c for c in clients if c not in self.refuse]
        first, rest = (clients[:5], clients[5:]) if round_no == self.hold_round else (clients, [])
        for c in first:
            await self.send_update(job, round_no, c, opened.model_version, delta(c, round_no))
        if rest:
            await self.release.wait()
            for c in rest:
                await self.send_update(job, round_no, c, opened.model_version, delta(c, round_no))


def job(**kw: object) -> JobSpec:
    base = dict(
        job_id="j1",
        rounds=3,
        participants=CLIENTS,
        rule="median",
        f=3,
        detection=True,
        noise_multiplier=0.5,
        clip=2.0,
        seed=1234,
        deadline_s=30.0,
        min_updates=7,
        epsilon_budget=10.0,
    )
    base.update(kw)
    return JobSpec.model_validate(base)


async def run_job(
    fed: Federation,
    data: Path,
    spec: JobSpec,
    harness_kw: dict | None = None,
    restart_in_round: int | None = None,
    restart: str = "aggregator",
    accountant: bool = False,
    aggregator_options: dict[str, object] | None = None,
) -> tuple[Harness, dict[str, np.ndarray]]:
    bus = await connect_bus(f"memory://agg-{data.name}")
    settings = load_settings(None, env={}, data_dir=str(data))
    if aggregator_options:
        settings = type(settings)(data_dir=data, services={"aggregator": aggregator_options})
    names = ["detector", "aggregator", *(["accountant"] if accountant else [])]
    ids = {n: (fed.identity(n), fed.trust()) for n in names}
    h = Harness(
        fed, bus, hold_round=restart_in_round, play_accountant=not accountant, **(harness_kw or {})
    )
    await h.start()
    async with run_in_process(settings, bus, services=names, identities=ids) as running:
        h.aggregator = running.services["aggregator"]
        await running.submit_job(spec, initial_model())
        if restart_in_round is not None:
            while len(h.opened) < restart_in_round:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # the first half of the round is stored
            await running.restart(restart, identities=ids)
            h.release.set()
        await asyncio.wait_for(h.ended.wait(), 30)
        agg = running.services["aggregator"]
        latest = await agg.store.latest_model(spec.job_id)
        final = await agg.store.load_model(latest)
    await bus.close()
    return h, final


async def test_rounds_flag_byzantine_change_model_and_end(
    federation: Federation, tmp_path: Path
) -> None:
    spec = job()
    h, final = await run_job(federation, tmp_path / "a", spec, {"dup_round": 1})
    assert h.end_reason == "completed"
    assert sorted(h.published) == [1, 2, 3]
    digests = [model_digest(initial_model()), *(h.published[v] for v in (1, 2, 3))]
    assert len(set(digests)) == 4, "the model changes every round"
    assert digests[3] == model_digest(final)
    for r in (1, 2, 3):
        kept, flagged = h.verdicts[r]
        assert set(flagged) == BYZANTINE and set(kept) == set(CLIENTS) - BYZANTINE
    assert [r for k, _c, r in h.alerts if k == "message.rejected"] == ["DUPLICATE"]
    flagged_alerts = {(c, k) for k, c, _ in h.alerts if k == "client.flagged"}
    assert {c for c, _ in flagged_alerts} == BYZANTINE
    # The robust step moved the model towards the honest direction despite the attackers.
    honest_mean = np.mean([delta(c, 1)["w"] for c in CLIENTS if c not in BYZANTINE], axis=0)
    assert np.dot(honest_mean.ravel(), (final["w"] - initial_model()["w"]).ravel()) > 0


async def test_restart_mid_round_gives_the_same_model(
    federation: Federation, tmp_path: Path
) -> None:
    spec = job(rounds=2)
    _, uninterrupted = await run_job(federation, tmp_path / "x", spec)
    h, restarted = await run_job(federation, tmp_path / "y", spec, restart_in_round=2)
    assert h.end_reason == "completed"
    assert all(np.array_equal(uninterrupted[k], restarted[k]) for k in uninterrupted)


async def test_denied_budget_ends_the_job(federation: Federation, tmp_path: Path) -> None:
    h, final = await run_job(federation, tmp_path / "d", job(rounds=5), {"budget_rounds": 2})
    assert h.end_reason == "budget_exhausted"
    assert sorted(h.published) == [1, 2]
    assert any(k == "budget.exhausted" for k, _c, _r in h.alerts)
    assert model_digest(final) == h.published[2]


async def test_the_accountant_stops_the_job_at_the_budget(
    federation: Federation, tmp_path: Path
) -> None:
    # z=1.5, q=1, delta=1e-5: PLD epsilon 2.75, 4.09, 5.17, ... per rounds granted
    spec = job(rounds=6, noise_multiplier=1.5, epsilon_budget=4.5)
    h, final = await run_job(federation, tmp_path / "acc", spec, accountant=True)
    assert h.end_reason == "budget_exhausted"
    rounds = [r for r, _e in h.grants]
    eps = [e for _r, e in h.grants]
    assert rounds == [1, 2] and eps[0] < eps[1] <= 4.5
    assert sorted(h.published) == [1, 2] and model_digest(final) == h.published[2]


async def test_restarting_the_accountant_charges_no_round_twice(
    federation: Federation, tmp_path: Path
) -> None:
    spec = job(rounds=3, noise_multiplier=1.5, epsilon_budget=100.0)
    once, _ = await run_job(federation, tmp_path / "a1", spec, accountant=True)
    twice, _ = await run_job(
        federation, tmp_path / "a2", spec, accountant=True, restart_in_round=2, restart="accountant"
    )
    assert once.end_reason == twice.end_reason == "completed"
    # A restored ledger composes the stored rounds in one go, so epsilon may differ in the
    # last bits; a second charge would add a whole round (about +1.1 here).
    assert sorted(dict(twice.grants)) == [1, 2, 3]
    assert dict(twice.grants) == pytest.approx(dict(once.grants), rel=1e-9)


async def test_deadline_closes_with_min_updates(federation: Federation, tmp_path: Path) -> None:
    spec = job(rounds=1, deadline_s=1.0, min_updates=7, f=2)
    h, _final = await run_job(federation, tmp_path / "dl", spec, {"send_only": 8})
    assert h.end_reason == "completed"
    assert h.closed[1] == list(CLIENTS[:8])  # closed at the deadline with the 8 that came


async def test_too_few_updates_extend_then_abort(federation: Federation, tmp_path: Path) -> None:
    spec = job(rounds=2, deadline_s=0.5, min_updates=7, max_extensions=1)
    h, final = await run_job(federation, tmp_path / "ab", spec, {"send_only": 3})
    assert h.end_reason == "too_few_updates"
    kinds = [k for k, _c, _r in h.alerts]
    assert kinds.count("round.extended") == 1 and "round.aborted" in kinds
    # the extension is broadcast to the clients again, so one that connected late can join
    assert h.broadcast_opened.count(1) == 2
    assert h.published == {} and model_digest(final) == model_digest(initial_model())


async def test_a_request_lost_before_the_accountant_existed_is_sent_again(
    federation: Federation, tmp_path: Path
) -> None:
    """Started before the accountant, the aggregator's first privacy.request is unroutable
    (dropped); its ticker re-sends a request that waits too long, and the job runs."""
    from types import MappingProxyType

    from qflare.runtime import build_service

    bus = await connect_bus("memory://lost")
    settings = load_settings(None, env={}, data_dir=str(tmp_path))
    settings = type(settings)(
        data_dir=tmp_path,
        services=MappingProxyType(
            {"aggregator": MappingProxyType({"reopen_interval_s": 0.3, "tick_s": 0.05})}
        ),
    )
    ids = {
        n: (federation.identity(n), federation.trust())
        for n in ("detector", "aggregator", "accountant")
    }
    spec = job(rounds=1, noise_multiplier=1.5, epsilon_budget=50.0)
    h = Harness(federation, bus, play_accountant=False)
    await h.start()
    async with run_in_process(
        settings, bus, services=["detector", "aggregator"], identities=ids
    ) as running:
        await running.submit_job(spec, initial_model())
        await asyncio.sleep(0.5)  # the first request went nowhere
        assert h.grants == [] and h.opened == []
        accountant = await build_service(
            "accountant",
            settings,
            bus=bus,
            identity=ids["accountant"][0],
            trust=ids["accountant"][1],
        )
        await accountant.start()
        await accountant.submit_job(spec)
        try:
            assert await running.wait_job("j1", timeout=20) == "completed"
        finally:
            await accountant.stop()
    await bus.close()
    assert h.opened == [1] and [r for r, _e in h.grants][:1] == [1]


# -- what the epsilon covers (docs/privacy.md) ------------------------------------------------


async def test_mean_without_detection_is_charged_as_the_clipped_sum(
    federation: Federation, tmp_path: Path
) -> None:
    h, _ = await run_job(federation, tmp_path / "cs", job(rounds=1, rule="mean", detection=False))
    assert h.requests == [(1, 1.0, 0.5, "clipped_sum")] and h.coverages == ["clipped_sum"]


async def test_detection_without_a_bound_is_noise_only(
    federation: Federation, tmp_path: Path
) -> None:
    h, _ = await run_job(federation, tmp_path / "no", job(rounds=1, rule="mean", detection=True))
    assert h.requests == [(1, 1.0, 0.5, "noise_only")] and h.coverages == ["noise_only"]
    _kept, flagged = h.verdicts[1]
    assert set(flagged) == BYZANTINE  # no bound: every flagged update is removed


async def test_a_bound_caps_removals_and_is_charged_at_z_over_2k_plus_1(
    federation: Federation, tmp_path: Path
) -> None:
    """k = 1: the detector flags the three attackers, the aggregator removes only the
    highest-scored one; the real accountant's ledger holds z/(2k+1) = 1.5/3 at q = 1."""
    from qflare.services.accountant.store import LedgerStore

    spec = job(
        rounds=2,
        rule="mean",
        detection=True,
        dp_filter_bound=1,
        noise_multiplier=1.5,
        epsilon_budget=1000.0,
    )
    h, _ = await run_job(federation, tmp_path / "fb", spec, accountant=True)
    assert h.end_reason == "completed" and h.coverages == ["filter_bounded"] * 2
    (ledger_file,) = (tmp_path / "fb").rglob("accountant.sqlite")
    store = await LedgerStore.open(ledger_file)
    try:
        _jobs, decisions = await store.load()
    finally:
        await store.close()
    assert [(d.round, d.q, d.z) for d in decisions] == [
        (1, 1.0, pytest.approx(0.5)),
        (2, 1.0, pytest.approx(0.5)),
    ]
    from qflare.services.aggregator.store import AggregatorStore

    agg = await AggregatorStore.open(ledger_file.parent.parent / "aggregator")
    try:
        for r in (1, 2):
            assert set(h.verdicts[r][1]) == BYZANTINE  # the detector flagged all three
            row = await agg.get_round("j1", r)
            assert row is not None and row.verdict is not None
            assert len(row.verdict["flagged"]) == 1 and set(row.verdict["flagged"]) <= BYZANTINE
            assert len(row.verdict["kept"]) == len(CLIENTS) - 1
    finally:
        await agg.close()


# -- refusals by ingest close a round early ----------------------------------------------------


async def test_refused_clients_count_as_answered(federation: Federation, tmp_path: Path) -> None:
    spec = job(rounds=1, deadline_s=25.0, min_updates=7, f=2)
    t0 = asyncio.get_running_loop().time()
    h, _ = await run_job(federation, tmp_path / "rf", spec, {"refuse": (C8, C9)})
    assert h.end_reason == "completed"
    assert h.closed[1] == list(CLIENTS[:8])  # the refused are not in the round's set
    assert asyncio.get_running_loop().time() - t0 < 10.0, "closed without waiting for the deadline"


async def test_a_refusal_does_not_ban_a_later_valid_update(
    federation: Federation, tmp_path: Path
) -> None:
    spec = job(rounds=1, deadline_s=25.0, min_updates=7, f=2)
    h, _ = await run_job(federation, tmp_path / "rv", spec, {"refuse_then_send": (C0,)})
    assert h.end_reason == "completed" and h.closed[1] == list(CLIENTS)


async def test_a_refusal_of_an_unverified_sender_does_not_count(
    federation: Federation, tmp_path: Path
) -> None:
    """Ingest names a client whose signature failed "<id> (unverified)": anyone can claim
    an id, so such a refusal must not close the round in that client's name. (A refusal
    signed by anyone but ingest is refused by the envelope's sender check.)"""
    spec = job(rounds=1, deadline_s=1.5, min_updates=7, f=2)
    t0 = asyncio.get_running_loop().time()
    h, _ = await run_job(
        federation,
        tmp_path / "rx",
        spec,
        {"send_only": 8, "refuse": (C8, C9), "refuse_label": "{} (unverified)"},
    )
    assert h.end_reason == "completed" and h.closed[1] == list(CLIENTS[:8])
    assert asyncio.get_running_loop().time() - t0 >= 1.5, (
        "an unverified refusal must not close the round"
    )


# -- adaptive clipping (docs/privacy.md, "Adaptive clipping") ---------------------------------


def adaptive_job(**kw: object) -> JobSpec:
    # rule mean without detection: every update enters the count, the three attackers'
    # (norm ~44) above any clip, the honest ones (~0.75) below it
    settings: dict[str, object] = dict(
        rounds=4,
        rule="mean",
        detection=False,
        noise_multiplier=0.5,
        adaptive_clip=True,
        clip_learning_rate=0.5,
        epsilon_budget=100.0,
    )
    return job(**{**settings, **kw})


async def test_adaptive_clipping_moves_the_clip_round_to_round_and_charges_z(
    federation: Federation, tmp_path: Path
) -> None:
    from qflare.commands.admin import status_data
    from qflare.privacy import epsilon
    from qflare.privacy.policy import adaptive_of, charge_of, sum_noise_multiplier

    spec = adaptive_job()
    h, _final = await run_job(federation, tmp_path / "ad", spec, accountant=True)
    assert h.end_reason == "completed" and sorted(h.published) == [1, 2, 3, 4]
    clips = [h.opened_clips[r] for r in (1, 2, 3, 4)]
    assert clips[0] == spec.clip
    assert all(a != b for a, b in itertools.pairwise(clips)), clips
    # 7 of 10 updates below the clip, target 0.5: the clip shrinks towards the honest norms
    assert clips[-1] < clips[0]
    # the request, the announcement and the published model name the clip in effect; each
    # round's next_clip is the clip of the round after it
    assert [h.request_clips[r] for r in (1, 2, 3, 4)] == clips
    assert [h.published_metrics[r]["clip"] for r in (1, 2, 3, 4)] == clips
    assert [h.published_metrics[r]["next_clip"] for r in (1, 2, 3)] == clips[1:]
    (status,) = status_data(tmp_path / "ad")["jobs"]  # qflare status --json
    assert status["clip"] == clips[-1]
    # the round (sum at z_delta plus the count at sigma_b) is charged at z: the accountant's
    # epsilon is privacy_charge's for the job's z, not for the larger z_delta
    charge = charge_of(spec)
    assert adaptive_of(spec) is not None and charge.z == spec.noise_multiplier
    assert sum_noise_multiplier(spec) > charge.z
    for r, eps in h.grants:
        assert eps == pytest.approx(epsilon(charge.q, charge.z, r, spec.delta), rel=1e-9)


async def test_adaptive_clipping_survives_a_restart_bit_for_bit(
    federation: Federation, tmp_path: Path
) -> None:
    spec = adaptive_job(rounds=3)
    once, uninterrupted = await run_job(federation, tmp_path / "u", spec)
    for n in (2, 3):
        h, restarted = await run_job(federation, tmp_path / f"r{n}", spec, restart_in_round=n)
        assert h.end_reason == "completed"
        assert h.opened_clips == once.opened_clips and h.request_clips == once.request_clips
        assert all(np.array_equal(uninterrupted[k], restarted[k]) for k in uninterrupted)


async def test_the_round_matrix_gives_the_stacked_model_and_is_reused(
    federation: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each update goes into a row of its round's matrix as the read-ahead decodes it; at
    the verdict nothing is read again, even while the read-ahead is still decoding (it is
    waited for), the model is the one stacking the decoded updates gives, bit for bit, and
    every round after the first reuses the first round's matrix."""
    from qflare.messages.tensors import RoundRows
    from qflare.runtime.updates import UpdateFeed
    from qflare.services.aggregator import service as aggregator_module
    from qflare.services.aggregator.core import Aggregate, aggregate, cap_removals

    fetched: list[int] = []
    real_fetch = UpdateFeed.fetch

    async def fetch(
        self: UpdateFeed, round_no: int, refs: Any, timeout: float = 60.0, **kw: Any
    ) -> Any:
        if self.log.name.endswith("aggregator"):  # the detector's feed is another
            fetched.append(round_no)
        return await real_fetch(self, round_no, refs, timeout, **kw)

    monkeypatch.setattr(UpdateFeed, "fetch", fetch)
    real_keep = aggregator_module.Aggregator._keep

    async def slow_keep(self: Any, job_id: str, update: Any) -> None:
        await asyncio.sleep(0.15)  # still decoding when the round closes
        await real_keep(self, job_id, update)

    monkeypatch.setattr(aggregator_module.Aggregator, "_keep", slow_keep)
    matrices: dict[int, RoundRows] = {}
    real_round_rows = aggregator_module.Aggregator._round_rows

    async def round_rows(self: Any, job_id: str, r: Any) -> tuple[RoundRows, int]:
        entry = await real_round_rows(self, job_id, r)
        matrices.setdefault(r.round, entry[0])
        return entry

    monkeypatch.setattr(aggregator_module.Aggregator, "_round_rows", round_rows)
    spec = job(rounds=3)
    h, final = await run_job(federation, tmp_path / "m", spec)
    assert h.end_reason == "completed" and fetched == []
    assert sorted(matrices) == [1, 2, 3]
    assert matrices[2] is matrices[1] and matrices[3] is matrices[1]
    model = initial_model()
    for r in (1, 2, 3):
        kept, flagged = h.verdicts[r]
        kept, removed = cap_removals(kept, [(c, 1.0) for c in flagged], spec.dp_filter_bound)
        command = Aggregate(r, r - 1, tuple(kept), tuple(removed), (), spec.clip, population=10)
        model = aggregate(spec, command, model, {c: delta(c, r) for c in kept}).model
    for name, tensor in model.items():
        assert np.array_equal(tensor, final[name]), name


@pytest.mark.parametrize("rule", ["median", "krum"])
async def test_a_round_past_the_memory_budget_is_spilled_and_gives_the_same_model(
    federation: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rule: str
) -> None:
    """``rows_in_memory_mb = 0``: every round's matrix is kept in a file under the data
    folder and aggregated block by block; the models are those of the in-memory rounds, bit
    for bit, also across a restart mid-round, and no file is left behind."""
    from qflare.runtime.spill import SpilledRows
    from qflare.services.aggregator import service as aggregator_module

    kinds: set[type] = set()
    real_round_rows = aggregator_module.Aggregator._round_rows

    async def round_rows(self: Any, job_id: str, r: Any) -> Any:
        entry = await real_round_rows(self, job_id, r)
        kinds.add(type(entry[0]))
        return entry

    monkeypatch.setattr(aggregator_module.Aggregator, "_round_rows", round_rows)
    spec = job(rounds=2, rule=rule)
    h1, in_memory = await run_job(federation, tmp_path / "mem", spec)
    assert kinds == {aggregator_module.RoundRows}
    kinds.clear()
    spill = {"rows_in_memory_mb": 0}
    h2, spilled = await run_job(federation, tmp_path / "spill", spec, aggregator_options=spill)
    assert kinds == {SpilledRows}
    h3, restarted = await run_job(
        federation, tmp_path / "again", spec, restart_in_round=2, aggregator_options=spill
    )
    assert h1.end_reason == h2.end_reason == h3.end_reason == "completed"
    assert h1.published == h2.published == h3.published
    for name, tensor in in_memory.items():
        assert np.array_equal(tensor, spilled[name]) and np.array_equal(tensor, restarted[name])
    for folder in ("spill", "again"):
        rows = tmp_path / folder / "aggregator" / "rows"
        assert rows.is_dir() and list(rows.iterdir()) == []  # unlinked files only


@pytest.mark.parametrize(
    ("named", "says"),
    [
        (("nope", "b"), "output_layer names 'nope', which the model does not have"),
        (("w", "b"), "output_layer must name a weight [classes, hidden]"),
    ],
    ids=["missing", "shape"],
)
@pytest.mark.parametrize("given", ["in-process", "file"])
async def test_a_job_whose_output_layer_the_model_lacks_is_refused_at_submission(
    federation: Federation, tmp_path: Path, named: tuple[str, str], says: str, given: str
) -> None:
    """Label consistency needs the output layer the job names: a model without it (or with
    it in other shapes: w is [8, 6] and b [6] here) is refused when the job is submitted,
    naming the job and the model's tensors, and nothing is stored."""
    from safetensors.numpy import save_file

    path = tmp_path / "m0.safetensors"
    save_file(initial_model(), str(path))
    spec = job(output_layer=named, initial_model=str(path) if given == "file" else None)
    bus = await connect_bus(f"memory://agg-layer-{given}-{named[0]}")
    settings = load_settings(None, env={}, data_dir=str(tmp_path / "data"))
    ids = {"aggregator": (federation.identity("aggregator"), federation.trust())}
    async with run_in_process(settings, bus, services=["aggregator"], identities=ids) as running:
        with pytest.raises(ValueError, match=r"job 'j1'") as info:
            await running.submit_job(spec, initial_model() if given == "in-process" else None)
        assert says in str(info.value)
        agg = running.services["aggregator"]
        assert await agg.store.job_spec(spec.job_id) is None
        # the same job without a layer goes in
        await running.submit_job(
            spec.model_copy(update={"output_layer": None}),
            initial_model() if given == "in-process" else None,
        )
        assert await agg.store.job_spec(spec.job_id) is not None
    await bus.close()
