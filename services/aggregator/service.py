"""The aggregator's shell around the round state machine (``core.step``,
docs/architecture.md "One round"): each handler decodes a message into the machine's input,
loads the round from the store, steps it, persists the new state (a compare-and-set on the
state it was read in) and then performs the effects the machine returned (publish, alert,
aggregate, append the model, end the job). It decides nothing about the round itself.

Per job: ``privacy.request`` -> (``privacy.granted``) select participants, ``round.opened``
(on ``qflare.events`` for ingest/detector, and into the job's broadcast stream for clients;
it names the base model's offset in the job's model stream, where each version is written
once, and the offset from which the round's updates sit in the update stream) ->
``update.accepted`` (ingest's verdict: client, digest, offset) recorded before the ack ->
``round.closed`` with the exact (client, digest, offset) set, when every selected client is
in or was refused by ingest (``update.rejected``, signed by ingest), or at the deadline ->
(``round.verdict``, at most ``dp_filter_bound`` removals) robust rule + DP noise over the
kept updates, read from the update stream under the digests ingest accepted (read ahead
while the round collects, each written as it arrives into a row of the round's matrix,
docs/architecture.md "The data plane") -> new model version ->
``model.published`` -> next round, until the job's rounds are done or the accountant denies
(``job.ended``, naming the final model's offset).

Metrics (docs/architecture.md "Metrics and round configs"): ``round.opened`` carries the
round's config (the job's ``round_config``, or its function's answer); the kept updates'
training metrics and evaluations are weighted per round (``core.round_metrics``), the job's
``evaluate_fn`` runs on the new model, and both are stored with the model in the round's
verdict and published (``model.published`` metrics ``train/<name>``, ``metrics.evaluated``
of source ``federated`` and ``central``).

A redelivered message steps the machine to no change and no effect, and every transition
is a compare-and-set on the round's stored state, so it is acknowledged without effect. At
start the service steps ``Restart`` on each job's latest round, which re-sends whatever it
waits for (a request, an open round, a closed round, a published model), so a restart after
``kill -9`` picks up where the last commit left off; peers are idempotent too.

Revocation (docs/architecture.md, "Revocation"): the service watches its copy of the
revocation list (``[services.aggregator] crl_path``, default
``<pki_dir>/services/aggregator/crl.qrl``, which ``qflare revoke`` rewrites) and steps every
round with the ids it names; the machine selects none of them and an open round stops
waiting for them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from qflare.bus import Delivery, Outcome, StreamReader, topology
from qflare.messages import (
    Envelope,
    JobEnded,
    MessageRejected,
    MetricsEvaluated,
    ModelPublished,
    PrivacyDenied,
    PrivacyGranted,
    PrivacyRequest,
    RoundClosed,
    RoundOpened,
    RoundVerdict,
    TensorSpec,
    UpdateAccepted,
    UpdateRef,
    UpdateRejected,
)
from qflare.messages.envelope import peek_header
from qflare.messages.models import model_envelopes
from qflare.messages.parts import model_nbytes
from qflare.messages.tensors import Layout, RoundRows, model_digest
from qflare.runtime import Consumer, JobSpec, Service, ServiceContext, event, stateful_consumer
from qflare.runtime.envelopes import broadcast_key, emit
from qflare.runtime.jobs import job_of
from qflare.runtime.metrics import round_entered
from qflare.runtime.modelfile import ModelFile
from qflare.runtime.revocation import RevocationWatch
from qflare.runtime.service import Routes
from qflare.runtime.spill import SpilledRows, next_rows, release, spill_block
from qflare.runtime.updates import PartWriter, Ref, StreamUpdate, UpdateFeed, into_rows
from qflare.services.aggregator.core import (
    Accepted,
    Aggregate,
    Alert,
    Announce,
    Close,
    Denied,
    Effect,
    EndJob,
    Granted,
    Input,
    NextRound,
    Note,
    OpenUnaccounted,
    Publish,
    Refused,
    Reject,
    Report,
    RequestPrivacy,
    Restart,
    Round,
    RoundState,
    Tick,
    Verdict,
    aggregate_matrix,
    aggregate_source,
    begin,
    round_metrics,
    step,
    unknown_round,
)
from qflare.services.aggregator.hooks import HookFailed, JobHooks, load_hooks, reload_hooks
from qflare.services.aggregator.store import AggregatorStore, RoundRow
from qflare.services.detector.core import OutputLayer

#: How long a model append may take to show up in the job's model stream.
MODEL_APPEND_TIMEOUT_S = 30.0
#: Bytes of model versions the aggregator keeps in memory (_models; the last one cached
#: is kept whatever its size).
MODEL_CACHE_BYTES = 256 * 2**20
#: A model version larger than this is never loaded whole (docs/architecture.md, "Large
#: models"): its round is aggregated from its file into the next version's file block by
#: block, and it is published in parts from its file.
MODEL_IN_MEMORY_BYTES = MODEL_CACHE_BYTES


class Aggregator(Service):
    name = "aggregator"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        opts = self.settings.services.aggregator  # checked, defaults filled in
        self.tick_s = opts.tick_s
        self.reopen_interval_s = opts.reopen_interval_s
        self.stream_linger_s = opts.stream_linger_s
        self.rows_budget = opts.rows_in_memory_mb * 2**20
        # the revocation list, re-read on each step: its holders are not selected or waited
        # for (core.step's ``revoked``); at open(), with the trust store
        self.crl: RevocationWatch | None = None
        self.store: AggregatorStore | None = None
        self.specs: dict[str, JobSpec] = {}
        self.hooks: dict[str, JobHooks] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._ended: dict[str, asyncio.Event] = {}
        self._models: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        # (job, version) -> the version's layout and bytes, read from its file's header
        self._shapes: dict[tuple[str, int], tuple[Layout, int]] = {}
        # The job's update stream, read ahead for the rounds still collecting or waiting for
        # their verdict (``_collecting``: (job, round) -> their participants): each update's
        # tensors go as it arrives into a row of the round's matrix (``_rows``: the matrix
        # and the generation of its rows; a row per selected participant in client-id
        # order, the order the aggregation takes), the rest of it into ``_held`` (client ->
        # digest -> the update without its tensors). A verdict uses only the digest ingest
        # accepted; what the read-ahead missed is read again from the stream at the offsets
        # the store recorded. An aggregated round's matrix (clipped in place) is the next
        # round's (``_spare``): its memory is touched already.
        self._feeds: dict[str, UpdateFeed] = {}
        self._collecting: dict[tuple[str, int], frozenset[str]] = {}
        self._rows: dict[tuple[str, int], tuple[RoundRows, int]] = {}
        self._spare: dict[str, RoundRows] = {}
        self._held: dict[tuple[str, int], dict[str, dict[bytes, StreamUpdate]]] = {}
        # The job's model stream, read from "next": the offset of each model this run
        # appends, by the body digest of its envelope.
        self._model_readers: dict[str, StreamReader] = {}
        self._appended: dict[tuple[str, bytes], asyncio.Future[int]] = {}

    def consumers(self) -> list[Consumer]:
        routes: Routes = {
            UpdateAccepted: self.on_update,
            UpdateRejected: self.on_refused,
            RoundVerdict: self.on_verdict,
            PrivacyGranted: self.on_granted,
            PrivacyDenied: self.on_denied,
        }
        return [stateful_consumer(topology.AGGREGATOR_QUEUE, routes, prefetch=32)]

    # -- life cycle -------------------------------------------------------------------------
    async def open(self) -> None:
        self.store = await AggregatorStore.open(self.ctx.data_dir)
        if self.ctx.trust is not None:
            self.crl = RevocationWatch(self.settings.crl_path(self.name), self.ctx.trust, self.log)
        for spec, ended, _reason in await self.store.jobs():
            self.specs[spec.job_id] = spec
            if ended:
                self._ended_event(spec.job_id).set()
            else:
                self.hooks[spec.job_id] = reload_hooks(spec)

    async def started(self) -> None:
        for spec in self.settings.jobs:
            await self.submit_job(spec)
        for job_id in list(self.specs):
            await self._attach(job_id)
            await self._resume(job_id)
        self.spawn(self._ticker(), name="aggregator-ticker")

    async def close(self) -> None:
        for feed in self._feeds.values():
            await feed.stop()
        for reader in self._model_readers.values():
            await reader.cancel()
        if self.store is not None:
            await self.store.close()

    # -- the job's streams ------------------------------------------------------------------
    async def _attach(self, job_id: str) -> None:
        """Declare the job's streams and start reading its update stream (from the earliest
        offset a round not yet published needs) and its model stream (from now on)."""
        assert self.store is not None and self.ctx.identity is not None
        if job_id in self._feeds or await self.store.job_ended(job_id):
            return
        for stream in topology.job_streams(job_id):
            await self.bus.declare_stream(stream)
        latest = await self.store.latest_round(job_id)
        if latest is not None and latest.state in (RoundState.OPEN, RoundState.CLOSED):
            await self._collect(job_id, latest)  # rebuilt from the stream after a restart
        self._model_readers[job_id] = await self.bus.read_stream(
            topology.model_stream(job_id), self._on_model_appended, offset="next", prefetch=4
        )
        assert self.ctx.trust is not None and self.ctx.identity.kem is not None
        feed = UpdateFeed(
            self.bus,
            job_id,
            trust=self.ctx.trust,
            kem_key=self.ctx.identity.kem,
            wants=lambda round_no, sender: sender in self._collecting.get((job_id, round_no), ()),
            sink=lambda update: self._keep(job_id, update),
            log=self.log,
        )
        self._feeds[job_id] = feed
        await feed.start(await self.store.feed_start(job_id))

    async def _collect(self, job_id: str, r: Round | RoundRow) -> None:
        """Round ``r`` (open, or closed and waiting for its verdict) collects: the
        read-ahead keeps its participants' updates, in the rows of its matrix."""
        self._collecting[(job_id, r.round)] = frozenset(r.participants)
        await self._round_rows(job_id, r)

    async def _round_rows(self, job_id: str, r: Round | RoundRow) -> tuple[RoundRows, int]:
        """The matrix of round ``r`` and its generation: a row per selected participant in
        client-id order, in the layout of the round's base model (the job's spare matrix,
        reset, when it has one)."""
        key = (job_id, r.round)
        entry = self._rows.get(key)
        if entry is None:
            layout, _nbytes = await self._shape(job_id, r.base_version)
            clients = sorted(r.participants)
            spare = self._spare.pop(job_id, None)
            folder = self.ctx.data_dir / "rows"
            entry = next_rows(
                spare, folder, self.rows_budget, max(1, len(clients)), clients, layout
            )
            self._rows[key] = entry
        return entry

    def _spend(self, job_id: str, round_no: int) -> None:
        """The round's matrix is used up (clipped in place by its aggregation): it becomes
        the job's spare, and the round keeps nothing read ahead (an aggregation tried again
        reads the stream)."""
        entry = self._rows.pop((job_id, round_no), None)
        if entry is not None:
            old = self._spare.pop(job_id, None)
            if old is not None and old is not entry[0]:
                release(old)
            self._spare[job_id] = entry[0]
        self._held.pop((job_id, round_no), None)

    async def _keep(self, job_id: str, update: StreamUpdate) -> PartWriter | None:
        """Read-ahead sink: a participant's update of a collecting round goes into a row
        of the round's matrix (in a worker thread; an update in parts through the writer
        returned, part by part), the rest of it into ``_held`` (two digests per client at
        most: a client that sends many cannot fill memory)."""
        key = (job_id, update.round)
        entry = self._rows.get(key)
        if entry is None or update.client not in self._collecting.get(key, ()):
            return None
        held = self._held.setdefault(key, {}).setdefault(update.client, {})
        if update.digest not in held:
            if len(held) >= 2:
                return None
            held[update.digest] = dataclasses.replace(update, tensors={})
        rows, generation = entry
        try:
            return await into_rows(rows, update, generation)
        except ValueError as exc:  # not the model's layout: ingest refuses it too
            self.log.debug("read-ahead row refused: %s", exc)
            held.pop(update.digest, None)
            return None

    async def _on_model_appended(self, delivery: Delivery) -> Outcome:
        head = peek_header(delivery.body)
        waiter = self._appended.get((head.job, head.body_digest))
        if waiter is not None and not waiter.done() and delivery.offset is not None:
            waiter.set_result(delivery.offset)
        return Outcome.ACK

    async def _model_offset(self, spec: JobSpec, version: int) -> int:
        """Where model ``version`` sits in the job's model stream: appended (once) the first
        time a round or the job's end names it."""
        assert self.store is not None
        row = await self.store.model(spec.job_id, version)
        assert row is not None
        if row.stream_offset is not None:
            return row.stream_offset
        assert self.ctx.identity is not None
        opts = self.settings.services.aggregator
        source = await self._source(spec.job_id, version)
        envelopes = model_envelopes(
            self.ctx.identity,
            source,
            job=spec.job_id,
            round=row.round,
            version=version,
            digest=row.digest,
            epsilon=row.epsilon,
            threshold=opts.model_part_threshold_bytes,
            part_bytes=opts.model_part_bytes,
        )
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        key: tuple[str, bytes] | None = None
        try:
            # one model.published, or a manifest and its parts: the first names the model
            async for data in envelopes:
                if key is None:
                    key = (spec.job_id, peek_header(data).body_digest)
                    self._appended[key] = waiter
                await self.bus.publish(
                    topology.BROADCAST, broadcast_key(spec.job_id, ModelPublished.KIND), data
                )
            offset = await asyncio.wait_for(waiter, MODEL_APPEND_TIMEOUT_S)
        finally:
            if key is not None:
                self._appended.pop(key, None)
            if isinstance(source, ModelFile):
                source.close()
        await self.store.set_model_offset(spec.job_id, version, offset)
        event(self.log, "model.appended", job=spec.job_id, version=version, offset=offset)
        return offset

    async def submit_job(self, spec: JobSpec, model: dict[str, np.ndarray] | None = None) -> None:
        """Start ``spec`` (idempotent: a job already stored resumes with its stored spec).
        ``model`` gives the version-0 tensors in-process; otherwise ``spec.initial_model``."""
        assert self.store is not None
        async with self._lock(spec.job_id):
            stored = await self.store.job_spec(spec.job_id)
            if stored is not None:
                if stored != spec:
                    event(
                        self.log,
                        "job.spec_differs",
                        logging.WARNING,
                        job=spec.job_id,
                        note="running the stored spec; use a new job id to change it",
                    )
                self.specs[spec.job_id] = stored
                return
            hooks = await asyncio.to_thread(load_hooks, spec)  # PluginError naming the key
            if model is None:
                if spec.initial_model is None:
                    raise ValueError(
                        f"job {spec.job_id!r} needs initial_model (a safetensors file)"
                    )
                # read from its file a range at a time: a large model is copied into the
                # store, never loaded whole
                with await asyncio.to_thread(ModelFile.open, spec.initial_model) as f:
                    _check_output_layer(spec, f.layout)
                    if f.nbytes > MODEL_IN_MEMORY_BYTES:
                        await self.store.add_job(spec, f, await asyncio.to_thread(f.digest))
                    else:
                        tensors = await asyncio.to_thread(f.tensors)
                        await self.store.add_job(spec, tensors, model_digest(tensors))
            else:
                model = {k: np.ascontiguousarray(v) for k, v in model.items()}
                _check_output_layer(spec, Layout.of(model))
                await self.store.add_job(spec, model, model_digest(model))
            self.specs[spec.job_id] = spec
            self.hooks[spec.job_id] = hooks
            event(self.log, "job.submitted", **spec.public())
        if self.running:
            await self._attach(spec.job_id)
            await self._resume(spec.job_id)

    async def wait_job(self, job_id: str, timeout: float | None = None) -> str | None:
        """Wait until ``job_id`` ends; returns its end reason."""
        await asyncio.wait_for(self._ended_event(job_id).wait(), timeout)
        assert self.store is not None
        for spec, _ended, reason in await self.store.jobs():
            if spec.job_id == job_id:
                return reason
        return None

    # -- dispatch: decode, step the round, persist, perform ----------------------------------
    async def on_granted(self, env: Envelope[PrivacyGranted]) -> None:
        spec = job_of(self.specs, env.job)
        async with self._lock(spec.job_id):
            await self._grant(spec, env.round, env.body.epsilon_total)

    async def on_denied(self, env: Envelope[PrivacyDenied]) -> None:
        body = env.body
        denied = Denied(body.reason, body.epsilon_spent, body.budget)
        await self._step(job_of(self.specs, env.job), env.round, denied)

    async def on_update(self, env: Envelope[UpdateAccepted]) -> None:
        body = env.body
        accepted = Accepted(
            body.client, body.update_digest, body.offset, body.num_samples, body.base_version
        )
        feed = self._feeds.get(env.job)
        if feed is not None:  # a read-ahead far behind (a flood) jumps to what is vouched
            feed.vouched(Ref(body.client, body.update_digest, body.offset))
        await self._step(job_of(self.specs, env.job), env.round, accepted)

    async def on_refused(self, env: Envelope[UpdateRejected]) -> None:
        # ingest reports every refusal, also for jobs and rounds that are not ours (or not
        # open); the machine counts only a selected client of an open round
        spec = self.specs.get(env.job)
        if spec is not None:
            await self._step(spec, env.round, Refused(env.body.client, str(env.body.reason)))

    async def on_verdict(self, env: Envelope[RoundVerdict]) -> None:
        body = env.body
        verdict = Verdict(tuple(body.kept), tuple((f.client, float(f.score)) for f in body.flagged))
        await self._step(job_of(self.specs, env.job), env.round, verdict)

    async def _grant(self, spec: JobSpec, round_no: int, epsilon: float) -> None:
        """Step ``Granted``: every update of the round is written after round.opened goes
        out, so no earlier than where the read-ahead stands now (a lower bound is all
        readers need). Caller holds the job lock."""
        assert self.store is not None
        feed = self._feeds.get(spec.job_id)
        updates_from = (feed.next_offset if feed is not None else 0) or await self.store.feed_start(
            spec.job_id
        )
        await self._step_locked(spec, round_no, Granted(epsilon, updates_from))

    async def _step(self, spec: JobSpec, round_no: int, event: Input) -> None:
        async with self._lock(spec.job_id):
            await self._step_locked(spec, round_no, event)

    async def _step_locked(self, spec: JobSpec, round_no: int, event: Input) -> None:
        """Load the round, step the machine (``core.step``), persist the new state (a
        compare-and-set on the state it was read in), then perform the effects. A
        redelivered message steps to no change and no effect. Caller holds the job lock."""
        assert self.store is not None
        r = await self.store.load_round(spec.job_id, round_no)
        if r is None:
            for effect in unknown_round(spec, round_no, event):
                if isinstance(effect, Reject):
                    raise MessageRejected(effect.reason, effect.detail)
            return
        new, effects = step(spec, r, event, self.ctx.clock(), self._revoked())
        if await self._commit(spec, r, new, effects):
            if new.state != r.state:
                round_entered(self.name, spec.job_id, new.round, new.state.value)
            await self._perform(spec, new, effects)

    async def _commit(
        self, spec: JobSpec, old: Round, new: Round, effects: tuple[Effect, ...]
    ) -> bool:
        """Persist the step; False when the stored round had moved (nothing to perform)."""
        assert self.store is not None
        command = next((e for e in effects if isinstance(e, Aggregate)), None)
        if command is not None:
            return await self._aggregate(spec, new, command)
        if new == old:
            return True
        if not await self.store.save_round(old, new):
            return False
        if new.state == RoundState.OPEN:
            await self._collect(spec.job_id, new)
        return True

    async def _perform(self, spec: JobSpec, r: Round, effects: tuple[Effect, ...]) -> None:
        """The effects of a committed step, in order."""
        for effect in effects:
            match effect:
                case Note():
                    fields: dict[str, Any] = {"job": spec.job_id, "round": r.round}
                    event(self.log, effect.event, **fields | dict(effect.fields))
                case RequestPrivacy():
                    request = PrivacyRequest(
                        q=effect.q, z=effect.z, clip=effect.clip, coverage=effect.coverage
                    )
                    await emit(self, "privacy.request", request, job=spec.job_id, round=r.round)
                case OpenUnaccounted():
                    # DP off: nothing to account; epsilon is unbounded and reported as such
                    await self._grant(spec, r.round, math.inf)
                case Announce():
                    await self._announce_open(spec, r.round, effect)
                case Close():
                    closed = RoundClosed(
                        updates=[
                            UpdateRef(client=c, digest=d, offset=o) for c, d, o in effect.updates
                        ],
                        malformed=effect.malformed,
                    )
                    await emit(self, "round.closed", closed, job=spec.job_id, round=r.round)
                case Aggregate():
                    pass  # performed by the commit: the model is stored with the state
                case Publish():
                    await self._announce_published(spec, effect.version)
                case NextRound():
                    await self._begin(spec, effect.round, effect.base_version)
                case EndJob():
                    await self._end(spec, r.round, effect.reason, effect.detail)
                case Alert():
                    await self.alert(
                        kind=effect.kind,
                        severity=effect.severity,
                        job=spec.job_id,
                        round=r.round,
                        reason=effect.reason,
                        detail=effect.detail,
                        client=effect.client,
                    )
                case Reject():
                    raise MessageRejected(effect.reason, effect.detail)

    async def _begin(self, spec: JobSpec, round_no: int, base_version: int) -> None:
        """Create round ``round_no`` (REQUESTED; a round stored already stays) at the clip
        norm the previous round's aggregation stored for it (round 1: the job's) and request
        it. Caller holds the job lock."""
        assert self.store is not None
        clip = await self.store.next_clip(spec.job_id, round_no - 1) if round_no > 1 else None
        r, effects = begin(spec, round_no, base_version, self.ctx.clock(), clip=clip)
        if await self.store.request_round(
            spec.job_id, round_no, base_version=base_version, clip=r.clip
        ):
            round_entered(self.name, spec.job_id, round_no, r.state.value)
        await self._perform(spec, r, effects)

    # -- aggregation --------------------------------------------------------------------------
    async def _aggregate(self, spec: JobSpec, r: Round, command: Aggregate) -> bool:
        """The ``Aggregate`` effect, performed as the commit of its step: the new model is
        stored in the same transaction that marks the round PUBLISHED (a compare-and-set on
        CLOSED: False for a verdict handled already)."""
        assert self.store is not None
        _layout, nbytes = await self._shape(spec.job_id, command.base_version)
        if nbytes > MODEL_IN_MEMORY_BYTES:
            return await self._aggregate_files(spec, r, command)
        base = await self._model(spec.job_id, command.base_version)
        rows, updates = await self._kept_rows(spec, r, command)

        def run() -> Any:
            refs = [(c, d) for c, d, _o in command.updates]
            if isinstance(rows, SpilledRows):  # block by block: the same model, bit for bit
                clients, src = rows.source(refs)
                block = spill_block(self.rows_budget, len(clients))
                return aggregate_source(spec, command, base, clients, src, block)
            clients, x = rows.matrix(refs)
            return aggregate_matrix(spec, command, base, clients, x)

        try:
            result = await asyncio.to_thread(run)
        finally:
            self._spend(spec.job_id, command.round)
        published = await self._publish_result(
            spec, r, command, updates, result, result.model, model_digest(result.model)
        )
        if published:
            self._cache_model((spec.job_id, command.round), result.model)
        return published

    async def _aggregate_files(self, spec: JobSpec, r: Round, command: Aggregate) -> bool:
        """:meth:`_aggregate` for a model too large to hold: the base version read from its
        file, the new one written into its own (committed with the round's PUBLISHED state),
        the combined vector kept in a scratch file; the same model, bit for bit."""
        assert self.store is not None
        row = await self.store.model(spec.job_id, command.base_version)
        assert row is not None
        base = await self.store.open_model(row)
        folder = self.ctx.data_dir / "rows"
        try:
            rows, updates = await self._kept_rows(spec, r, command)
            out = ModelFile.create(self.store.model_path(spec.job_id, command.round), base.layout)
            scratch = ModelFile.create(
                folder / f"combined-{spec.job_id}-{command.round}",
                Layout(("combined",), ((base.layout.size,),), ("float32",)),
            )

            def run() -> Any:
                refs = [(c, d) for c, d, _o in command.updates]
                if isinstance(rows, SpilledRows):
                    clients, src = rows.source(refs)
                else:
                    clients, src = rows.matrix(refs)
                block = spill_block(self.rows_budget, len(clients))
                return aggregate_source(
                    spec, command, base, clients, src, block, out=out, scratch=scratch
                )

            try:
                result = await asyncio.to_thread(run)
                digest = await asyncio.to_thread(out.digest)
                whole = await asyncio.to_thread(out.tensors) if spec.evaluate_fn else {}
            except BaseException:
                out.discard()
                raise
            finally:
                scratch.discard()
                self._spend(spec.job_id, command.round)
            try:
                return await self._publish_result(
                    spec, r, command, updates, result, out, digest, whole
                )
            finally:
                if out.writing:  # not stored: nothing half-written stays
                    out.discard()
                else:
                    out.close()
        finally:
            base.close()

    async def _publish_result(
        self,
        spec: JobSpec,
        r: Round,
        command: Aggregate,
        updates: Mapping[str, StreamUpdate],
        result: Any,
        model: dict[str, np.ndarray] | ModelFile,
        digest: bytes,
        evaluated: Mapping[str, np.ndarray] | None = None,
    ) -> bool:
        """Store the round's new model with its PUBLISHED state and verdict (False when the
        round was published already: a redelivered verdict)."""
        assert self.store is not None
        reports = [Report(c, u.num_samples, u.metrics, u.evaluation) for c, u in updates.items()]
        metrics = round_metrics(reports, command.base_version)
        whole = evaluated if evaluated is not None else model
        assert not isinstance(whole, ModelFile)
        central = await self._evaluate(spec, command.round, whole)
        if central is not None:
            metrics["central"] = central
        verdict = {
            "kept": list(command.kept),
            "flagged": list(command.removed),
            "step_norm": result.update_norm,
            "metrics": metrics,
        }
        stored = await self.store.publish_model(
            spec.job_id,
            command.round,
            command.round,
            model,
            digest,
            r.epsilon or 0.0,
            verdict,
            next_clip=result.next_clip,
        )
        if not stored:
            return False
        self._collecting.pop((spec.job_id, command.round), None)
        return True

    async def _evaluate(
        self, spec: JobSpec, version: int, model: Mapping[str, np.ndarray]
    ) -> dict[str, Any] | None:
        """The job's ``evaluate_fn`` on model ``version`` (None: the job has none), in a
        worker thread; a failure is stored as ``error`` and alerted, never fatal."""
        hooks = self._hooks(spec)
        if spec.evaluate_fn is None:
            return None
        try:
            config = await asyncio.to_thread(hooks.round_config, version)
            evaluation = await asyncio.to_thread(hooks.evaluate, version, model, config)
        except HookFailed as exc:
            await self._hook_failed(spec, version, "evaluate_fn.failed", "warning", exc)
            return {"model_version": version, "error": str(exc)[:1000]}
        assert evaluation is not None
        return {"model_version": version, **evaluation.model_dump()}

    async def _hook_failed(
        self, spec: JobSpec, round_no: int, kind: str, severity: str, exc: HookFailed
    ) -> None:
        """Alert that one of the job's plug-ins failed (the detail names it and why)."""
        await self.alert(
            kind=kind,
            severity=severity,
            job=spec.job_id,
            round=round_no,
            reason=HookFailed.reason,
            detail=str(exc)[:4000],
        )

    async def _kept_rows(
        self, spec: JobSpec, r: Round, command: Aggregate
    ) -> tuple[RoundRows, dict[str, StreamUpdate]]:
        """The round's matrix holding a row of each kept update, each under the digest
        ingest accepted, and those updates without their tensors: from the read-ahead
        (waited for while it is still decoding them), or read again from the stream at the
        recorded offsets (after a restart, the whole round)."""
        rows, _generation = await self._round_rows(spec.job_id, r)
        held = self._held.setdefault((spec.job_id, command.round), {})
        refs = [Ref(c, d, o) for c, d, o in command.updates]

        def missing() -> list[Ref]:
            return [
                ref
                for ref in refs
                if (ref.client, ref.digest) not in rows
                or ref.digest not in held.get(ref.client, {})
            ]

        rest = missing()
        feed = self._feeds[spec.job_id]
        if rest and await feed.wait_past(max(ref.offset for ref in rest)):
            rest = missing()
        if rest:
            event(
                self.log, "updates.rereading", job=spec.job_id, round=command.round, count=len(rest)
            )

            async def sink(update: StreamUpdate) -> PartWriter | None:
                # one update's tensors (or one part) in memory at a time, into its row
                return await into_rows(rows, update)

            for update in (await feed.fetch(command.round, rest, sink=sink)).values():
                held.setdefault(update.client, {})[update.digest] = update  # tensors dropped
        return rows, {c: held[c][d] for c, d, _o in command.updates}

    # -- announcements ------------------------------------------------------------------------
    async def _announce_open(self, spec: JobSpec, round_no: int, a: Announce) -> None:
        assert self.store is not None
        try:
            config = await asyncio.to_thread(self._hooks(spec).round_config, round_no)
        except HookFailed as exc:
            # no config, no round: the participants would train without what the job says
            await self._hook_failed(spec, round_no, "round_config.failed", "critical", exc)
            await self._end(spec, round_no, "round_config_failed", str(exc)[:4000])
            return
        layout, _nbytes = await self._shape(spec.job_id, a.base_version)
        row = await self.store.model(spec.job_id, a.base_version)
        assert row is not None
        body = RoundOpened(
            model_version=a.base_version,
            model_digest=row.digest,
            participants=list(a.participants),
            deadline=a.deadline,
            min_updates=a.min_updates,
            clip_norm=a.clip,
            tensor_spec=[
                TensorSpec.model_validate({"name": n, "dtype": d, "shape": list(s)})
                for n, s, d in zip(layout.names, layout.shapes, layout.dtypes, strict=True)
            ],
            rule=spec.rule,
            model_offset=await self._model_offset(spec, a.base_version),
            updates_from=a.updates_from,
            config=config,
        )
        await emit(self, "round.opened", body, job=spec.job_id, round=round_no)
        if a.broadcast:
            # into the job's broadcast stream: a participant that starts later reads it there
            await emit(
                self,
                "round.opened",
                body,
                job=spec.job_id,
                round=round_no,
                exchange=topology.BROADCAST,
            )

    async def _announce_published(self, spec: JobSpec, version: int) -> None:
        assert self.store is not None
        row = await self.store.model(spec.job_id, version)
        r = await self.store.get_round(spec.job_id, row.round if row is not None else version)
        assert row is not None and r is not None
        verdict = r.verdict or {}
        measured = verdict.get("metrics", {})
        train = measured.get("train", {})
        metrics = {
            "kept": float(len(verdict.get("kept", []))),
            "flagged": float(len(verdict.get("flagged", []))),
            "step_norm": float(verdict.get("step_norm", 0.0)),
            # the clip norm the round ran at, and the one the next round runs at (they
            # differ with adaptive clipping: an operator sees it adapt)
            "clip": r.clip if r.clip is not None else spec.clip,
            "next_clip": r.next_clip if r.next_clip is not None else spec.clip,
            **({"train/num_samples": float(train["num_samples"])} if train else {}),
            **{f"train/{k}": v for k, v in train.get("metrics", {}).items()},
        }
        body = ModelPublished(
            version=row.version, digest=row.digest, epsilon=row.epsilon, metrics=metrics
        )
        await emit(self, "model.published", body, job=spec.job_id, round=r.round)
        for source, key in (("federated", "evaluate"), ("central", "central")):
            evaluated = measured.get(key)
            if evaluated is not None and "loss" in evaluated:
                await emit(
                    self,
                    "metrics.evaluated",
                    evaluated_body(evaluated, source),
                    job=spec.job_id,
                    round=r.round,
                )

    async def _end(self, spec: JobSpec, round_no: int, reason: str, detail: str) -> None:
        """Announce the end (final model, job.ended), then mark the job ended: a failed
        publish leaves it unmarked, so the next nudge announces it again."""
        assert self.store is not None
        latest = await self.store.latest_model(spec.job_id)
        final: dict[str, Any] = {}
        if latest is not None:
            final = {
                "model_version": latest.version,
                "model_digest": latest.digest,
                "model_offset": await self._model_offset(spec, latest.version),
            }
        body = JobEnded(reason=reason, detail=detail, **final)
        await emit(self, "job.ended", body, job=spec.job_id, round=round_no)
        await emit(
            self, "job.ended", body, job=spec.job_id, round=round_no, exchange=topology.BROADCAST
        )
        await self.store.end_job(spec.job_id, reason)
        for key in [k for k in self._held if k[0] == spec.job_id]:
            del self._held[key]
        for key in [k for k in self._collecting if k[0] == spec.job_id]:
            del self._collecting[key]
        for key in [k for k in self._rows if k[0] == spec.job_id]:
            release(self._rows.pop(key)[0])
        spare = self._spare.pop(spec.job_id, None)
        if spare is not None:
            release(spare)
        event(self.log, "job.ended", job=spec.job_id, round=round_no, reason=reason)
        self._ended_event(spec.job_id).set()
        self.spawn(self._retire(spec.job_id), name=f"retire-{spec.job_id}")

    async def _retire(self, job_id: str) -> None:
        """After a job ended: stop reading its streams and delete them: the update stream at
        once (every update the job used is aggregated into a stored model), the model and
        broadcast streams after ``stream_linger_s`` (participants read the final model)."""
        feed = self._feeds.pop(job_id, None)
        if feed is not None:
            await feed.stop()
        reader = self._model_readers.pop(job_id, None)
        if reader is not None:
            await reader.cancel()
        await self.bus.delete_stream(topology.update_stream(job_id).name)
        await asyncio.sleep(self.stream_linger_s)
        await self.bus.delete_stream(topology.model_stream(job_id).name)
        await self.bus.delete_stream(topology.broadcast_stream(job_id).name)
        event(self.log, "job.streams_deleted", job=job_id)

    # -- restart and timers -------------------------------------------------------------------
    async def _resume(self, job_id: str, *, stale_after: float | None = None) -> None:
        """At start (``stale_after`` None) step ``Restart`` on the job's latest round: it
        re-sends whatever the round waits for (the first round is begun here). From the
        ticker, step ``Tick(remind_after=stale_after)``: an open round checks its deadline
        and is announced again on events; another re-sends what it waits for once its state
        has not moved for ``stale_after`` seconds (a publish lost to a broker outage). Every
        peer is idempotent on (job, round), so a repeat costs a message, never an effect."""
        assert self.store is not None
        spec = self.specs[job_id]
        async with self._lock(job_id):
            if await self.store.job_ended(job_id):
                self._ended_event(job_id).set()
                return
            latest = await self.store.latest_round(job_id)
            if latest is None:
                if stale_after is None:
                    await self._begin(spec, 1, base_version=0)
                return
            tick: Input = Restart() if stale_after is None else Tick(remind_after=stale_after)
            await self._step_locked(spec, latest.round, tick)

    async def _ticker(self) -> None:
        """Deadlines; every ``reopen_interval_s`` a pass that re-announces open rounds (so
        that an ingest replica started mid-round learns them) and nudges rounds stuck because
        a publish was lost."""
        assert self.store is not None
        last_announce = self.ctx.clock()
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                if self.ctx.clock() - last_announce >= self.reopen_interval_s:
                    last_announce = self.ctx.clock()
                    for job_id in list(self.specs):
                        await self._resume(job_id, stale_after=self.reopen_interval_s)
                    continue
                for r in await self.store.open_rounds():
                    spec = self.specs.get(r.job_id)
                    if spec is not None and not self._ended_event(r.job_id).is_set():
                        await self._step(spec, r.round, Tick())
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.warning("ticker pass failed; retrying", exc_info=True)

    # -- helpers --------------------------------------------------------------------------------
    def _revoked(self) -> frozenset[str]:
        """The ids the revocation list names, its file re-read if it changed (a stat per
        step: ``qflare revoke`` takes effect by the next tick)."""
        if self.crl is None:
            return frozenset()
        self.crl.reload()
        return self.crl.holders

    def _lock(self, job_id: str) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    def _ended_event(self, job_id: str) -> asyncio.Event:
        return self._ended.setdefault(job_id, asyncio.Event())

    def _hooks(self, spec: JobSpec) -> JobHooks:
        hooks = self.hooks.get(spec.job_id)
        if hooks is None:
            hooks = self.hooks[spec.job_id] = reload_hooks(spec)
        return hooks

    async def _model(self, job_id: str, version: int) -> dict[str, np.ndarray]:
        key = (job_id, version)
        cached = self._models.get(key)
        if cached is not None:
            return cached
        assert self.store is not None
        row = await self.store.model(job_id, version)
        if row is None:
            raise LookupError(f"no model version {version} of job {job_id}")
        model = await self.store.load_model(row)
        self._cache_model(key, model)
        return model

    async def _shape(self, job_id: str, version: int) -> tuple[Layout, int]:
        """The layout and bytes of model ``version`` (from memory, or its file's header)."""
        key = (job_id, version)
        known = self._shapes.get(key)
        if known is None:
            cached = self._models.get(key)
            if cached is not None:
                known = (Layout.of(cached), model_nbytes(cached))
            else:
                assert self.store is not None
                row = await self.store.model(job_id, version)
                if row is None:
                    raise LookupError(f"no model version {version} of job {job_id}")
                with await self.store.open_model(row) as f:
                    known = (f.layout, f.nbytes)
            self._shapes[key] = known
        return known

    async def _source(self, job_id: str, version: int) -> dict[str, np.ndarray] | ModelFile:
        """Model ``version`` in memory, or, past MODEL_IN_MEMORY_BYTES, its file open for
        range reads (the caller closes it)."""
        _layout, nbytes = await self._shape(job_id, version)
        if nbytes <= MODEL_IN_MEMORY_BYTES:
            return await self._model(job_id, version)
        assert self.store is not None
        row = await self.store.model(job_id, version)
        assert row is not None
        return await self.store.open_model(row)

    def _cache_model(self, key: tuple[str, int], model: dict[str, np.ndarray]) -> None:
        """Keep ``model`` for the next use (a round's base, its announcement, the next
        aggregation), and as many of the most recently cached ones as fit in
        MODEL_CACHE_BYTES besides: never fewer than the one just cached, so a large model
        is held once, not once per version."""
        self._models.pop(key, None)
        self._models[key] = model
        total = sum(model_nbytes(m) for m in self._models.values())
        while len(self._models) > 1 and total > MODEL_CACHE_BYTES:
            total -= model_nbytes(self._models.pop(next(iter(self._models))))


