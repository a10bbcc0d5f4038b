"""The services path: the real services on one bus, simulated participants using the SDK.

One run:

1. a fresh federation is provisioned into a temporary folder (CA, one identity per
   service, one kit per client: ``qflare provision``'s own code);
2. the services start in-process on the chosen bus (``memory://`` or RabbitMQ, under a
   per-run name prefix) with ``run_in_process``; the job is submitted with the initial
   model;
3. every client is a :class:`qflare.client.Participant` (verifies the aggregator's model,
   signs and seals its update to ingest). Its ``compute_update`` is the simulator's local
   training; a Byzantine client's update goes through the SDK's ``update_transform`` hook,
   which swaps in the coalition's poisoned update;
4. an observer queue reads what the services publish — ``round.opened`` (who was
   selected), ``round.verdict`` (who was flagged), ``model.published`` (epsilon) and
   ``job.ended``, and the job's model stream (each version's tensors, whole or in parts:
   :class:`qflare.messages.models.ModelReader`) — verifies each envelope and model digest,
   evaluates every published model on the test set and publishes ``metrics.evaluated``
   (signed as the operator) for the TUI. The report is built only from those messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qflare.aio import blocking
from qflare.bus import Bus, Delivery, Outcome, QueueSpec, connect_bus, topology
from qflare.client import Kit, LocalUpdate, Participant, RoundInfo
from qflare.crypto import provision
from qflare.messages import (
    Envelope,
    JobEnded,
    MetricsEvaluated,
    ModelPublished,
    RoundOpened,
    RoundVerdict,
    UpdateRejected,
    encode,
    open_envelope,
)
from qflare.messages.envelope import by_kind
from qflare.messages.errors import MessageRejected
from qflare.messages.jobs import JobSettings
from qflare.messages.models import ModelReader, opener
from qflare.runtime import JobSpec, load_settings, run_in_process
from qflare.services.aggregator.core import cap_removals
from qflare.sim.config import SIM_JOB, SimConfig, job_budget
from qflare.sim.federation import Federation
from qflare.sim.model import Params
from qflare.sim.report import RoundRecord, RunResult

RoundCallback = Callable[[RoundRecord], None]

#: Seconds a whole job may take before the run is abandoned as stuck.
JOB_TIMEOUT_S = 1800.0
#: A round closes when every selected client is in; the deadline only guards a stuck run,
#: since closing on a deadline would make the round's set depend on timing.
ROUND_DEADLINE_S = 300.0
#: ... and a shorter guard when ingest refuses the Byzantine updates (``inf``: NON_FINITE):
#: the aggregator counts a refused client as answered and closes the round without it, so
#: this deadline only matters if a refusal is lost.
REJECTED_ROUND_DEADLINE_S = 8.0
ATTACKS_INGEST_REJECTS = ("inf",)


class SimulationFailed(RuntimeError):
    """The services did not finish the job (timeout, or it ended without rounds)."""


class RoundCache:
    """One round's training, computed once for all of its participants.

    Participants ask from worker threads; the first computes every participant's update
    (the coalition needs all honest updates before any Byzantine one can be sent).
    """

    def __init__(self, federation: Federation) -> None:
        self.federation = federation
        self._lock = threading.Lock()
        self._key: tuple[int, int] | None = None
        self._trained: dict[str, Params] = {}
        self._poisoned: dict[str, Params] = {}

    def _ensure(self, global_tensors: Mapping[str, np.ndarray], info: RoundInfo) -> None:
        key = (info.round, info.model_version)
        with self._lock:
            if self._key == key:
                return
            params = {k: np.asarray(v, dtype=np.float32) for k, v in global_tensors.items()}
            participants = sorted(info.participants)
            trained = self.federation.honest_updates(info.round, params, participants)
            self._poisoned = self.federation.poison(info.round, trained, participants)
            self._trained = trained
            self._key = key

    def trained(self, global_tensors: Mapping[str, np.ndarray], info: RoundInfo) -> Params:
        self._ensure(global_tensors, info)
        return self._trained[info.client]

    def poisoned(
        self, info: RoundInfo, update: Mapping[str, np.ndarray]
    ) -> Mapping[str, np.ndarray]:
        with self._lock:
            return self._poisoned.get(info.client, update)


class SimParticipant(Participant):
    """A participant whose local training is the simulator's (no torch model of its own)."""

    def __init__(self, kit: Kit, cache: RoundCache, num_samples: int, **kwargs: Any) -> None:
        super().__init__(kit, None, None, **kwargs)
        self.cache = cache
        self.num_samples = num_samples

    def compute_update(
        self, global_tensors: Mapping[str, np.ndarray], info: RoundInfo
    ) -> LocalUpdate:
        return LocalUpdate(dict(self.cache.trained(global_tensors, info)), self.num_samples)


