"""The participant: follow rounds, verify the global model, train, send a signed update.

A participant's queue ``client.<id>`` is bound to ``<job>.#`` on ``qflare.broadcast``; the
aggregator sends there, per round, ``<job>.model.published`` (the global model, with its
tensors, signed) and then ``<job>.round.opened`` (who is selected, the model version and
digest, the deadline), and ``<job>.job.ended`` at the end. For each round that selects it
the participant

1. verifies both envelopes (CA chain, revocation, ML-DSA signature) and accepts them only
   from an *aggregator* certificate, and checks that the model's tensors hash to the digest
   the signed messages name (:func:`qflare.services.aggregator.core.model_digest`);
2. copies the global tensors into the torch model (numpy from the envelope; never
   ``torch.load``), calls the user's ``train(model, round_info) -> num_samples`` in a worker
   thread (the event loop keeps the broker connection alive meanwhile), and takes
   ``delta = local - global`` per tensor;
3. applies ``update_transform`` if one is given (the simulator's Byzantine hook), signs the
   update with its ML-DSA key, seals it to ingest's KEM key, and publishes it to
   ``qflare.client`` as ``update.<job>`` with publisher confirms.

Reconnection is the bus's: the robust connection re-opens the channel and the consumer
after a broker restart, a publish during the outage is retried, and a broadcast whose
handling was cut off is redelivered; the participant is idempotent per ``(job, round)``, so
a redelivered ``round.opened`` after a sent update sends nothing twice.

Extension points for simulations: override :meth:`Participant.compute_update` (any update,
no torch needed) or pass ``update_transform(update, round_info) -> update`` (model
poisoning); data poisoning such as label flipping belongs in ``train``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from qflare.bus import Bus, Delivery, Outcome, QueueSpec, Subscription, connect_bus, topology
from qflare.client.kit import Kit
from qflare.client.tensors import delta, load_tensors, model_tensors
from qflare.messages import Body, Envelope, JobEnded, ModelPublished, RoundOpened, Update, encode
from qflare.messages.envelope import by_kind, open_off_loop
from qflare.messages.errors import MessageRejected, Reason
from qflare.messages.tensors import model_digest

log = logging.getLogger("qflare.client")

#: Verified global models kept per job (the current one and its predecessor).
_MODELS_KEPT = 2


@dataclass(frozen=True)
class RoundInfo:
    """What a participant knows about the round it trains for."""

    job: str
    round: int
    client: str
    model_version: int
    model_digest: bytes
    deadline: float
    clip_norm: float
    participants: tuple[str, ...]
    rule: str

    @property
    def selected(self) -> bool:
        return self.client in self.participants


@dataclass
class LocalUpdate:
    """An update as sent: tensors by name (the round's names, dtypes and shapes) and the
    number of local samples it was computed on."""

    tensors: dict[str, np.ndarray]
    num_samples: int


TrainFn = Callable[[Any, RoundInfo], int]
UpdateTransform = Callable[[dict[str, np.ndarray], RoundInfo], Mapping[str, np.ndarray]]


@dataclass
class Stats:
    models_verified: int = 0
    rounds_seen: int = 0
    rounds_selected: int = 0
    updates_sent: int = 0
    rounds_missed: int = 0
    rejected: int = 0
    last_error: str = ""
    sent: list[tuple[str, int]] = field(default_factory=list)


def declare_mode(url: str, client_id: str) -> str:
    """``"passive"`` when ``url`` logs in as the client's own broker user (named by its id
    in the definitions, and without configure permission on the exchanges), else
    ``"full"``."""
    user = urlsplit(url).username
    return "passive" if user is not None and unquote(user) == client_id else "full"


class Participant:
    """One federated-learning participant.

    ``broker`` is a URL (``memory://``, ``amqp://host/vhost``; the kit's credentials are
    filled in when the URL names none) or an already connected :class:`Bus` (in-process
    simulations share one). ``jobs`` limits the jobs followed (default: every job the
    broadcast exchange carries for this client).

    ``declare`` (RabbitMQ): ``"passive"`` only checks that the exchanges and the queue
    ``client.<id>`` exist, as a participant's own broker user must (the definitions file of
    ``qflare broker-definitions`` creates them; the user has no configure right on the
    exchanges); ``"full"`` creates them (guest/admin URLs, a broker without definitions).
    Default: passive when the URL's user is this client's id (its own, restricted user, as
    when the kit's ``broker_password`` is filled in), full otherwise.
    """

    def __init__(
        self,
        kit: Kit,
        model: Any,
        train: TrainFn | None,
        *,
        broker: str | Bus = "memory://",
        prefix: str = "",
        jobs: Iterable[str] | None = None,
        seal: bool = True,
        update_transform: UpdateTransform | None = None,
        model_wait_s: float = 30.0,
        prefetch: int = 4,
        clock: Callable[[], float] = time.time,
        declare: str | None = None,
    ) -> None:
        if train is None and type(self).compute_update is Participant.compute_update:
            raise TypeError("give a train(model, round_info) function, or override compute_update")
        if seal and kit.ingest_cert is None:
            raise ValueError(
                f"kit of {kit.id!r} has no ingest certificate to seal to; pass seal=False "
                "or provision it with `qflare provision`"
            )
        self.kit = kit
        self.model = model
        self.train = train
        self.seal = seal
        self.update_transform = update_transform
        self.model_wait_s = model_wait_s
        self.prefetch = prefetch
        self.clock = clock
        self.jobs = tuple(sorted(set(jobs))) if jobs is not None else None
        if declare not in (None, "full", "passive"):
            raise ValueError(f"declare must be 'full', 'passive' or None (auto), got {declare!r}")
        self.declare = declare
        self._broker = broker
        self._prefix = prefix
        self.bus: Bus | None = broker if isinstance(broker, Bus) else None
        self._own_bus = not isinstance(broker, Bus)
        self._sub: Subscription | None = None
        self.models: dict[str, dict[int, tuple[bytes, Mapping[str, np.ndarray]]]] = {}
        self._model_arrived: dict[tuple[str, int], asyncio.Event] = {}
        self.submitted: set[tuple[str, int]] = set()
        self.ended: dict[str, str] = {}
        self._ended_events: dict[str, asyncio.Event] = {}
        self._train_lock = asyncio.Lock()
        self.stats = Stats()

    @classmethod
    def from_kit(
        cls,
        folder: str | Path,
        model: Any,
        train: TrainFn | None,
        passphrase: bytes | None = None,
        **kwargs: Any,
    ) -> Participant:
        return cls(Kit.load(folder, passphrase), model, train, **kwargs)

    @property
    def id(self) -> str:
        return self.kit.id

    # -- life cycle -------------------------------------------------------------------------
    def queue_spec(self) -> QueueSpec:
        patterns = [f"{job}.#" for job in self.jobs] if self.jobs else ["#"]
        return QueueSpec(
            f"client.{self.id}", bindings=tuple((topology.BROADCAST, p) for p in patterns)
        )

    async def start(self) -> None:
        if self.bus is None:
            url = self.kit.broker_url(str(self._broker))
            options: dict[str, Any] = {}
            if not url.startswith("memory"):
                options["connection_name"] = f"qflare-client-{self.id}"
                options["declare"] = self.declare or declare_mode(url, self.id)
            self.bus = await connect_bus(url, prefix=self._prefix, **options)
        self._sub = await self.bus.consume(
            self.queue_spec(), self._on_broadcast, prefetch=self.prefetch
        )
        log.info("participant %s following %s", self.id, ", ".join(self.jobs or ("every job",)))

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.cancel()
            self._sub = None
        if self.bus is not None and self._own_bus:
            await self.bus.close()
            self.bus = None

    async def __aenter__(self) -> Participant:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def ended_event(self, job: str) -> asyncio.Event:
        return self._ended_events.setdefault(job, asyncio.Event())

    async def run(self, job: str | None = None, timeout: float | None = None) -> str:
        """Start, follow ``job`` (default: the only job in ``jobs``) until it ends, stop;
        returns the reason the job ended."""
        job = job or (self.jobs[0] if self.jobs and len(self.jobs) == 1 else None)
        if job is None:
            raise ValueError("run() needs the job to wait for (or jobs=[one job])")
        await self.start()
        try:
            await asyncio.wait_for(self.ended_event(job).wait(), timeout)
        finally:
            await self.stop()
        return self.ended[job]

    def run_blocking(self, job: str | None = None, timeout: float | None = None) -> str:
        """:meth:`run` for plain scripts."""
        return asyncio.run(self.run(job, timeout))

    # -- the one hook simulations override ---------------------------------------------------
    def compute_update(
        self, global_tensors: Mapping[str, np.ndarray], info: RoundInfo
    ) -> LocalUpdate:
        """Load the global model, train, and return ``local - global``. Runs in a worker
        thread. Override it to produce updates without torch (simulations, attacks)."""
        load_tensors(self.model, global_tensors)
        num_samples = self.train(self.model, info)  # type: ignore[misc]
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise TypeError(
                f"train() must return the number of samples (an int >= 1), got {num_samples!r}"
            )
        local = model_tensors(self.model, list(global_tensors))
        return LocalUpdate(delta(local, global_tensors), num_samples)

    # -- broadcast handling ------------------------------------------------------------------
    async def _on_broadcast(self, delivery: Delivery) -> Outcome:
        try:
            env = await self._open(delivery.body)
            if self.jobs is not None and env.job not in self.jobs:
                return Outcome.ACK
            return await self._routes[env.kind](env)
        except MessageRejected as exc:
            self.stats.rejected += 1
            self.stats.last_error = f"{exc.reason.value}: {exc.detail}"
            log.warning(
                "participant %s rejected a broadcast (%s): %s",
                self.id,
                exc.reason.value,
                exc.detail,
            )
            return Outcome.REJECT

    @property
    def _routes(self) -> dict[str, Callable[[Any], Awaitable[Outcome]]]:
        return by_kind(
            {ModelPublished: self._on_model, RoundOpened: self._on_round, JobEnded: self._on_ended}
        )

    async def _open(self, data: bytes) -> Envelope[Body]:
        env = await open_off_loop(
            data, self.kit.trust, expect_kind=self._routes.keys(), now=self.clock()
        )
        allowed = ("aggregator", "operator") if env.kind == "job.ended" else ("aggregator",)
        if env.cert.role not in allowed:
            raise MessageRejected(
                Reason.ROLE_NOT_ALLOWED,
                f"{env.kind} from a {env.cert.role!r} certificate; only {allowed} are trusted",
            )
        return env

    async def _on_model(self, env: Envelope[ModelPublished]) -> Outcome:
        body = env.body
        if body.tensors is None:
            return Outcome.ACK  # the events-side announcement; clients need the tensors
        if model_digest(body.tensors) != body.digest:
            raise MessageRejected(
                Reason.BAD_DIGEST,
                f"model version {body.version} of {env.job!r} does not hash to its signed digest",
            )
        versions = self.models.setdefault(env.job, {})
        versions[body.version] = (body.digest, body.tensors)
        for old in sorted(versions)[:-_MODELS_KEPT]:
            del versions[old]
        self.stats.models_verified += 1
        self._model_event(env.job, body.version).set()
        return Outcome.ACK

    def _model_event(self, job: str, version: int) -> asyncio.Event:
        return self._model_arrived.setdefault((job, version), asyncio.Event())

    def latest_model(self, job: str) -> tuple[int, Mapping[str, np.ndarray]] | None:
        versions = self.models.get(job)
        if not versions:
            return None
        v = max(versions)
        return v, versions[v][1]

    async def _on_round(self, env: Envelope[RoundOpened]) -> Outcome:
        body = env.body
        self.stats.rounds_seen += 1
        info = RoundInfo(
            job=env.job,
            round=env.round,
            client=self.id,
            model_version=body.model_version,
            model_digest=body.model_digest,
            deadline=body.deadline,
            clip_norm=body.clip_norm,
            participants=tuple(body.participants),
            rule=body.rule,
        )
        if not info.selected or (env.job, env.round) in self.submitted or env.job in self.ended:
            return Outcome.ACK
        self.stats.rounds_selected += 1
        # model.published precedes round.opened on this queue, but handlers run concurrently
        # and a large model is decoded in a thread: wait for it a bounded time.
        arrived = self._model_event(env.job, body.model_version)
        try:
            await asyncio.wait_for(arrived.wait(), self.model_wait_s)
        except TimeoutError:
            log.warning(
                "participant %s: model version %d of %s did not arrive; retrying the round",
                self.id,
                body.model_version,
                env.job,
            )
            return Outcome.RETRY
        digest, global_tensors = self.models[env.job][body.model_version]
        if digest != body.model_digest:
            raise MessageRejected(
                Reason.BAD_DIGEST,
                f"round {env.round} names model digest {body.model_digest.hex()[:16]}, "
                f"the verified version {body.model_version} is {digest.hex()[:16]}",
            )
        async with self._train_lock:
            if (env.job, env.round) in self.submitted:
                return Outcome.ACK
            if self.clock() > info.deadline:
                self.stats.rounds_missed += 1
                return Outcome.ACK
            update = await asyncio.to_thread(self._make_update, global_tensors, info)
            data = await self._encode(update, info)
            assert self.bus is not None
            await self.bus.publish(topology.CLIENT, f"update.{env.job}", data)
            self.submitted.add((env.job, env.round))
            self.stats.updates_sent += 1
            self.stats.sent.append((env.job, env.round))
        log.info(
            "participant %s sent its update for round %d of %s (%d samples)",
            self.id,
            env.round,
            env.job,
            update.num_samples,
        )
        return Outcome.ACK

    def _make_update(
        self, global_tensors: Mapping[str, np.ndarray], info: RoundInfo
    ) -> LocalUpdate:
        update = self.compute_update(global_tensors, info)
        if self.update_transform is not None:
            update = LocalUpdate(
                dict(self.update_transform(dict(update.tensors), info)), update.num_samples
            )
        return update

    async def _encode(self, update: LocalUpdate, info: RoundInfo) -> bytes:
        body = Update(
            base_version=info.model_version, num_samples=update.num_samples, tensors=update.tensors
        )
        seal_to = self.kit.ingest_cert if self.seal else None
        return await asyncio.to_thread(
            encode,
            "update",
            body,
            self.kit.identity,
            job=info.job,
            round=info.round,
            seal_to=seal_to,
        )

    async def _on_ended(self, env: Envelope[JobEnded]) -> Outcome:
        reason = env.body.reason
        self.ended[env.job] = reason
        latest = self.latest_model(env.job)
        if latest is not None and self.model is not None and self.train is not None:
            load_tensors(self.model, latest[1])  # leave the final global model in the user's model
        log.info("participant %s: job %s ended (%s)", self.id, env.job, reason)
        self.ended_event(env.job).set()
        return Outcome.ACK


async def run_participants(
    participants: Iterable[Participant], job: str, timeout: float | None = None
) -> dict[str, str]:
    """Run many participants (e.g. in one simulation process) until ``job`` ends for all."""
    parts = list(participants)
    for p in parts:
        await p.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(p.ended_event(job).wait() for p in parts)), timeout)
    finally:
        for p in parts:
            await p.stop()
    return {p.id: p.ended[job] for p in parts}
