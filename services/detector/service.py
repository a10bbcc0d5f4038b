"""The detector's shell: reads each job's update stream ahead while rounds collect, and on
``round.closed`` judges exactly the listed (client, digest, offset) set, then publishes
``round.verdict`` and an alert per flagged client (docs/architecture.md, "One round" step 6
and "The data plane").

Ingest's ``update.accepted`` verdicts are read as hints of where the updates lie, so that
a read-ahead held up by a flood between them can jump (:meth:`UpdateFeed.vouched`); they
vouch for nothing here. The read-ahead keeps a participant's update as a row of its round's matrix under its
(client, digest) key (verified in full: certificate, signature, digest, unsealed with the
detector's own key); the verdict uses only the digests the aggregator's signed
``round.closed`` lists. At the close it waits (a bounded time) for the read-ahead to pass
the listed offsets, and reads whatever it still does not hold again from the stream at their
offsets (after a restart: all of them). A decided round's matrix is the next round's: its
memory is touched already. A round whose matrix would pass ``rows_in_memory_mb`` keeps its
rows in an unlinked file under the data folder (:mod:`qflare.runtime.spill`) and is judged
in column blocks (:func:`~qflare.services.detector.core.decide_source`, the verdict of the
in-memory round), its file given back once the round is decided. ``round.closed`` is stored as pending before it is
acknowledged; the verdict and the reputation it changes commit together, so redeliveries do
not count twice. A redelivered ``round.closed`` of a decided round re-publishes the stored
verdict.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from qflare.bus import topology
from qflare.messages import (
    Envelope,
    Flagged,
    JobEnded,
    MessageRejected,
    Reason,
    RoundClosed,
    RoundVerdict,
    UpdateAccepted,
)
from qflare.messages.tensors import Layout, RoundRows
from qflare.robust import Reputation
from qflare.runtime import (
    Consumer,
    JobSpec,
    Service,
    ServiceContext,
    event,
    metrics,
    stateful_consumer,
)
from qflare.runtime.envelopes import emit
from qflare.runtime.jobs import job_of
from qflare.runtime.spill import SpilledRows, next_rows, release, round_rows, spill_block
from qflare.runtime.updates import PartWriter, Ref, StreamUpdate, UpdateFeed, into_rows
from qflare.services.detector.core import OutputLayer, decide, decide_rows, decide_source
from qflare.services.detector.store import DetectorStore, Pending, PendingRef


class Detector(Service):
    name = "detector"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        opts = self.settings.services.detector  # checked, defaults filled in
        self.reputation_params = {k: getattr(opts, k) for k in Reputation.PARAMS}
        self.republish_s = opts.republish_s
        self.rows_budget = opts.rows_in_memory_mb * 2**20
        self.store: DetectorStore | None = None
        self.specs: dict[str, JobSpec] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # (job, round) -> the round's updates as matrix rows (detection on only), filled by
        # the read-ahead as they arrive, and the generation of those rows; the stream serves
        # restarts. A decided round's matrix, in memory, is the job's spare, reset for its
        # next round; one in a file is given back (release).
        self._rows: dict[tuple[str, int], tuple[RoundRows, int]] = {}
        self._spare: dict[str, RoundRows] = {}
        # job -> the layout of its updates (the model's), once known: from the model handed
        # in with the job, else from the listed updates of a round judged; it sizes a
        # round's matrix before its first update is read
        self._layouts: dict[str, Layout] = {}
        self._output_refused: set[str] = set()  # jobs whose output_layer the model lacks
        self._per_client: dict[tuple[str, int, str], int] = {}
        self._decided_up_to: dict[str, int] = {}
        self._feeds: dict[str, UpdateFeed] = {}
        self._ended: set[str] = set()  # jobs whose job.ended came: nothing read ahead

    def consumers(self) -> list[Consumer]:
        return [
            stateful_consumer(
                topology.DETECTOR_QUEUE,
                {
                    RoundClosed: self.on_closed,
                    UpdateAccepted: self.on_accepted,
                    JobEnded: self.on_job_ended,
                },
                prefetch=32,
            )
        ]

    async def on_accepted(self, env: Envelope[UpdateAccepted]) -> None:
        """Ingest's verdict, a hint of where to read only (the detector trusts no update
        before the aggregator's round.closed lists it): a read-ahead far behind it (a
        flood between the updates) jumps to it (UpdateFeed.vouched)."""
        feed = self._feeds.get(env.job)
        if feed is not None:
            body = env.body
            feed.vouched(Ref(body.client, body.update_digest, body.offset))

    async def open(self) -> None:
        self.store = await DetectorStore.open(self.ctx.data_dir)
        for spec in await self.store.jobs():  # submitted at run time before a restart
            self.specs[spec.job_id] = spec
        for spec in self.settings.jobs:
            self.specs[spec.job_id] = spec

    async def started(self) -> None:
        assert self.store is not None
        self._decided_up_to = await self.store.last_decided()
        self._ended = await self.store.ended()
        for job_id in list(self.specs):
            await self._read_ahead(job_id)
        for job_id, round_no, verdict in await self.store.unpublished():
            await self._publish(job_id, round_no, verdict)
        for p in await self.store.pending():
            job_id, round_no = p.job_id, p.round
            # in the background: a round whose updates cannot be read any more (its job ended
            # and the stream is gone) must not stop every start; it stays pending, is logged,
            # and is tried again on the next start or a redelivered round.closed
            self.spawn(self._try_decide(job_id, round_no), name=f"pending-{job_id}-{round_no}")
        self.spawn(self._republisher(), name="detector-republisher")

    async def _republisher(self) -> None:
        """Verdicts whose publish failed (broker away) go out again."""
        assert self.store is not None
        while True:
            await asyncio.sleep(self.republish_s)
            try:
                for job_id, round_no, verdict in await self.store.unpublished():
                    await self._publish(job_id, round_no, verdict)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.warning("republishing verdicts failed; retrying", exc_info=True)

    async def close(self) -> None:
        for feed in self._feeds.values():
            await feed.stop()
        if self.store is not None:
            await self.store.close()

    async def submit_job(self, spec: JobSpec, model: Any = None) -> None:
        self.specs.setdefault(spec.job_id, spec)
        if model is not None:  # in process: the updates have the model's layout
            self._layouts.setdefault(spec.job_id, Layout.of(model))
        if self.store is not None:
            await self.store.add_job(spec)
        if self.running:
            await self._read_ahead(spec.job_id)

    async def on_job_ended(self, env: Envelope[JobEnded]) -> None:
        """The job is over: stop reading its update stream (the aggregator deletes it) and
        give back its rows, in memory or in files, unless a round of it still waits for its
        verdict (it keeps what that round needs). Remembered, so a restart reads nothing
        of the job ahead."""
        assert self.store is not None
        if env.job not in self.specs:
            return  # a job this detector never ran
        await self.store.end_job(env.job)
        self._ended.add(env.job)
        if any(p.job_id == env.job for p in await self.store.pending(env.job)):
            return
        feed = self._feeds.pop(env.job, None)
        if feed is not None:
            await feed.stop()
        for key in [k for k in self._rows if k[0] == env.job]:
            release(self._rows.pop(key)[0])
        spare = self._spare.pop(env.job, None)
        if spare is not None:
            release(spare)
        self._layouts.pop(env.job, None)
        for count in [k for k in self._per_client if k[0] == env.job]:
            del self._per_client[count]
        event(self.log, "job.ended", job=env.job, reason=env.body.reason)

    async def _read_ahead(self, job_id: str) -> None:
        """Start reading the job's update stream from now on (detection on only: without
        detection the verdict needs no update)."""
        spec = self.specs[job_id]
        if not spec.detection or job_id in self._feeds or job_id in self._ended:
            return
        await self._new_feed(job_id).start("next")

    def _new_feed(self, job_id: str) -> UpdateFeed:
        """The job's feed, registered, not started: :meth:`_read_ahead` starts it; an ended
        job's pending round only fetches what it lists."""
        spec = self.specs[job_id]
        assert self.ctx.identity is not None and self.ctx.trust is not None
        assert self.ctx.identity.kem is not None, "the detector needs its KEM key to unseal"
        participants = frozenset(spec.participants)
        feed = UpdateFeed(
            self.bus,
            job_id,
            trust=self.ctx.trust,
            kem_key=self.ctx.identity.kem,
            wants=lambda round_no, sender: (
                sender in participants and round_no > self._decided_up_to.get(job_id, 0)
            ),
            sink=lambda update: self._keep(job_id, update),
            log=self.log,
        )
        self._feeds[job_id] = feed
        return feed

    async def _keep(self, job_id: str, update: StreamUpdate) -> PartWriter | None:
        """Read-ahead sink: the update as a row of its round (two digests per client at
        most); the copy into the row runs in a worker thread (an update in parts: the
        writer returned takes it part by part)."""
        if update.round <= self._decided_up_to.get(job_id, 0):
            return None
        count = (job_id, update.round, update.client)
        if self._per_client.get(count, 0) >= 2:
            return None
        rows, generation = self._round_rows(job_id, update.round, _layout_of(update))
        ref = (update.client, update.digest)
        if ref in rows:
            return None  # read twice (a read-ahead that jumped, and the offset read alone)
        self._per_client[count] = self._per_client.get(count, 0) + 1
        try:
            return await into_rows(rows, update, generation)
        except ValueError as exc:  # not the model's layout: ingest refuses it too
            self.log.debug("read-ahead row refused: %s", exc)
            return None

    def _round_rows(
        self, job_id: str, round_no: int, first: Layout | None = None
    ) -> tuple[RoundRows, int]:
        """The matrix of a round and its generation (the job's spare matrix, reset, when it
        has one and the round fits in memory). With every participant selected (q = 1)
        each has a home row in client-id order, so a round whose every update came in is in
        order as it stands. The rows have the job's layout when it is known, else that of
        ``first``, the update about to be added (a misshapen one read ahead first fixes a
        layout the listed updates do not fit: :meth:`_try_decide` then judges them apart);
        without either they stay in memory."""
        entry = self._rows.get((job_id, round_no))
        if entry is None:
            spec = self.specs[job_id]
            capacity = _expected_updates(spec)
            homes = sorted(spec.participants) if spec.sample_rate >= 1.0 else []
            layout = self._layouts.get(job_id, first)
            spare = self._spare.pop(job_id, None)
            folder = self.ctx.data_dir / "rows"
            entry = next_rows(spare, folder, self.rows_budget, capacity, homes, layout)
            self._rows[(job_id, round_no)] = entry
        return entry

    def _new_rows(self, capacity: int, homes: list[str], layout: Layout | None) -> RoundRows:
        """Rows in memory, or in a file under the data folder past ``rows_in_memory_mb``."""
        folder = self.ctx.data_dir / "rows"
        return round_rows(folder, self.rows_budget, capacity, homes, layout)

    async def on_closed(self, env: Envelope[RoundClosed]) -> None:
        assert self.store is not None
        job_of(self.specs, env.job)
        refs = [(u.client, u.digest, u.offset) for u in env.body.updates]
        if len({c for c, _d, _o in refs}) != len(refs):
            raise MessageRejected(Reason.BAD_SCHEMA, "round.closed lists a client twice")
        stored = await self.store.verdict(env.job, env.round)
        if stored is not None:
            await self._publish(env.job, env.round, stored)
            return
        await self.store.add_pending(Pending(env.job, env.round, refs, env.body.malformed))
        await self._try_decide(env.job, env.round)

    def _output_layer(self, spec: JobSpec, layout: Layout | None) -> OutputLayer | None:
        """Where the job's ``output_layer`` lies in its updates (label consistency), or None:
        none named, no layout yet, or one the model does not have (said once per job, and
        detection goes on without it)."""
        if spec.output_layer is None or layout is None:
            return None
        try:
            return OutputLayer.of(layout, spec.output_layer)
        except ValueError as exc:
            if spec.job_id not in self._output_refused:
                self._output_refused.add(spec.job_id)
                event(
                    self.log,
                    "detection.output_layer_ignored",
                    logging.WARNING,
                    job=spec.job_id,
                    error=str(exc),
                )
            return None

    async def _try_decide(self, job_id: str, round_no: int) -> None:
        assert self.store is not None
        async with self._locks.setdefault(job_id, asyncio.Lock()):
            pending = [p for p in await self.store.pending(job_id) if p.round == round_no]
            if not pending:
                return
            if await self.store.decided(job_id, round_no):
                await self.store.discard_pending(job_id, round_no)
                return
            refs, malformed = pending[0].refs, pending[0].malformed
            spec = self.specs[job_id]
            reputation = await self.store.reputation(job_id, Reputation(**self.reputation_params))
            if spec.detection:
                apart = False
                try:
                    rows = await self._read_listed(job_id, round_no, refs)
                except ValueError:
                    # the round's first row read ahead (verified, but not yet judged by
                    # ingest) fixed another layout than the listed updates have: judge them
                    # alone, all read again, in rows the read-ahead cannot reach
                    apart = True
                    rows = await self._read_listed(job_id, round_no, refs, apart=True)
                if refs and rows.layout is not None:  # the listed updates': ingest's check
                    self._layouts[job_id] = rows.layout

                output = self._output_layer(spec, rows.layout)

                def judge() -> Any:
                    listed = [(c, d) for c, d, _o in refs]
                    # the updates' order in the stream: the original of a group of copies
                    arrival = {c: float(o) for c, _d, o in refs}
                    if isinstance(rows, SpilledRows):  # block by block: the same verdict
                        clients, src = rows.source(listed)
                        return decide_source(
                            round_no,
                            clients,
                            src,
                            f=spec.f,
                            reputation=reputation,
                            malformed=malformed,
                            block=spill_block(self.rows_budget, len(clients)),
                            output=output,
                            arrival=arrival,
                        )
                    clients, x = rows.matrix(listed)
                    return decide_rows(
                        round_no,
                        clients,
                        x,
                        f=spec.f,
                        reputation=reputation,
                        malformed=malformed,
                        output=output,
                        arrival=arrival,
                    )

                try:
                    result = await asyncio.to_thread(judge)
                finally:
                    if apart:
                        release(rows)
            else:
                result = decide(
                    round_no,
                    {c: {} for c, _d, _o in refs},
                    f=spec.f,
                    detection=False,
                    reputation=reputation,
                )
            verdict = {
                "kept": list(result.kept),
                "flagged": [
                    {"client": x.client, "score": x.score, "reasons": list(x.reasons)}
                    for x in result.flagged
                ],
                "quarantined": list(result.newly_quarantined),
                "note": result.note[:2000],
            }
            if await self.store.record_verdict(job_id, round_no, verdict, reputation):
                event(
                    self.log,
                    "round.verdict",
                    job=job_id,
                    round=round_no,
                    kept=len(result.kept),
                    flagged=[x.client for x in result.flagged],
                )
                metrics.verdict(
                    self.name,
                    job_id,
                    kept=len(result.kept),
                    flagged=len(result.flagged),
                    quarantined=len(result.newly_quarantined),
                )
                self._forget(job_id, round_no)
                await self._publish(job_id, round_no, verdict)

    async def _read_listed(
        self, job_id: str, round_no: int, refs: list[PendingRef], *, apart: bool = False
    ) -> RoundRows:
        """Rows holding every update of ``refs``: the round's, into which whatever the
        read-ahead did not keep is read again from the stream (ValueError: it does not fit
        the layout of the rows held), or with ``apart`` new rows, all read again, that the
        read-ahead cannot reach (the caller releases them). Rows made here take the layout
        of the updates read (listed: ingest checked it), so that a round too large for
        memory goes to a file also when none of it was read ahead (a restart)."""

        def held() -> RoundRows | None:
            entry = None if apart else self._rows.get((job_id, round_no))
            return None if entry is None else entry[0]

        def missing() -> list[Ref]:
            rows = held()
            return [Ref(c, d, o) for c, d, o in refs if rows is None or (c, d) not in rows]

        rest = missing()
        await self._read_ahead(job_id)
        feed = self._feeds.get(job_id)
        if feed is None:  # an ended job's round, pending since before a restart
            feed = self._new_feed(job_id)
        if rest and not apart and await feed.wait_past(max(r.offset for r in rest)):
            rest = missing()  # it was still decoding them
        made: list[RoundRows] = [] if apart else [r for r in (held(),) if r is not None]

        def rows_for(layout: Layout | None) -> RoundRows:
            if not made:
                if apart:
                    made.append(self._new_rows(max(1, len(refs)), [], layout))
                else:
                    made.append(self._round_rows(job_id, round_no, layout)[0])
            return made[0]

        async def sink(update: StreamUpdate) -> PartWriter | None:
            # one update's tensors (or one part) in memory at a time, into its row
            return await into_rows(rows_for(_layout_of(update)), update)

        try:
            if rest:  # not read ahead: a restart, or it arrived before the reader
                event(self.log, "updates.rereading", job=job_id, round=round_no, count=len(rest))
                await feed.fetch(round_no, rest, sink=sink)
        except BaseException:
            if apart and made:
                release(made[0])
            raise
        return rows_for(None)

    def _forget(self, job_id: str, round_no: int) -> None:
        """A decided round needs no rows; nothing for it or earlier is read ahead again."""
        self._decided_up_to[job_id] = max(self._decided_up_to.get(job_id, 0), round_no)
        for key in [k for k in self._rows if k[0] == job_id and k[1] <= round_no]:
            rows = self._rows.pop(key)[0]
            if key[1] == round_no and type(rows) is RoundRows:
                self._spare[job_id] = rows  # in memory: its pages are touched already
            else:
                release(rows)  # a file's rows: nothing to gain from keeping them
        for count in [k for k in self._per_client if k[0] == job_id and k[1] <= round_no]:
            del self._per_client[count]

    async def _publish(self, job_id: str, round_no: int, verdict: dict[str, Any]) -> None:
        assert self.store is not None
        body = RoundVerdict(
            kept=verdict["kept"],
            flagged=[
                Flagged(client=f["client"], score=float(f["score"]), reasons=f["reasons"])
                for f in verdict["flagged"]
            ],
            note=verdict.get("note", ""),
        )
        for f in verdict["flagged"]:
            await self.alert(
                kind="client.flagged",
                severity="warning",
                job=job_id,
                round=round_no,
                client=f["client"],
                reason=",".join(f["reasons"])[:200] or "flagged",
                detail=f"score {f['score']:.2f}; reasons {', '.join(f['reasons'])}",
            )
        for client in verdict.get("quarantined", []):
            await self.alert(
                kind="client.quarantined",
                severity="critical",
                job=job_id,
                round=round_no,
                client=client,
                reason="reputation",
                detail=f"{client} quarantined after repeated flags",
            )
        await emit(self, "round.verdict", body, job=job_id, round=round_no)
        await self.store.mark_published(job_id, round_no)


def _layout_of(update: StreamUpdate) -> Layout:
    """An update's layout: its manifest's when it came in parts."""
    return update.layout if update.layout is not None else Layout.of(update.tensors)


def _expected_updates(spec: JobSpec) -> int:
    """Rows to reserve for a round: every participant at q = 1, else the Poisson mean with
    room (more rows double the reservation)."""
    n = len(spec.participants)
    if spec.sample_rate >= 1.0:
        return n
    return max(1, min(n, math.ceil(n * spec.sample_rate * 1.25) + 8))


def build(ctx: ServiceContext) -> Service:
    return Detector(ctx)