@dataclass
class _Round:
    participants: tuple[str, ...] | None = None
    flagged: tuple[str, ...] | None = None
    kept_flagged: tuple[str, ...] = ()
    rejected: set[str] = field(default_factory=set)
    in_round: set[str] = field(default_factory=set)
    epsilon: float | None = None
    published: bool = False
    opened_at: float | None = None
    published_at: float | None = None
    tensors: Mapping[str, np.ndarray] | None = None
    clip: float | None = None


@dataclass
class Observer:
    """Assembles per-round records from the services' messages, in round order."""

    federation: Federation
    trust: Any
    dp_on: bool
    on_round: RoundCallback | None
    publish_metrics: Callable[[int, int, float, float], Any] | None = None
    dp_filter_bound: int | None = None
    rounds: dict[int, _Round] = field(default_factory=dict)
    records: list[RoundRecord] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str = ""
    end_detail: str = ""
    errors: list[str] = field(default_factory=list)
    # events and the model stream arrive on two readers: one round is recorded at a time
    _emitting: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self._model = self.federation.new_model()
        self._models = ModelReader(opener(self.trust))

    async def on_model(self, delivery: Delivery) -> Outcome:
        """An envelope of the job's model stream: a model version is evaluated once it is
        whole (one ``model.published``, or a manifest and its parts) and hashes to its
        signed digest."""
        try:
            model = await self._models.take(delivery.body)
        except MessageRejected as exc:
            self.errors.append(f"{delivery.routing_key}: {exc}")
            return Outcome.REJECT
        if model is not None and model.job == SIM_JOB and model.version == model.round > 0:
            self._round(model.round).tensors = model.tensors
            await self._emit_ready()
        return Outcome.ACK

    def _round(self, r: int) -> _Round:
        return self.rounds.setdefault(r, _Round())

    async def on_delivery(self, delivery: Delivery) -> Outcome:
        try:
            env = open_envelope(delivery.body, self.trust, expect_kind=self._routes.keys())
        except Exception as exc:
            self.errors.append(f"{delivery.routing_key}: {exc}")
            return Outcome.REJECT
        if env.job != SIM_JOB:
            return Outcome.ACK
        from_events = delivery.exchange.endswith(topology.EVENTS)
        self._routes[env.kind](env, from_events)
        await self._emit_ready()
        if env.kind == JobEnded.KIND and from_events:
            self.ended.set()
        return Outcome.ACK

    @property
    def _routes(self) -> dict[str, Callable[[Any, bool], None]]:
        return by_kind(
            {
                RoundOpened: self._opened,
                UpdateRejected: self._refused,
                RoundVerdict: self._verdict,
                ModelPublished: self._published,
                JobEnded: self._job_ended,
            }
        )

    def _opened(self, env: Envelope[RoundOpened], from_events: bool) -> None:
        r = self._round(env.round)
        if from_events and r.participants is None:
            r.participants = tuple(sorted(env.body.participants))
            r.opened_at = time.perf_counter()
            r.clip = float(env.body.clip_norm)

    def _refused(self, env: Envelope[UpdateRejected], from_events: bool) -> None:
        self._round(env.round).rejected.add(env.body.client)

    def _verdict(self, env: Envelope[RoundVerdict], from_events: bool) -> None:
        body, r = env.body, self._round(env.round)
        if r.flagged is None:
            r.flagged = tuple(sorted(x.client for x in body.flagged))
            r.in_round = set(body.kept) | set(r.flagged)
            # which flagged ones the aggregator keeps under the bound: its own function
            _kept, removed = cap_removals(
                list(body.kept),
                [(x.client, float(x.score)) for x in body.flagged],
                self.dp_filter_bound,
            )
            r.kept_flagged = tuple(sorted(set(r.flagged) - set(removed)))

    def _published(self, env: Envelope[ModelPublished], from_events: bool) -> None:
        body, r = env.body, self._round(env.round)
        if body.tensors is None and not r.published:
            r.published = True
            r.published_at = time.perf_counter()
            r.epsilon = float(body.epsilon) if self.dp_on and math.isfinite(body.epsilon) else None

    def _job_ended(self, env: Envelope[JobEnded], from_events: bool) -> None:
        self.end_reason = env.body.reason
        self.end_detail = env.body.detail

    async def _emit_ready(self) -> None:
        async with self._emitting:
            await self._emit_rounds()

    async def _emit_rounds(self) -> None:
        while True:
            n = len(self.records) + 1
            r = self.rounds.get(n)
            if r is None or r.participants is None or not r.published or r.tensors is None:
                return
            if r.flagged is None:
                r.flagged = ()
            params = {k: np.asarray(v, dtype=np.float32) for k, v in r.tensors.items()}
            evaluation = await asyncio.to_thread(self.federation.evaluate, params, self._model)
            record = RoundRecord(
                round=n,
                accuracy=evaluation.accuracy,
                loss=evaluation.loss,
                participants=r.participants,
                flagged=r.flagged,
                byzantine=tuple(c for c in r.participants if c in self.federation.byzantine),
                epsilon=r.epsilon,
                latency_s=(r.published_at or 0.0) - (r.opened_at or 0.0),
                # A refusal counts only for a client whose update never entered the round (a
                # refused duplicate of an accepted update is not a stopped attack).
                rejected=tuple(sorted(r.rejected - r.in_round)),
                kept_flagged=r.kept_flagged,
                clip=r.clip,
            )
            r.tensors = None  # the model is evaluated; drop it
            self.records.append(record)
            if self.publish_metrics is not None:
                await self.publish_metrics(n, n, evaluation.accuracy, evaluation.loss)
            if self.on_round is not None:
                self.on_round(record)


