"""The participant: follow rounds, verify the global model, train, send a signed update.

A participant reads each of its jobs' broadcast stream ``broadcast.<job>`` from its newest
message on, so one that starts late still sees the open round: the aggregator writes there
``round.opened`` (who is selected, the model version, its digest and its offset in the job's
model stream ``models.<job>``, where each version is written once, the deadline) and
``job.ended`` at the end (naming the final model). For each round that selects it the
participant

1. verifies each envelope (CA chain, revocation, ML-DSA signature) and accepts it only from
   an *aggregator* certificate; reads the model version from the model stream at the offset
   the signed ``round.opened`` names (once per version) and checks that its tensors hash to
   the digest it names (:func:`qflare.messages.tensors.model_digest`);
2. copies the global tensors into the torch model (numpy from the envelope; never
   ``torch.load``); calls the user's ``evaluate(model, round_info) -> (loss, num_examples,
   metrics)`` on it, if one is given (the participant's evaluation of the round's global
   model on its own held-out data); loads the global tensors again and calls
   ``train(model, round_info) -> num_samples`` (or ``(num_samples, metrics)``), both in a
   worker thread (the event loop keeps the broker connection alive meanwhile), and takes
   ``delta = local - global`` per tensor. ``round_info.config`` is the job's config for
   the round (the learning rate, local epochs, ...: ``round.opened``'s ``config``, signed);
   metrics are name -> finite float, at most 32 names
   (:func:`qflare.messages.values.check_metrics`: the update is not sent otherwise);
3. applies ``update_transform`` if one is given (the simulator's Byzantine hook), then
   ``local_dp`` if one is given (:class:`qflare.privacy.LocalLaplace`: local DP), signs the
   update with its ML-DSA key, seals it once for the three services that read it (ingest,
   the aggregator, the detector: their KEM keys), and publishes it to ``qflare.client`` as
   ``update.<job>``, which writes it into the job's update stream, with publisher confirms.
   The update carries the training metrics and the evaluation; the aggregator weighs them
   per round (docs/architecture.md, "Metrics and round configs").

Reconnection is the bus's: the robust connection re-opens the channel and the stream reader
after a broker restart (from the next message it had not handled), also one whose attach
the drop cut off, and a publish during the outage is retried; a broker away for longer
than the bus retries is waited for (the participant tries its job's stream again). The
participant is idempotent per ``(job, round)``, so an announcement read twice sends
nothing twice.

Extension points for simulations: override :meth:`Participant.compute_update` (any update,
no torch needed) or pass ``update_transform(update, round_info) -> update`` (model
poisoning); data poisoning such as label flipping belongs in ``train``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import numpy as np

from qflare.bus import (
    AccessRefused,
    Bus,
    BusClosed,
    BusUnavailable,
    Delivery,
    Outcome,
    StreamNotFound,
    StreamReader,
    connect_bus,
    topology,
)
from qflare.client.kit import Kit
from qflare.client.tensors import delta, load_tensors, model_tensors
from qflare.messages import Body, Envelope, JobEnded, RoundOpened, Update, encode
from qflare.messages.bodies import Evaluation
from qflare.messages.envelope import by_kind, open_off_loop
from qflare.messages.errors import MessageRejected, Reason
from qflare.messages.models import ModelReader, ReceivedModel, opener
from qflare.messages.parts import DEFAULT_PART_VALUES, PART_THRESHOLD_BYTES, encode_update_parts
from qflare.messages.values import check_metrics

if TYPE_CHECKING:
    from qflare.privacy.mechanism import LocalLaplace

log = logging.getLogger("qflare.client")

#: Verified global models kept per job (the current one and its predecessor), while the
#: models are small: a job whose model travels in parts keeps only the newest, and gives the
#: older one up before reading a new one (a participant holds a large model once).
_MODELS_KEPT = 2
#: How often a participant looks for a job's streams that do not exist yet.
STREAM_WAIT_S = 1.0
#: First pause before an update that no stream took is published again (doubling, capped).
UPDATE_RETRY_S = 0.2
UPDATE_RETRY_MAX_S = 2.0


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
    config: Mapping[str, Any] = field(default_factory=dict)
    """The job's config for this round (``round.opened``'s ``config``: a JSON-like map)."""

    @property
    def selected(self) -> bool:
        return self.client in self.participants


@dataclass
class LocalUpdate:
    """An update as sent: tensors by name (the round's names, dtypes and shapes), the
    number of local samples it was computed on, the training metrics, and the evaluation
    of the round's global model (None: none was run)."""

    tensors: dict[str, np.ndarray]
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    evaluation: Evaluation | None = None


#: How a job ends for a participant whose broker login was refused (revoked).
ACCESS_REFUSED = "access_refused"

#: ``train(model, round_info)`` returns the number of samples, or (that number, metrics).
TrainFn = Callable[[Any, RoundInfo], int | tuple[int, Mapping[str, float]]]
#: ``evaluate(model, round_info)`` returns (loss, num_examples, metrics), Flower's shape.
EvaluateFn = Callable[[Any, RoundInfo], tuple[float, int, Mapping[str, float]] | Evaluation]
UpdateTransform = Callable[[dict[str, np.ndarray], RoundInfo], Mapping[str, np.ndarray]]


@dataclass
class Stats:
    models_verified: int = 0
    rounds_seen: int = 0
    rounds_selected: int = 0
    updates_sent: int = 0
    rounds_missed: int = 0
    rejected: int = 0
    updates_refused: int = 0  # updates this participant did not send (metrics out of bounds)
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
    simulations share one). ``jobs`` names the jobs followed (each has its own streams).

    ``declare`` (RabbitMQ): ``"passive"`` only checks that the exchanges and the job's streams
    exist, as a participant's own broker user must (it has no configure right: the
    aggregator declares a job's streams when the job is submitted; the participant waits for
    them); ``"full"`` creates them (guest/admin URLs, a broker without definitions).
    Default: passive when the URL's user is this client's id (its own, restricted user, as
    when the kit's ``broker_password`` is filled in), full otherwise.

    ``evaluate(model, round_info) -> (loss, num_examples, metrics)``: run on each round's
    global model before ``train``; the result travels in the update.

    ``part_threshold_bytes``: an update whose tensors take more bytes than this is sent as
    a manifest and parts of ``part_values`` float32 values each (:mod:`qflare.messages.parts`),
    encoded and published one part at a time; a smaller one as one ``update`` envelope.
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
        local_dp: LocalLaplace | None = None,
        evaluate: EvaluateFn | None = None,
        part_threshold_bytes: int = PART_THRESHOLD_BYTES,
        part_values: int = DEFAULT_PART_VALUES,
    ) -> None:
        if train is None and type(self).compute_update is Participant.compute_update:
            raise TypeError("give a train(model, round_info) function, or override compute_update")
        if seal:
            kit.readers  # noqa: B018  (raises a ValueError naming what the kit lacks)
        if jobs is None or not list(jobs):
            raise ValueError("name the jobs to follow (jobs=[...]): each job has its own streams")
        for name, value in (
            ("part_threshold_bytes", part_threshold_bytes),
            ("part_values", part_values),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.part_threshold_bytes = part_threshold_bytes
        self.part_values = part_values
        self.kit = kit
        self.model = model
        self.train = train
        self.evaluate = evaluate
        self.seal = seal
        self.update_transform = update_transform
        self.local_dp = local_dp
        self.model_wait_s = model_wait_s
        self.prefetch = prefetch
        self.clock = clock
        self.jobs: tuple[str, ...] = tuple(sorted(set(jobs)))
        if declare not in (None, "full", "passive"):
            raise ValueError(f"declare must be 'full', 'passive' or None (auto), got {declare!r}")
        self.declare = declare
        self._broker = broker
        self._prefix = prefix
        self.bus: Bus | None = broker if isinstance(broker, Bus) else None
        self._own_bus = not isinstance(broker, Bus)
        self._followers: list[asyncio.Task[None]] = []
        self._readers: list[StreamReader] = []
        self.models: dict[str, dict[int, tuple[bytes, Mapping[str, np.ndarray]]]] = {}
        self._parted: set[str] = set()  # jobs whose model comes in parts (held once)
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
    async def start(self) -> None:
        if self.bus is None:
            url = self.kit.broker_url(str(self._broker))
            options: dict[str, Any] = {}
            if not url.startswith("memory"):
                options["connection_name"] = f"qflare-client-{self.id}"
                options["declare"] = self._declare_mode(url)
            self.bus = await connect_bus(url, prefix=self._prefix, **options)
        self.bus.on_refused(self._login_refused)
        for job in self.jobs:
            task = asyncio.get_running_loop().create_task(self._follow(job))
            self._followers.append(task)
        log.info("participant %s following %s", self.id, ", ".join(self.jobs))

    def _login_refused(self, detail: str, jobs: Iterable[str] | None = None) -> None:
        """The broker refused this participant's login on a reconnect (its broker user was
        deleted: ``qflare revoke`` with the management API), or the reading of ``jobs``'
        streams: each of those jobs (default: every job it follows) ends for it as
        ``access_refused``, so :meth:`run` returns instead of retrying forever."""
        jobs = self.jobs if jobs is None else tuple(jobs)
        self.stats.last_error = f"{ACCESS_REFUSED}: {detail}"
        log.error("participant %s: %s; it stops following %s", self.id, detail, ", ".join(jobs))
        for job in jobs:
            if job not in self.ended:
                self.ended[job] = ACCESS_REFUSED
                self.ended_event(job).set()

    def _declare_mode(self, url: str | None = None) -> str:
        if self.declare is not None:
            return self.declare
        if url is None and not isinstance(self._broker, str):
            return "full"  # a bus handed in: the caller's own (simulations, tests)
        return declare_mode(url or self.kit.broker_url(str(self._broker)), self.id)

    async def _follow(self, job: str) -> None:
        """Read the job's broadcast stream from its newest message on, once it exists (a
        participant may start before its job is submitted). A broker that stays away longer
        than the bus retries an attach is waited for: a participant that stopped following
        would wait for its job's end until its timeout. A broker user that may not read the
        stream ends the job for this participant (``access_refused``)."""
        assert self.bus is not None
        stream = topology.broadcast_stream(job)
        while True:
            try:
                # by name: the aggregator declares a job's streams (and deletes them when the
                # job ends); a participant never re-creates one
                reader = await self.bus.read_stream(
                    stream.name, self._on_broadcast, offset="last", prefetch=self.prefetch
                )
            except StreamNotFound:
                await asyncio.sleep(STREAM_WAIT_S)
                continue
            except AccessRefused as exc:
                self._login_refused(str(exc), [job])
                return
            except BusClosed:
                return
            except Exception as exc:
                # BusUnavailable (the broker away for longer than the bus retried), or
                # anything else: a follower that died of it would leave the participant
                # waiting for its job's end until its timeout, following nothing
                level = logging.WARNING if isinstance(exc, BusUnavailable) else logging.ERROR
                log.log(
                    level,
                    "participant %s cannot read %s yet (%r); trying again",
                    self.id,
                    stream.name,
                    exc,
                    exc_info=level == logging.ERROR,
                )
                await asyncio.sleep(STREAM_WAIT_S)
                continue
            self._readers.append(reader)
            return

    async def stop(self) -> None:
        for task in self._followers:
            task.cancel()
        await asyncio.gather(*self._followers, return_exceptions=True)
        self._followers.clear()
        for reader in self._readers:
            await reader.cancel()
        self._readers.clear()
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
        """Load the global model, evaluate it (with ``evaluate``), load it again, train,
        and return ``local - global`` with the metrics. Runs in a worker thread. Override it
        to produce updates without torch (simulations, attacks)."""
        load_tensors(self.model, global_tensors)
        evaluation = None
        if self.evaluate is not None:
            evaluation = Evaluation.of(self.evaluate(self.model, info), "evaluate()")
            load_tensors(self.model, global_tensors)  # train starts from the global model
        num_samples, metrics = _trained(self.train(self.model, info))  # type: ignore[misc]
        local = model_tensors(self.model, list(global_tensors))
        return LocalUpdate(delta(local, global_tensors), num_samples, metrics, evaluation)

    # -- broadcast handling ------------------------------------------------------------------
    async def _on_broadcast(self, delivery: Delivery) -> Outcome:
        try:
            env = await self._open(delivery.body)
            if self.jobs is not None and env.job not in self.jobs:
                return Outcome.ACK
            return await self._routes[env.kind](env)
        except MessageRejected as exc:
            self.stats.rejected += 1
            self._note(exc, logging.WARNING, "participant %s rejected a broadcast", self.id)
            return Outcome.REJECT

    def _note(self, exc: MessageRejected, level: int, what: str, *args: object) -> None:
        """Log a refusal (``what`` with ``args``, then its reason and detail); keep it as
        ``stats.last_error``."""
        self.stats.last_error = f"{exc.reason.value}: {exc.detail}"
        log.log(level, what + " (%s): %s", *args, exc.reason.value, exc.detail)

    @property
    def _routes(self) -> dict[str, Callable[[Any], Awaitable[Outcome]]]:
        return by_kind({RoundOpened: self._on_round, JobEnded: self._on_ended})

    async def _open(self, data: bytes, kinds: Collection[str] | None = None) -> Envelope[Body]:
        env = await open_off_loop(
            data, self.kit.trust, expect_kind=kinds or self._routes.keys(), now=self.clock()
        )
        allowed = ("aggregator", "operator") if env.kind == "job.ended" else ("aggregator",)
        if env.cert.role not in allowed:
            raise MessageRejected(
                Reason.ROLE_NOT_ALLOWED,
                f"{env.kind} from a {env.cert.role!r} certificate; only {allowed} are trusted",
            )
        return env

    async def _fetch_model(
        self, job: str, version: int, digest: bytes, offset: int
    ) -> Mapping[str, np.ndarray]:
        """Model ``version`` of ``job``: cached, or read from the job's model stream at
        ``offset`` and checked against ``digest`` (both from a signed announcement)."""
        cached = self.models.get(job, {}).get(version)
        if cached is not None and cached[0] == digest:
            return cached[1]
        assert self.bus is not None
        versions = self.models.setdefault(job, {})
        if job in self._parted:
            versions.clear()  # too large for one message: hold the model once
        got: asyncio.Future[ReceivedModel] = asyncio.get_running_loop().create_future()
        # one model.published, or a manifest and its parts (read into tensors allocated from
        # the manifest); either way handed out only once it hashes to its signed digest
        models = ModelReader(opener(self.kit.trust, now=self.clock), expect=(version, digest))
        moved = asyncio.Event()  # a message of the model came in

        # what the handler reaches, dropped once the read is over: a bus may keep a
        # cancelled reader's handler for a while, and must not keep the model through it
        reading: dict[str, Any] = {"got": got, "models": models}

        async def take(delivery: Delivery) -> Outcome:
            at = delivery.offset
            fut, reader_ = reading.get("got"), reading.get("models")
            if fut is None or reader_ is None or fut.done() or at is None or at < offset:
                return Outcome.ACK
            if at > offset and not reader_.building:
                return Outcome.ACK
            moved.set()
            try:
                model = await reader_.take(delivery.body)
                if model is not None:
                    fut.set_result(model)
            except MessageRejected as exc:
                fut.set_exception(exc)
            return Outcome.ACK

        reader = await self.bus.read_stream(
            topology.model_stream(job).name, take, offset=offset, prefetch=1
        )
        try:
            # model_wait_s bounds the silence, not the whole read: a model in parts takes
            # as long as its bytes take, and times out only when its parts stop coming
            while not got.done():
                moved.clear()
                progress: asyncio.Future[Any] = asyncio.ensure_future(moved.wait())
                waiting: list[asyncio.Future[Any]] = [got, progress]
                try:
                    done, _ = await asyncio.wait(
                        waiting,
                        timeout=self.model_wait_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    progress.cancel()
                if not done:
                    raise TimeoutError(
                        f"model {version} of {job}: nothing read for {self.model_wait_s} s"
                    )
            model = got.result()
        finally:
            await reader.cancel()
            reading.clear()
        versions[version] = (digest, model.tensors)
        if model.parted:
            self._parted.add(job)
        for old in sorted(versions)[:-_MODELS_KEPT]:
            del versions[old]
        self.stats.models_verified += 1
        return model.tensors

    def latest_model(self, job: str) -> tuple[int, Mapping[str, np.ndarray]] | None:
        """The newest verified model of ``job`` this participant holds (version, tensors).
        A job whose model comes in parts holds it only while a round computes and after
        the job ended (the final model): None in between."""
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
            config=body.config,
        )
        if not info.selected or (env.job, env.round) in self.submitted or env.job in self.ended:
            return Outcome.ACK
        self.stats.rounds_selected += 1
        try:
            global_tensors = await self._fetch_model(
                env.job, body.model_version, body.model_digest, body.model_offset
            )
        except TimeoutError:
            log.warning(
                "participant %s: model version %d of %s not read from its stream; retrying",
                self.id,
                body.model_version,
                env.job,
            )
            return Outcome.RETRY
        async with self._train_lock:
            if (env.job, env.round) in self.submitted:
                return Outcome.ACK
            if self.clock() > info.deadline:
                self.stats.rounds_missed += 1
                return Outcome.ACK
            try:
                update = await asyncio.to_thread(self._make_update, global_tensors, info)
            except MessageRejected as exc:
                self.stats.updates_refused += 1
                what = "participant %s: its update for round %d of %s is not sent"
                self._note(exc, logging.ERROR, what, self.id, env.round, env.job)
                return Outcome.ACK
            if env.job in self._parted:
                # a model too large for one message is not needed while its update is sent
                # (the next round reads its own): given up now, the participant holds the
                # model and the update at once only while it computes
                self.models.get(env.job, {}).pop(body.model_version, None)
                del global_tensors
            if not await self._send_update(self._update_messages(update, info), info):
                self.stats.rounds_missed += 1
                log.warning(
                    "participant %s: no update stream of %s took its update for round %d "
                    "before the round's deadline",
                    self.id,
                    env.job,
                    env.round,
                )
                return Outcome.ACK
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

    async def _send_update(
        self, data: bytes | AsyncGenerator[bytes, None], info: RoundInfo
    ) -> bool:
        """Publish the update into its job's stream (one envelope, or its manifest then
        each part, in order); True once a stream took every message. A publish no binding
        matched (the stream not bound yet, or again: a broker restarting) would leave a
        message in no stream while the participant counts the update as sent, so it is
        published again, after a pause that doubles, until the round's deadline; a message
        no stream took by then ends the sending (ingest refuses the incomplete transfer)."""
        if isinstance(data, bytes):
            return await self._publish_update(data, info)
        async with contextlib.aclosing(data):
            async for message in data:
                if not await self._publish_update(message, info):
                    return False
        return True

    async def _publish_update(self, data: bytes, info: RoundInfo) -> bool:
        """One message of an update, published until a stream takes it (:meth:`_send_update`)."""
        assert self.bus is not None
        pause = UPDATE_RETRY_S
        while not await self.bus.publish(topology.CLIENT, f"update.{info.job}", data):
            if self.clock() + pause > info.deadline:
                return False
            log.info(
                "participant %s: no stream took its update for round %d of %s; again in %.1fs",
                self.id,
                info.round,
                info.job,
                pause,
            )
            await asyncio.sleep(pause)
            pause = min(2 * pause, UPDATE_RETRY_MAX_S)
        return True

    def _make_update(
        self, global_tensors: Mapping[str, np.ndarray], info: RoundInfo
    ) -> LocalUpdate:
        update = self.compute_update(global_tensors, info)
        # bounded before anything is sent (BAD_METRICS): ingest would refuse the update
        update = replace(
            update,
            metrics=check_metrics(update.metrics, "train() metrics"),
            evaluation=None if update.evaluation is None else Evaluation.of(update.evaluation),
        )
        if self.update_transform is not None:
            tensors = self.update_transform(dict(update.tensors), info)
            update = replace(update, tensors=dict(tensors))
        if self.local_dp is not None:  # the last change before the update is signed and sealed
            noised = self.local_dp(update.tensors, job=info.job, round=info.round)
            update = replace(update, tensors=noised)
        return update

    async def _update_messages(
        self, update: LocalUpdate, info: RoundInfo
    ) -> AsyncGenerator[bytes, None]:
        """The encoded messages of ``update``, each made when asked (in a worker thread):
        one ``update`` envelope (:meth:`_encode`), or, for tensors of more than
        ``part_threshold_bytes``, its manifest then its parts
        (:func:`~qflare.messages.parts.encode_update_parts`, sealed for the same readers):
        a few parts' bytes in memory at a time, never the whole encoded update."""
        if sum(np.asarray(t).nbytes for t in update.tensors.values()) <= self.part_threshold_bytes:
            yield await self._encode(update, info)
            return
        messages = encode_update_parts(  # a generator: closed below
            self.kit.identity,
            update.tensors,
            job=info.job,
            round=info.round,
            base_version=info.model_version,
            num_samples=update.num_samples,
            metrics=dict(update.metrics),
            evaluation=update.evaluation,
            seal_to=self.kit.readers if self.seal else None,
            part_values=self.part_values,
        )
        try:
            while (data := await asyncio.to_thread(next, messages, None)) is not None:
                yield data
        finally:
            getattr(messages, "close", lambda: None)()  # a sealed update's spooled parts go

    async def _encode(self, update: LocalUpdate, info: RoundInfo) -> bytes:
        body = Update(
            base_version=info.model_version,
            num_samples=update.num_samples,
            tensors=update.tensors,
            metrics=dict(update.metrics),
            evaluation=update.evaluation,
        )
        seal_to = self.kit.readers if self.seal else None
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
        body = env.body
        reason = body.reason
        if (
            body.model_version is not None
            and body.model_digest is not None
            and body.model_offset is not None
        ):
            try:
                await self._fetch_model(
                    env.job, body.model_version, body.model_digest, body.model_offset
                )
            except TimeoutError:
                log.warning("participant %s: the final model of %s was not read", self.id, env.job)
        self.ended[env.job] = reason
        latest = self.latest_model(env.job)
        if latest is not None and self.model is not None and self.train is not None:
            load_tensors(self.model, latest[1])  # leave the final global model in the user's model
        log.info("participant %s: job %s ended (%s)", self.id, env.job, reason)
        self.ended_event(env.job).set()
        return Outcome.ACK


def _trained(result: Any) -> tuple[int, Mapping[str, float]]:
    """``train``'s answer as (num_samples, metrics): an int, or (int, metrics)."""
    num_samples, metrics = (
        result if isinstance(result, tuple) and len(result) == 2 else (result, {})
    )
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise TypeError(
            "train() must return the number of samples (an int >= 1) or (that number, "
            f"metrics), got {result!r:.80}"
        )
    return num_samples, metrics


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