def evaluated_body(evaluated: Mapping[str, Any], source: str) -> MetricsEvaluated:
    """``metrics.evaluated`` for a stored evaluation (``round_metrics``' ``evaluate`` or the
    central one): its ``accuracy`` metric, when in [0, 1], is the body's accuracy too."""
    metrics = dict(evaluated.get("metrics", {}))
    accuracy = metrics.get("accuracy")
    return MetricsEvaluated(
        model_version=int(evaluated["model_version"]),
        accuracy=accuracy if accuracy is not None and 0.0 <= accuracy <= 1.0 else None,
        loss=float(evaluated["loss"]),
        num_examples=int(evaluated.get("num_examples", 0)),
        metrics=metrics,
        source=source,  # type: ignore[arg-type]
        clients=int(evaluated.get("clients", 0)),
    )


def _check_output_layer(spec: JobSpec, layout: Layout) -> None:
    """A job whose ``output_layer`` the model does not have (or not as [classes, hidden] and
    [classes]) is refused at submission: label consistency would otherwise be off for it,
    said only in the detector's log."""
    if spec.output_layer is None:
        return
    try:
        OutputLayer.of(layout, spec.output_layer)
    except ValueError as exc:
        raise ValueError(f"job {spec.job_id!r}: {exc}") from None


def build(ctx: ServiceContext) -> Service:
    return Aggregator(ctx)