def job_spec(config: SimConfig, ids: tuple[str, ...]) -> JobSpec:
    """The simulated job: ``config``'s job settings (the :class:`JobSettings` both share,
    with f filled into the rule and the budget resolved) and how the simulator's rounds
    close (one update suffices; a short round aborts the job)."""
    settings = {name: getattr(config, name) for name in JobSettings.model_fields}
    settings.update(rule=config.rule_spec, epsilon_budget=job_budget(config))
    rejects = config.attack in ATTACKS_INGEST_REJECTS
    deadline = REJECTED_ROUND_DEADLINE_S if rejects else ROUND_DEADLINE_S
    return JobSpec(
        **settings,
        job_id=SIM_JOB,
        participants=ids,
        f=config.byzantine,
        min_updates=1,
        deadline_s=deadline,
        on_short="abort",
    )


async def run_services_async(
    config: SimConfig,
    federation: Federation,
    *,
    broker: str = "memory://",
    on_round: RoundCallback | None = None,
    tui: bool = False,
    workdir: Path | None = None,
    log_path: Path | None = None,
) -> RunResult:
    """Run the simulation ``config`` on the real services (the steps above) and report what
    they published; ``workdir`` keeps the federation's files (default: a temporary folder),
    ``log_path`` the services' log. :func:`run_services` is the blocking form."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qflare-sim-") as tmp, _logs_to(log_path):
        root = Path(workdir) if workdir is not None else Path(tmp)
        pki = provision(root / "pki", clients=config.clients)
        if tuple(sorted(pki.clients)) != federation.ids:
            raise SimulationFailed(
                f"provisioned ids {sorted(pki.clients)[:3]}... differ from the simulation's"
            )
        trust = pki.trust()
        amqp = not broker.startswith("memory")
        # A per-run prefix keeps concurrent runs (and tests) on one RabbitMQ apart.
        prefix = f"qsim-{uuid.uuid4().hex[:8]}." if amqp else ""
        url = broker if amqp else f"memory://qflare-sim-{uuid.uuid4().hex[:8]}"
        bus = await connect_bus(url, prefix=prefix)
        settings = load_settings(
            None,
            env={},
            broker=url,
            prefix=prefix,
            data_dir=str(root / "data"),
            pki_dir=str(pki.root),
            log_level="WARNING",
        )
        names = ["alerting", "detector", "ingest", "aggregator"] + (
            ["accountant"] if config.dp_on else []
        )
        identities = {n: (pki.identity(n), trust) for n in names}
        operator = pki.identity("operator")

        async def publish_metrics(
            round_no: int, version: int, accuracy: float, loss: float
        ) -> None:
            body = MetricsEvaluated(
                model_version=version,
                accuracy=accuracy,
                loss=loss if math.isfinite(loss) else 1e30,
                num_examples=len(federation.data.test),
            )
            data = encode("metrics.evaluated", body, operator, job=SIM_JOB, round=round_no)
            await bus.publish(topology.EVENTS, f"metrics.evaluated.{SIM_JOB}", data)

        observer = Observer(
            federation,
            trust,
            config.dp_on,
            on_round,
            publish_metrics,
            dp_filter_bound=config.dp_filter_bound,
        )
        cache = RoundCache(federation)
        participants = []
        for cid in federation.ids:
            kit = Kit.load(pki.clients[cid])
            byzantine = cid in federation.byzantine
            participants.append(
                SimParticipant(
                    kit,
                    cache,
                    len(federation.shards[cid]),
                    broker=bus,
                    jobs=[SIM_JOB],
                    update_transform=(lambda update, info: cache.poisoned(info, update))
                    if byzantine
                    else None,
                )
            )
        spec = job_spec(config, federation.ids)
        watch = QueueSpec(
            f"sim-observer-{uuid.uuid4().hex[:8]}",
            bindings=(
                (topology.EVENTS, f"round.opened.{SIM_JOB}"),
                (topology.EVENTS, f"round.verdict.{SIM_JOB}"),
                (topology.EVENTS, f"update.rejected.{SIM_JOB}"),
                (topology.EVENTS, f"model.published.{SIM_JOB}"),
                (topology.EVENTS, f"job.ended.{SIM_JOB}"),
            ),
            single_active=True,
        )
        try:
            sub = await bus.consume(watch, observer.on_delivery, prefetch=1)
            # each model version with its tensors, for the evaluation
            models = await bus.read_stream(
                topology.model_stream(SIM_JOB), observer.on_model, offset="first", prefetch=1
            )
            async with run_in_process(
                settings, bus, services=names, identities=identities
            ) as running:
                for p in participants:
                    await p.start()
                try:
                    await running.submit_job(spec, dict(federation.initial))
                    job = asyncio.ensure_future(observer.ended.wait())
                    if tui:
                        await _watch_in_tui(bus, trust, spec, settings, job)
                    await asyncio.wait_for(job, JOB_TIMEOUT_S)
                finally:
                    for p in participants:
                        await p.stop()
            await sub.cancel()
            await models.cancel()
        finally:
            if amqp:
                await _delete_topology(bus)
            await bus.close()
    if observer.errors:
        raise SimulationFailed(f"the observer rejected messages: {observer.errors[:3]}")
    ended = observer.end_reason or "unknown"
    notes = [f"job ended: {ended} ({observer.end_detail})"] if ended != "completed" else []
    if config.attack in ATTACKS_INGEST_REJECTS:
        notes.append(
            f"ingest refuses {config.attack} updates; the rounds closed without them once "
            "every selected client was in or refused"
        )
    return RunResult(
        config=config.to_json(),
        rounds=observer.records,
        byzantine_clients=federation.byzantine,
        path="services",
        broker=broker.split("@")[-1] if amqp else "memory://",
        wall_s=time.perf_counter() - start,
        ended=ended,
        notes=notes,
    )


@contextlib.contextmanager
def _logs_to(path: Path | None) -> Iterator[None]:
    """The services' warnings (a rejected update is one, by design) go to a file, not over
    the progress bar; without a file they are dropped."""
    root = logging.getLogger()
    handler: logging.Handler
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler = logging.NullHandler()
    handler.setLevel(logging.WARNING)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


async def _delete_topology(bus: Bus) -> None:
    delete_all = getattr(bus, "delete_all", None)
    if delete_all is not None:
        with contextlib.suppress(Exception):
            await delete_all()


async def _watch_in_tui(
    bus: Bus, trust: Any, spec: JobSpec, settings: Any, job: asyncio.Future[Any]
) -> None:
    from qflare.bus.memory import MemoryBus
    from qflare.tui import run_console_in_process
    from qflare.tui.events import JobDeclared

    # The console closes by itself when the job ends. `q` closes it earlier and leaves
    # the job running (the console never cancels what it watches); either way the summary
    # table and the report follow on the terminal. On the embedded bus every publisher is
    # in this process, so the console would only re-check signatures made here a moment
    # ago, on the job's event loop (~0.4 ms each): it checks body digests only. Over
    # RabbitMQ it verifies every envelope against the run's CA.
    app = await run_console_in_process(
        bus,
        trust=None if isinstance(bus, MemoryBus) else trust,
        jobs=[
            JobDeclared(
                spec.job_id, 0, time.time(), epsilon_budget=spec.epsilon_budget, rounds=spec.rounds
            )
        ],
        state_dir=settings.data_dir,
        exit_when=job,
    )
    if not job.done():
        view = app.state.jobs.get(spec.job_id)
        at = (
            f" (round {view.current_round} of {spec.rounds})" if view and view.current_round else ""
        )
        print(
            f"console closed; the job runs on{at} and its report follows (Ctrl-C stops it)",
            file=sys.stderr,
            flush=True,
        )


run_services = blocking(run_services_async, "run_services")
