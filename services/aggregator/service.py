"""The aggregator's shell: the round state machine over the bus (docs/architecture.md,
"One round").

Per job: ``privacy.request`` -> (``privacy.granted``) select participants, ``round.opened``
(on ``qflare.events`` for ingest/detector, and into the job's broadcast stream for clients;
it names the base model's offset in the job's model stream, where each version is written
once, and the offset from which the round's updates sit in the update stream) ->
``update.accepted`` (ingest's verdict: client, digest, offset) recorded before the ack ->
``round.closed`` with the exact (client, digest, offset) set, when every selected client is
in or was refused by ingest (``update.rejected``, signed by ingest), or at the deadline ->
(``round.verdict``, at most ``dp_filter_bound`` removals) robust rule + DP noise over the
kept updates, read from the update stream under the digests ingest accepted (read ahead
while the round collects, docs/architecture.md "The data plane") -> new model version ->
``model.published`` -> next round, until the job's rounds are done or the accountant denies
(``job.ended``, naming the final model's offset).

Every handler is idempotent on its natural key and every transition is a compare-and-set
on the round's stored state, so a redelivered message is acknowledged without effect. At
start the service re-announces whatever its stored rounds wait for (a request, an open
round, a closed round, a published model), so a restart after ``kill -9`` picks up where
the last commit left off; peers are idempotent too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load

from qflare.bus import Delivery, Outcome, StreamReader, topology
from qflare.messages import (
    Body,
    Envelope,
    JobEnded,
    MessageRejected,
    ModelPublished,
    PrivacyDenied,
    PrivacyGranted,
    PrivacyRequest,
    Reason,
    RoundClosed,
    RoundOpened,
    RoundVerdict,
    TensorSpec,
    UpdateAccepted,
    UpdateRef,
    UpdateRejected,
)
from qflare.messages.envelope import peek_header
from qflare.messages.tensors import Layout, model_digest
from qflare.privacy.policy import charge_of
from qflare.runtime import Consumer, JobSpec, Service, ServiceContext, event, stateful_queue
from qflare.runtime.envelopes import broadcast_key, emit, seal
from qflare.runtime.jobs import check_model_size
from qflare.runtime.service import Routes
from qflare.runtime.updates import Ref, StreamUpdate, UpdateFeed
from qflare.services.aggregator.core import (
    CloseDecision,
    RoundState,
    aggregate_round,
    cap_removals,
    close_decision,
    select_participants,
)
from qflare.services.aggregator.store import AggregatorStore, RoundRow

QUEUE = "aggregator"
#: How long a model append may take to show up in the job's model stream.
MODEL_APPEND_TIMEOUT_S = 30.0


class Aggregator(Service):
    name = "aggregator"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        opts = self.settings.options(self.name)
        self.tick_s = float(opts.get("tick_s", 0.2))
        self.reopen_interval_s = float(opts.get("reopen_interval_s", 3.0))
        self.stream_linger_s = float(opts.get("stream_linger_s", 60.0))
        self.store: AggregatorStore | None = None
        self.specs: dict[str, JobSpec] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._ended: dict[str, asyncio.Event] = {}
        self._models: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        # The job's update stream, read ahead: (job, round) -> client -> digest -> tensors of
        # the rounds still collecting or waiting for their verdict (``_collecting``: their
        # participants). A verdict uses only the digest ingest accepted; what the read-ahead
        # missed is read again from the stream at the offsets the store recorded.
        self._feeds: dict[str, UpdateFeed] = {}
        self._collecting: dict[tuple[str, int], frozenset[str]] = {}
        self._held: dict[tuple[str, int], dict[str, dict[bytes, Mapping[str, np.ndarray]]]] = {}
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
        return [Consumer(stateful_queue(QUEUE, routes), routes=routes, prefetch=32)]

    # -- life cycle -------------------------------------------------------------------------
    async def open(self) -> None:
        self.store = await AggregatorStore.open(self.ctx.data_dir)
        for spec, ended, _reason in await self.store.jobs():
            self.specs[spec.job_id] = spec
            if ended:
                self._ended_event(spec.job_id).set()

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
            self._collecting[(job_id, latest.round)] = frozenset(latest.participants)
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

    async def _keep(self, job_id: str, update: StreamUpdate) -> None:
        """Read-ahead sink: keep a participant's update of a collecting round (two digests
        per client at most: a client that sends many cannot fill memory)."""
        key = (job_id, update.round)
        if update.client in self._collecting.get(key, ()):
            held = self._held.setdefault(key, {}).setdefault(update.client, {})
            if len(held) < 2:
                held[update.digest] = update.tensors

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
        tensors = await self._model(spec.job_id, version)
        body = ModelPublished(
            version=version, digest=row.digest, epsilon=row.epsilon, tensors=tensors
        )
        data = await seal(self, ModelPublished.KIND, body, job=spec.job_id, round=row.round)
        key = (spec.job_id, peek_header(data).body_digest)
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._appended[key] = waiter
        try:
            await self.bus.publish(
                topology.BROADCAST, broadcast_key(spec.job_id, ModelPublished.KIND), data
            )
            offset = await asyncio.wait_for(waiter, MODEL_APPEND_TIMEOUT_S)
        finally:
            self._appended.pop(key, None)
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
            if model is None:
                if spec.initial_model is None:
                    raise ValueError(
                        f"job {spec.job_id!r} needs initial_model (a safetensors file)"
                    )
                model = st_load(Path(spec.initial_model).read_bytes())
            model = {k: np.ascontiguousarray(v) for k, v in model.items()}
            check_model_size(
                spec.job_id, model
            )  # before storing: a job that cannot run is not kept
            await self.store.add_job(spec, model, model_digest(model))
            self.specs[spec.job_id] = spec
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

    # -- dispatch ---------------------------------------------------------------------------
    def _job(self, env: Envelope[Body]) -> JobSpec:
        spec = self.specs.get(env.job)
        if spec is None:
            raise MessageRejected(Reason.WRONG_JOB, f"no job {env.job!r} here")
        return spec

    async def on_refused(self, env: Envelope[UpdateRejected]) -> None:
        # ingest reports every refusal, also for jobs and rounds that are not ours (or not
        # open); only a refusal of a selected client of an open round counts
        spec = self.specs.get(env.job)
        if spec is not None:
            await self._on_refused(spec, env)

    async def on_update(self, env: Envelope[UpdateAccepted]) -> None:
        await self._on_update(self._job(env), env)

    async def on_verdict(self, env: Envelope[RoundVerdict]) -> None:
        await self._on_verdict(self._job(env), env)

    async def on_granted(self, env: Envelope[PrivacyGranted]) -> None:
        spec = self._job(env)
        async with self._lock(spec.job_id):
            await self._open_round(spec, env.round, env.body.epsilon_total)

    # -- privacy ----------------------------------------------------------------------------
    async def _open_round(self, spec: JobSpec, round_no: int, epsilon: float) -> None:
        """REQUESTED -> OPEN: select participants, set the deadline, announce. Caller holds
        the job lock."""
        assert self.store is not None
        r = await self.store.get_round(spec.job_id, round_no)
        if r is None or r.state != RoundState.REQUESTED:
            return  # redelivered grant: the round moved on already
        participants = select_participants(
            spec.participants, spec.sample_rate, spec.seed, spec.job_id, round_no
        )
        deadline = self.ctx.clock() + spec.deadline_s
        # every update of this round is written after round.opened goes out, so no later
        # than where the read-ahead stands now (a lower bound is all readers need)
        feed = self._feeds[spec.job_id]
        updates_from = feed.next_offset or await self.store.feed_start(spec.job_id)
        await self.store.transition(
            spec.job_id,
            round_no,
            RoundState.REQUESTED,
            RoundState.OPEN,
            participants=participants,
            deadline=deadline,
            epsilon=epsilon,
            updates_from=updates_from,
        )
        self._collecting[(spec.job_id, round_no)] = frozenset(participants)
        r = await self.store.get_round(spec.job_id, round_no)
        assert r is not None
        event(
            self.log,
            "round.opened",
            job=spec.job_id,
            round=r.round,
            participants=len(participants),
            epsilon=epsilon,
        )
        await self._announce_open(spec, r, broadcast=True)

    async def on_denied(self, env: Envelope[PrivacyDenied]) -> None:
        assert self.store is not None
        spec = self._job(env)
        async with self._lock(spec.job_id):
            r = await self.store.get_round(spec.job_id, env.round)
            if r is None or r.state != RoundState.REQUESTED:
                return
            await self.store.transition(
                spec.job_id, env.round, RoundState.REQUESTED, RoundState.DENIED
            )
            body = env.body
            await self.alert(
                kind="budget.exhausted",
                severity="warning",
                job=spec.job_id,
                round=env.round,
                reason=body.reason,
                detail=f"epsilon spent {body.epsilon_spent:.4g} of {body.budget:.4g}; round {env.round} not released",
            )
            await self._end(
                spec,
                env.round,
                "budget_exhausted",
                f"accountant denied round {env.round}: {body.reason}",
            )

    # -- updates ----------------------------------------------------------------------------
    async def _on_update(self, spec: JobSpec, env: Envelope[UpdateAccepted]) -> None:
        assert self.store is not None
        body = env.body
        r = await self.store.get_round(spec.job_id, env.round)
        if r is None or r.state == RoundState.REQUESTED:
            raise MessageRejected(
                Reason.STALE_ROUND, f"round {env.round} of {spec.job_id} is not open"
            )
        mine = body.update_digest
        if r.state != RoundState.OPEN:
            held = await self.store.held(spec.job_id, env.round, body.client)
            if held is not None and held[0] == mine:
                return  # the same update again (a redelivery, or ingest checked it twice)
            if held is not None:
                raise MessageRejected(
                    Reason.DUPLICATE, f"{body.client} already has an update in round {env.round}"
                )
            raise MessageRejected(
                Reason.ROUND_CLOSED,
                f"update of {body.client} for round {env.round} after it closed",
            )
        if body.client not in r.participants:
            raise MessageRejected(
                Reason.NOT_PARTICIPANT, f"{body.client} is not selected for round {env.round}"
            )
        if body.base_version != r.base_version:
            raise MessageRejected(
                Reason.STALE_BASE,
                f"update on version {body.base_version}, round uses {r.base_version}",
            )
        held = await self.store.add_update(
            spec.job_id, env.round, body.client, body.update_digest, body.offset, body.num_samples
        )
        if held is not None:
            # The same digest again is the same update (a redelivered verdict, or ingest
            # checking it twice after a restart); another digest for the client is a second
            # submission.
            if held[0] == mine:
                return
            raise MessageRejected(
                Reason.DUPLICATE, f"{body.client} already has an update in round {env.round}"
            )
        async with self._lock(spec.job_id):
            now = await self.store.get_round(spec.job_id, env.round)
            in_set = now is not None and (
                now.state == RoundState.OPEN
                or any(
                    c == body.client and d == body.update_digest
                    for c, d, _o in now.closed_set or ()
                )
            )
            if not in_set:
                # closed at its deadline while this update was being written: it is not in
                # the round's set, and the sender hears so
                raise MessageRejected(
                    Reason.ROUND_CLOSED,
                    f"round {env.round} closed while {body.client}'s update was stored",
                )
        event(
            self.log,
            "update.held",
            job=spec.job_id,
            round=env.round,
            client=body.client,
            offset=body.offset,
        )
        await self._maybe_close(spec, env.round)

    async def _on_refused(self, spec: JobSpec, env: Envelope[UpdateRejected]) -> None:
        """Ingest refused a client's update (a signed ``update.rejected``): that client has
        answered, so the round need not wait for its deadline on its account. Ingest names a
        client only once its signature verified (an unverified claim reads "<id>
        (unverified)", which is no participant id), so a forger cannot close a round early
        in an honest client's name. A refusal does not ban: a later valid update of the
        client still enters the round while it is open."""
        assert self.store is not None
        client = env.body.client
        r = await self.store.get_round(spec.job_id, env.round)
        if r is None or r.state != RoundState.OPEN or client not in r.participants:
            return
        await self.store.add_refusal(spec.job_id, env.round, client, str(env.body.reason))
        event(
            self.log,
            "update.refused",
            job=spec.job_id,
            round=env.round,
            client=client,
            reason=str(env.body.reason),
        )
        await self._maybe_close(spec, env.round)

    async def _maybe_close(self, spec: JobSpec, round_no: int) -> None:
        assert self.store is not None
        async with self._lock(spec.job_id):
            r = await self.store.get_round(spec.job_id, round_no)
            if r is None or r.state != RoundState.OPEN or r.deadline is None:
                return
            received = await self.store.round_updates(spec.job_id, round_no)
            refused = await self.store.refused(spec.job_id, round_no)
            refused -= {c for c, _d, _o in received}
            decision = close_decision(
                received=len(received),
                selected=len(r.participants),
                refused=len(refused & set(r.participants)),
                min_updates=spec.min_updates,
                now=self.ctx.clock(),
                deadline=r.deadline,
                extensions=r.extensions,
                max_extensions=spec.max_extensions,
                on_short=spec.on_short,
            )
            if decision == CloseDecision.WAIT:
                return
            if decision == CloseDecision.CLOSE:
                closed = tuple(received)
                await self.store.transition(
                    spec.job_id, round_no, RoundState.OPEN, RoundState.CLOSED, closed_set=closed
                )
                r = await self.store.get_round(spec.job_id, round_no)
                assert r is not None
                event(
                    self.log, "round.closed", job=spec.job_id, round=round_no, updates=len(closed)
                )
                await self._send_closed(spec, r)
            elif decision == CloseDecision.EXTEND:
                deadline = self.ctx.clock() + spec.deadline_s
                await self.store.extend(spec.job_id, round_no, deadline, r.extensions + 1)
                await self.alert(
                    kind="round.extended",
                    severity="info",
                    job=spec.job_id,
                    round=round_no,
                    reason="too_few_updates",
                    detail=f"{len(received)} of {len(r.participants)} updates at the deadline; "
                    f"extension {r.extensions + 1} of {spec.max_extensions}",
                )
                r = await self.store.get_round(spec.job_id, round_no)
                assert r is not None
                # broadcast again with the model: a participant whose queue did not exist when
                # the round opened (it connected late) gets its chance in the extension; the
                # SDK sends at most once per round, so the others are not disturbed
                await self._announce_open(spec, r, broadcast=True)
            else:
                await self.store.transition(
                    spec.job_id, round_no, RoundState.OPEN, RoundState.ABORTED
                )
                await self.alert(
                    kind="round.aborted",
                    severity="critical",
                    job=spec.job_id,
                    round=round_no,
                    reason="too_few_updates",
                    detail=f"{len(received)} updates, {spec.min_updates} needed",
                )
                await self._end(
                    spec,
                    round_no,
                    "too_few_updates",
                    f"round {round_no} had {len(received)} updates",
                )

    # -- verdict and aggregation --------------------------------------------------------------
    async def _on_verdict(self, spec: JobSpec, env: Envelope[RoundVerdict]) -> None:
        assert self.store is not None
        async with self._lock(spec.job_id):
            r = await self.store.get_round(spec.job_id, env.round)
            if r is not None and r.state == RoundState.PUBLISHED:
                return
            if r is None or r.state != RoundState.CLOSED or r.closed_set is None:
                raise MessageRejected(
                    Reason.STALE_ROUND, f"round {env.round} is not waiting for a verdict"
                )
            kept = list(env.body.kept)
            flagged = [f.client for f in env.body.flagged]
            closed = [c for c, _d, _o in r.closed_set]
            if sorted(kept + flagged) != sorted(closed):
                raise MessageRejected(
                    Reason.BAD_SCHEMA,
                    f"verdict covers {sorted(kept + flagged)}, round {env.round} closed with {sorted(closed)}",
                )
            # dp_filter_bound k: the privacy charge (z/(2k+1)) holds only if at most k
            # updates are removed, whatever the detector flagged; the rest are kept
            kept, flagged = cap_removals(
                kept, [(f.client, float(f.score)) for f in env.body.flagged], spec.dp_filter_bound
            )
            if spec.dp_filter_bound is not None and len(env.body.flagged) > spec.dp_filter_bound:
                event(
                    self.log,
                    "verdict.capped",
                    job=spec.job_id,
                    round=env.round,
                    flagged=len(env.body.flagged),
                    removed=len(flagged),
                    bound=spec.dp_filter_bound,
                )
            base = await self._model(spec.job_id, r.base_version)
            updates = await self._kept_updates(spec, r, kept)
            result = await asyncio.to_thread(
                aggregate_round,
                job=spec.job_id,
                round_no=env.round,
                seed=spec.seed,
                base=base,
                updates=updates,
                kept=kept,
                rule=spec.rule,
                f=spec.f,
                clip=spec.clip,
                noise_multiplier=spec.noise_multiplier,
                expected_clients=max(spec.sample_rate * len(spec.participants), 1.0),
                server_lr=spec.server_lr,
            )
            digest = model_digest(result.model)
            verdict = {
                "kept": sorted(kept),
                "flagged": sorted(flagged),
                "step_norm": result.update_norm,
            }
            stored = await self.store.publish_model(
                spec.job_id, env.round, env.round, result.model, digest, r.epsilon or 0.0, verdict
            )
            if not stored:
                return
            self._models[(spec.job_id, env.round)] = result.model
            event(
                self.log,
                "model.published",
                job=spec.job_id,
                round=env.round,
                version=env.round,
                kept=len(kept),
                flagged=len(flagged),
                epsilon=r.epsilon,
            )
            r = await self.store.get_round(spec.job_id, env.round)
            assert r is not None
            await self._announce_published(spec, r)
            self._held.pop((spec.job_id, env.round), None)
            self._collecting.pop((spec.job_id, env.round), None)
            await self._next(spec, r)

    async def _kept_updates(
        self, spec: JobSpec, r: RoundRow, kept: list[str]
    ) -> dict[str, Mapping[str, np.ndarray]]:
        """The tensors of the kept clients' updates, each under the digest ingest accepted:
        from the read-ahead, or read again from the stream at the recorded offsets."""
        assert r.closed_set is not None
        held = self._held.get((spec.job_id, r.round), {})
        refs = {c: Ref(c, d, o) for c, d, o in r.closed_set if c in set(kept)}
        updates = {
            c: held[c][ref.digest] for c, ref in refs.items() if ref.digest in held.get(c, {})
        }
        missing = [ref for c, ref in refs.items() if c not in updates]
        if missing:
            event(self.log, "updates.rereading", job=spec.job_id, round=r.round, count=len(missing))
            fetched = await self._feeds[spec.job_id].fetch(r.round, missing)
            updates.update({c: u.tensors for c, u in fetched.items()})
        return updates

    # -- announcements ------------------------------------------------------------------------
    async def _announce_open(self, spec: JobSpec, r: RoundRow, *, broadcast: bool) -> None:
        assert self.store is not None and r.deadline is not None
        base = await self._model(spec.job_id, r.base_version)
        row = await self.store.model(spec.job_id, r.base_version)
        assert row is not None
        layout = Layout.of(base)
        body = RoundOpened(
            model_version=r.base_version,
            model_digest=row.digest,
            participants=list(r.participants),
            deadline=r.deadline,
            min_updates=max(1, min(spec.min_updates, len(r.participants))),
            clip_norm=spec.clip,
            tensor_spec=[
                TensorSpec.model_validate({"name": n, "dtype": d, "shape": list(s)})
                for n, s, d in zip(layout.names, layout.shapes, layout.dtypes, strict=True)
            ],
            rule=spec.rule,
            model_offset=await self._model_offset(spec, r.base_version),
            updates_from=r.updates_from,
        )
        await emit(self, "round.opened", body, job=spec.job_id, round=r.round)
        if broadcast:
            # into the job's broadcast stream: a participant that starts later reads it there
            await emit(
                self,
                "round.opened",
                body,
                job=spec.job_id,
                round=r.round,
                exchange=topology.BROADCAST,
            )

    async def _announce_published(self, spec: JobSpec, r: RoundRow) -> None:
        assert self.store is not None
        row = await self.store.model(spec.job_id, r.round)
        assert row is not None
        verdict = r.verdict or {}
        metrics = {
            "kept": float(len(verdict.get("kept", []))),
            "flagged": float(len(verdict.get("flagged", []))),
            "step_norm": float(verdict.get("step_norm", 0.0)),
        }
        body = ModelPublished(
            version=row.version, digest=row.digest, epsilon=row.epsilon, metrics=metrics
        )
        await emit(self, "model.published", body, job=spec.job_id, round=r.round)

    async def _send_closed(self, spec: JobSpec, r: RoundRow) -> None:
        assert r.closed_set is not None
        body = RoundClosed(
            updates=[UpdateRef(client=c, digest=d, offset=o) for c, d, o in r.closed_set]
        )
        await emit(self, "round.closed", body, job=spec.job_id, round=r.round)

    async def _send_request(self, spec: JobSpec, round_no: int) -> None:
        if spec.noise_multiplier == 0:
            # DP off: nothing to account; epsilon is unbounded and reported as such.
            await self._open_round(spec, round_no, math.inf)
            return
        # charged (q, z) and coverage per docs/privacy.md; the noise added stays z * C
        charge = charge_of(spec)
        body = PrivacyRequest(q=charge.q, z=charge.z, clip=spec.clip, coverage=charge.coverage)
        await emit(self, "privacy.request", body, job=spec.job_id, round=round_no)

    async def _next(self, spec: JobSpec, r: RoundRow) -> None:
        assert self.store is not None
        if r.round >= spec.rounds:
            await self._end(spec, r.round, "completed", f"{spec.rounds} rounds done")
            return
        await self.store.request_round(spec.job_id, r.round + 1, base_version=r.round)
        await self._send_request(spec, r.round + 1)

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
        """Re-announce whatever the job's latest stored round waits for. At start
        (``stale_after`` None) always; from the ticker only for a round whose state has not
        moved for ``stale_after`` seconds (a publish lost to a broker outage). Every peer is
        idempotent on (job, round), so a repeat costs a message, never an effect."""
        assert self.store is not None
        spec = self.specs[job_id]
        async with self._lock(job_id):
            if await self.store.job_ended(job_id):
                self._ended_event(job_id).set()
                return
            r = await self.store.latest_round(job_id)
            if stale_after is not None and (
                r is None or r.state == RoundState.OPEN or time.time() - r.updated < stale_after
            ):
                return  # open rounds are re-announced by the ticker itself
            if r is None:
                await self.store.request_round(job_id, 1, base_version=0)
                await self._send_request(spec, 1)
            elif r.state == RoundState.REQUESTED:
                await self._send_request(spec, r.round)
            elif r.state == RoundState.OPEN:
                await self._announce_open(spec, r, broadcast=True)
            elif r.state == RoundState.CLOSED:
                await self._send_closed(spec, r)
            elif r.state == RoundState.PUBLISHED:
                if stale_after is None:
                    await self._announce_published(spec, r)
                await self._next(spec, r)
            else:
                reason = "budget_exhausted" if r.state == RoundState.DENIED else "too_few_updates"
                await self._end(spec, r.round, reason, f"round {r.round} {r.state.value}")

    async def _ticker(self) -> None:
        """Deadlines; periodic ``round.opened`` re-announcements so that an ingest replica
        started mid-round learns the open rounds; and nudges for rounds stuck because a
        publish was lost."""
        assert self.store is not None
        last_announce = self.ctx.clock()
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                rounds = await self.store.open_rounds()
                announce = self.ctx.clock() - last_announce >= self.reopen_interval_s
                for r in rounds:
                    spec = self.specs.get(r.job_id)
                    if spec is None:
                        continue
                    await self._maybe_close(spec, r.round)
                    if announce:
                        fresh = await self.store.get_round(r.job_id, r.round)
                        if fresh is not None and fresh.state == RoundState.OPEN:
                            await self._announce_open(spec, fresh, broadcast=False)
                if announce:
                    last_announce = self.ctx.clock()
                    for job_id in list(self.specs):
                        await self._resume(job_id, stale_after=self.reopen_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.warning("ticker pass failed; retrying", exc_info=True)

    # -- helpers --------------------------------------------------------------------------------
    def _lock(self, job_id: str) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    def _ended_event(self, job_id: str) -> asyncio.Event:
        return self._ended.setdefault(job_id, asyncio.Event())

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
        if len(self._models) > 8:
            self._models.pop(next(iter(self._models)))
        self._models[key] = model
        return model


def build(ctx: ServiceContext) -> Service:
    return Aggregator(ctx)
