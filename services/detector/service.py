"""The detector's shell: keeps the updates of open rounds, and on ``round.closed`` judges
exactly the listed (client, digest) set once it holds all of them, then publishes
``round.verdict`` and an alert per flagged client (docs/architecture.md, "One round" step 6).

``round.closed`` is stored as pending before it is acknowledged, so a verdict waits for a
late ``update.accepted`` without holding the message; the verdict and the reputation it
changes commit together, so redeliveries do not count twice. A redelivered
``round.closed`` of a decided round re-publishes the stored verdict.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from qflare.messages import (
    Body,
    Envelope,
    Flagged,
    MessageRejected,
    Reason,
    RoundClosed,
    RoundVerdict,
    UpdateAccepted,
)
from qflare.messages.limits import OFF_LOOP_BYTES
from qflare.robust import Reputation
from qflare.runtime import Consumer, JobSpec, Service, ServiceContext, event, stateful_queue
from qflare.runtime.envelopes import emit
from qflare.runtime.service import Routes
from qflare.services.detector.core import RoundRows, decide, decide_rows
from qflare.services.detector.store import DetectorStore

QUEUE = "detector"


class Detector(Service):
    name = "detector"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        opts = self.settings.options(self.name)
        self.reputation_params = {
            k: opts[k] for k in ("decay", "penalty", "threshold", "quarantine_rounds") if k in opts
        }
        self.republish_s = float(opts.get("republish_s", 2.0))
        self.store: DetectorStore | None = None
        self.specs: dict[str, JobSpec] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # (job, round) -> the round's updates as matrix rows (detection on only): this run's
        # copies, so a verdict neither reads back what was just written nor stacks the
        # round after it closed; the files serve restarts.
        self._rows: dict[tuple[str, int], RoundRows] = {}

    def consumers(self) -> list[Consumer]:
        routes: Routes = {UpdateAccepted: self.on_update, RoundClosed: self.on_closed}
        return [Consumer(stateful_queue(QUEUE, routes), routes=routes, prefetch=32)]

    async def open(self) -> None:
        self.store = await DetectorStore.open(self.ctx.data_dir)
        for spec in await self.store.jobs():  # submitted at run time before a restart
            self.specs[spec.job_id] = spec
        for spec in self.settings.jobs:
            self.specs[spec.job_id] = spec

    async def started(self) -> None:
        assert self.store is not None
        for job_id, round_no, verdict in await self.store.unpublished():
            await self._publish(job_id, round_no, verdict)
        for job_id, round_no, _refs in await self.store.pending():
            await self._try_decide(job_id, round_no)
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
        if self.store is not None:
            await self.store.close()

    async def submit_job(self, spec: JobSpec, model: Any = None) -> None:
        self.specs.setdefault(spec.job_id, spec)
        if self.store is not None:
            await self.store.add_job(spec)

    def _job(self, env: Envelope[Body]) -> JobSpec:
        spec = self.specs.get(env.job)
        if spec is None:
            raise MessageRejected(Reason.WRONG_JOB, f"no job {env.job!r} configured here")
        return spec

    async def on_update(self, env: Envelope[UpdateAccepted]) -> None:
        assert self.store is not None
        spec = self._job(env)
        body = env.body
        key, ref = (env.job, env.round), (body.client, body.update_digest)
        if spec.detection:
            # a row before the store's verdict check, so a verdict that drops the round's
            # rows after that check drops this one too
            rows = self._rows.setdefault(key, RoundRows(_expected_updates(spec)))
            try:
                if env.size > OFF_LOOP_BYTES:
                    await asyncio.to_thread(rows.add, ref, body.tensors)
                else:
                    rows.add(ref, body.tensors)
            except ValueError as exc:
                raise MessageRejected(Reason.SHAPE_MISMATCH, str(exc)) from None
        added = await self.store.add_update(
            env.job, env.round, body.client, body.update_digest, dict(body.tensors)
        )
        if added == "decided":
            # a copy after the verdict: the round needs no rows any more
            self._rows.pop(key, None)
            return
        if await self.store.pending(env.job):
            await self._try_decide(env.job, env.round)

    async def on_closed(self, env: Envelope[RoundClosed]) -> None:
        assert self.store is not None
        self._job(env)
        refs = [(u.client, u.digest) for u in env.body.updates]
        if len({c for c, _d in refs}) != len(refs):
            raise MessageRejected(Reason.BAD_SCHEMA, "round.closed lists a client twice")
        stored = await self.store.verdict(env.job, env.round)
        if stored is not None:
            await self._publish(env.job, env.round, stored)
            return
        await self.store.add_pending(env.job, env.round, refs)
        await self._try_decide(env.job, env.round)

    async def _try_decide(self, job_id: str, round_no: int) -> None:
        assert self.store is not None
        async with self._locks.setdefault(job_id, asyncio.Lock()):
            pending = [p for p in await self.store.pending(job_id) if p[1] == round_no]
            if not pending:
                return
            if await self.store.decided(job_id, round_no):
                await self.store.discard_pending(job_id, round_no)
                return
            refs = pending[0][2]
            missing = set(refs) - await self.store.held(job_id, round_no)
            if missing:
                event(self.log, "verdict.waiting", job=job_id, round=round_no, missing=len(missing))
                return
            spec = self.specs[job_id]
            reputation = await self.store.reputation(job_id, Reputation(**self.reputation_params))
            if spec.detection:
                rows = self._rows.setdefault((job_id, round_no), RoundRows(max(1, len(refs))))
                rest = [r for r in refs if r not in rows]
                if rest:  # stored before a restart
                    for client, tensors in (await self.store.load(job_id, round_no, rest)).items():
                        rows.add(next(r for r in rest if r[0] == client), tensors)

                def judge() -> Any:
                    clients, x = rows.matrix(list(refs))
                    return decide_rows(round_no, clients, x, f=spec.f, reputation=reputation)

                result = await asyncio.to_thread(judge)
            else:
                result = decide(
                    round_no,
                    {c: {} for c, _d in refs},
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
                self._rows.pop((job_id, round_no), None)
                await self._publish(job_id, round_no, verdict)
                await self.store.drop_round_files(job_id, round_no)

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


def _expected_updates(spec: JobSpec) -> int:
    """Rows to reserve for a round: every participant at q = 1, else the Poisson mean with
    room (more rows double the reservation)."""
    n = len(spec.participants)
    if spec.sample_rate >= 1.0:
        return n
    return max(1, min(n, math.ceil(n * spec.sample_rate * 1.25) + 8))


def build(ctx: ServiceContext) -> Service:
    return Detector(ctx)
