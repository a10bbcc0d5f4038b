"""Ingest's shell: check each message of a job's update stream, publish a small signed verdict.

Stateless and replicated (docs/architecture.md, "Processes" and "The data plane"). Clients
write each update once, into the job's stream ``updates.<job>``; ingest reads it there (the
detector and the aggregator read the same bytes) and never re-publishes it. A replica keeps
only a cache of open rounds, learnt from ``round.opened`` / ``round.closed`` /
``job.ended`` on its own transient queue ``ingest.rounds.<replica>``; ``round.opened`` names
the offset from which the round's updates can sit in the stream, and a replica that does not
yet read the job's stream starts there (a restarted replica re-checks what it may have missed;
its verdicts are idempotent for the services). With ``share = "i/N"`` (``N`` replicas) a
replica checks the offsets ``o`` with ``o % N == i``, so each update is checked once. Per
update:

1. size bound from the open round's tensor spec, before any decoding (TOO_LARGE);
2. :func:`qflare.messages.open_envelope`: certificate chain, expiry, revocation, sender,
   role, ML-DSA signature under ``qflare/v1/update``, body digest, unsealing with ingest's
   KEM key, body limits and schema;
3. :mod:`.core`: job, round, base version, participant, best-effort duplicate (deadlines
   are the aggregator's: ingest refuses an update as ROUND_CLOSED only once it heard the
   round closed);
4. :func:`qflare.messages.validate_update` (names, dtypes, shapes, finiteness) and the norm;
5. ``update.accepted`` signed by ingest: client, ``update_digest`` = the client's body
   digest, and the update's offset in the stream.

Any failure is a :class:`MessageRejected`: :meth:`IngestService.on_rejected` publishes
``update.rejected`` (with the offset) and an ``alert.raised`` naming the reason, and the
reader moves on. A client is named in them only once its signature verified (and, for a
body that fails, once the body hashed to the signed digest: ``SignedBodyRejected``), so a
forger cannot get an honest client flagged. Reporting costs two signatures and two publishes, far
more than refusing garbage, so a flood must not be reported one by one: each sender (a
verified client, or all unverified senders together) has a budget of reported rejections
(``report_burst``, then ``report_per_s``); the rest are shed, counted and summarised in one
``updates.shed`` warning per job every ``shed_report_s`` (:class:`.core.RejectionBudget`).
Reports about unverified senders, which the aggregator ignores, go out beside the reader;
an update for the next round, not announced yet, waits for its ``round.opened`` beside the
reader too (one per client and round), so nothing a sender writes holds the updates behind
it in the stream for longer than ingest takes to refuse it.

The revocation list is re-read when its file changes (``qflare revoke`` rewrites it), so a
revocation takes effect on the next message without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from qflare.bus import Delivery, Outcome, QueueSpec, StreamNotFound, StreamReader, topology
from qflare.messages import (
    DEFAULT_LIMITS,
    Envelope,
    JobEnded,
    Limits,
    RoundClosed,
    RoundOpened,
    Update,
    UpdateRejected,
    unpack,
)
from qflare.messages.bodies import UpdateManifest, UpdatePart
from qflare.messages.envelope import Header, of_kind, open_off_loop, peek_header
from qflare.messages.errors import MessageRejected, Reason, SignedBodyRejected
from qflare.messages.limits import OFF_LOOP_BYTES
from qflare.messages.parts import PART_KINDS, PartAssembler, RunningCheck, TransferKey
from qflare.runtime import metrics
from qflare.runtime.config import IngestOptions
from qflare.runtime.envelopes import emit
from qflare.runtime.logging import event
from qflare.runtime.revocation import RevocationWatch
from qflare.runtime.service import (
    TRANSIENT_ERRORS,
    Consumer,
    Service,
    ServiceContext,
    event_bindings,
)
from qflare.services.ingest.core import (
    UNVERIFIED,
    OpenRound,
    PartRoutes,
    RejectionBudget,
    RoundBook,
    Route,
    SeenUpdates,
    Shed,
    accepted_update,
    check_layout,
    check_norm_bound,
    check_round,
    check_tensors,
    check_update_round,
    max_envelope_bytes,
    needs_round_news,
    round_layout,
)

#: The kinds of message a job's update stream holds.
UPDATE_KINDS = (Update.KIND, UpdateManifest.KIND, UpdatePart.KIND)
#: Refusals of a part or manifest remembered until their report went out (a report that
#: failed is made again when the reader hands the message over again).
_REFUSALS_KEPT = 256


@dataclass
class _Transfer:
    """An update in parts this replica checks: its verified manifest, the manifest's offset
    in the stream, the running check of its values, and the last offset it took a part from."""

    manifest: Envelope[UpdateManifest]
    offset: int
    check: RunningCheck
    round_checked: bool
    last_offset: int
    nbytes: int


#: Ingest's durable queues: none (updates are read from each job's stream, round events
#: from a transient queue per replica).
QUEUES: tuple[QueueSpec, ...] = ()


def rounds_queue(replica: str) -> QueueSpec:
    """This replica's own queue of round events (each replica needs all of them). It is
    transient: a killed replica leaves no queue behind that would fill up forever."""
    return QueueSpec(
        f"ingest.rounds.{replica}",
        bindings=event_bindings((RoundOpened, RoundClosed, JobEnded)),
        delivery_limit=3,
        transient=True,
    )


def default_replica() -> str:
    """``$QFLARE_REPLICA`` if set (a readable name in the broker's queue list), else
    ``<host>-<pid>``: two live replicas cannot share a round queue (it is exclusive to one
    connection; the second gets TopologyError), and a dead replica's queue is gone with
    its connection, so a restart may reuse the name."""
    name = os.environ.get("QFLARE_REPLICA") or f"{socket.gethostname() or 'ingest'}-{os.getpid()}"
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[-64:]


class _Refused(MessageRejected):
    """A rejection with what ingest knew about the update when it refused it."""

    def __init__(
        self,
        exc: MessageRejected,
        *,
        job: str,
        round_: int,
        client: str | None,
        claimed: str | None,
        digest: bytes | None,
        offset: int | None,
    ) -> None:
        super().__init__(exc.reason, exc.detail)
        self.job = job
        self.round = round_
        self.client = client
        self.claimed = claimed
        self.digest = digest
        self.offset = offset


#: ``i/N``: this replica checks the stream offsets ``o`` with ``o % N == i``.
SHARE_ENV = "QFLARE_INGEST_SHARE"


def parse_share(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"ingest share must be 'i/N' (e.g. '0/2'), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"ingest share {text!r} needs 0 <= i < N")
    return i, n


class IngestService(Service):
    name = "ingest"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        #: ``[services.ingest]``, checked and with its defaults (qflare.runtime.config)
        self.options: IngestOptions = ctx.settings.services.ingest
        self.replica = self.options.replica or default_replica()
        self.share, self.shares = parse_share(os.environ.get(SHARE_ENV) or self.options.share)
        self.book = RoundBook()
        self.seen = SeenUpdates(self.options.dedup_capacity)
        self.limits: Limits = DEFAULT_LIMITS
        self._news = asyncio.Event()
        self.crl: RevocationWatch | None = None  # at open(), with the trust store
        self.counts: dict[str, int] = {"accepted": 0, "rejected": 0, "shed": 0}
        self.budget = RejectionBudget(self.options.report_burst, self.options.report_per_s)
        self._shed_since = 0.0
        #: job -> (a summary whose alert could not be published, when it began): it goes
        #: out with the job's next summary
        self._unsent: dict[str, tuple[Shed, float]] = {}
        self._inflight: set[tuple[str, int, str]] = set()
        self._readers: dict[str, StreamReader] = {}
        # round events are handled concurrently: copies of round.opened (the aggregator's
        # re-announcements) must not each start a reader of the job's stream
        self._readers_lock = asyncio.Lock()
        # (job, round, client) of the updates that wait for news of their round
        self._waited: set[tuple[str, int, str]] = set()
        # updates in parts: the transfers this replica checks, whose parts are whose
        self.assembler = PartAssembler(
            self.limits, ttl_s=self.options.part_ttl_s, clock=self._monotonic
        )
        self.routes = PartRoutes()
        self._transfers: dict[TransferKey, _Transfer] = {}
        self._refusals: OrderedDict[tuple[str, int], _Refused] = OrderedDict()

    def consumers(self) -> list[Consumer]:
        return [
            Consumer(
                rounds_queue(self.replica),
                routes={
                    RoundOpened: self.on_round_opened,
                    RoundClosed: self.on_round_closed,
                    JobEnded: self.on_job_ended,
                },
                prefetch=32,
            ),
        ]

    async def open(self) -> None:
        if self.ctx.identity is None or self.ctx.trust is None:
            raise ValueError(
                "ingest needs its identity (to re-sign and unseal) and the CA trust store"
            )
        self.crl = RevocationWatch(self.settings.crl_path(self.name), self.ctx.trust, self.log)
        self.reload_crl()

    async def started(self) -> None:
        self._shed_since = asyncio.get_running_loop().time()
        self.spawn(self._report_shed_every(), name="ingest-shed-report")
        self.spawn(self._expire_every(), name="ingest-expire-transfers")

    @staticmethod
    def _monotonic() -> float:
        return asyncio.get_running_loop().time()

    async def close(self) -> None:
        await self.report_shed()

    # -- revocation list ------------------------------------------------------------------
    def reload_crl(self) -> bool:
        """Adopt the revocation list file if it changed (:class:`RevocationWatch`); True
        when a newer one was adopted."""
        return self.crl is not None and self.crl.reload()

    # -- round events ---------------------------------------------------------------------
    async def on_round_opened(self, env: Envelope[RoundOpened]) -> None:
        body = env.body
        if len({t.name for t in body.tensor_spec}) != len(body.tensor_spec):
            raise MessageRejected(Reason.BAD_SCHEMA, "round.opened lists a tensor twice")
        info = OpenRound(
            job=env.job,
            round=env.round,
            base_version=body.model_version,
            tensors=tuple(body.tensor_spec),
            participants=frozenset(body.participants),
            deadline=None,  # the aggregator closes rounds; ingest hears of it (round.closed)
            max_norm=self.options.norm_bound,
        )
        if self.book.opened(info):
            event(
                self.log,
                "round.learned",
                job=env.job,
                round=env.round,
                participants=len(body.participants),
            )
        await self._read_updates(env.job, body.updates_from)
        self._tell_news()

    async def _read_updates(self, job: str, offset: int) -> None:
        """Start checking the job's update stream from ``offset`` (once per job). The stream
        is read by name, not declared: the aggregator declares it before the round opens, and
        ingest's broker user may read ``updates.<job>`` but not configure it. A stream that is
        gone (the job ended) has nothing to check; a later ``round.opened`` tries again."""
        settle = self._wrap(lambda delivery: self.on_update(job, delivery), kind=Update.KIND)

        async def mine(delivery: Delivery) -> Outcome:
            # another replica's share is passed over here, outside the handler's metrics;
            # every replica reads the manifests and part headers (PartRoutes)
            if not self._mine(delivery.offset) and _kind(delivery.body) not in PART_KINDS:
                return Outcome.ACK
            return await settle(delivery)

        async with self._readers_lock:
            if job in self._readers or not self.running:
                return
            try:
                reader = await self.bus.read_stream(
                    topology.update_stream(job).name,
                    mine,
                    offset=offset,
                    prefetch=8,
                )
            except StreamNotFound as exc:
                event(self.log, "updates.missing", logging.WARNING, job=job, error=str(exc))
                return
            self._readers[job] = reader
            self._subs.append(reader)
        event(
            self.log,
            "updates.reading",
            job=job,
            offset=offset,
            share=self.share,
            shares=self.shares,
        )

    async def on_round_closed(self, env: Envelope[RoundClosed]) -> None:
        self.book.closed(env.job, env.round)
        self.seen.forget_round(env.job, env.round + 1)
        self._waited = {w for w in self._waited if w[0] != env.job or w[1] > env.round}
        self._tell_news()

    async def on_job_ended(self, env: Envelope[JobEnded]) -> None:
        self.book.ended(env.job)
        self._waited = {w for w in self._waited if w[0] != env.job}
        async with self._readers_lock:
            reader = self._readers.pop(env.job, None)
            if reader is not None:
                self._subs.remove(reader)
                await reader.cancel()
        self._tell_news()

    def _tell_news(self) -> None:
        """Wake the updates that wait for news of their round."""
        self._news.set()
        self._news = asyncio.Event()

    def _may_wait(self, job: str, round_: int, client: str) -> bool:
        """Whether a (verified) update for a round this replica has not heard of may wait
        for its ``round.opened``: only the round after the latest can be announced late (the
        announcement comes on another queue), and only one update per client and round
        waits, so what waits is bounded by the certified clients. It waits beside the
        reader, never in it: a participant writing updates for rounds not open yet cannot
        stall the updates behind them in the stream."""
        latest = self.book.latest(job)
        if (latest is not None and round_ != latest + 1) or (job, round_, client) in self._waited:
            return False
        self._waited.add((job, round_, client))
        return True

    async def _await_news(self, job: str, round_: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.round_news_wait_s
        while needs_round_news(self.book, job, round_):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._news.wait(), remaining)
            except TimeoutError:
                return

    # -- updates --------------------------------------------------------------------------
    async def on_update(self, key_job: str, delivery: Delivery) -> None:
        """One message of the job's update stream (this replica's share of the offsets)."""
        offset = delivery.offset
        if offset is None:
            return
        header = _header(delivery.body)
        if header is not None and header.kind in PART_KINDS:
            await self._on_transfer_message(key_job, delivery, header)
            return
        if not self._mine(offset):
            return
        env: Envelope[Update] | None = None
        try:
            self.reload_crl()
            self._bounded(key_job, delivery.body)
            env = of_kind(await self._open(delivery.body), Update)
            metrics.message_age(self.name, Update.KIND, env.ts)
            _same_job(key_job, env)
        except MessageRejected as exc:
            self._refuse(exc, key_job, env, delivery)
            return
        if needs_round_news(self.book, env.job, env.round) and self._may_wait(
            env.job, env.round, env.sender
        ):
            self.spawn(self._judge_later(key_job, delivery, env), name="ingest-round-news")
            return
        await self._judge(key_job, delivery, env)

    async def _judge_later(self, key_job: str, delivery: Delivery, env: Envelope[Update]) -> None:
        """Judge an update for a round not announced yet once its news came (or after
        ``round_news_wait_s``), settled as the reader settles the others."""
        await self._await_news(env.job, env.round)
        await self.handle(lambda d: self._judge(key_job, d, env), delivery, Update.KIND)

    async def _judge(self, key_job: str, delivery: Delivery, env: Envelope[Update]) -> None:
        """The verified update ``env`` against the open round, then its verdict."""
        body = env.body
        try:
            info = check_update_round(self.book, env, self.ctx.clock())
            self.seen.check(env.job, env.round, env.sender)
            if len(delivery.body) > OFF_LOOP_BYTES:
                # finiteness and norm read every element: off the loop for large updates
                norm = await asyncio.to_thread(check_tensors, info, body.tensors)
            else:
                norm = check_tensors(info, body.tensors)
            # check again after the awaits above, and reserve: two copies of one client's
            # update handled concurrently must not both pass
            natural = (env.job, env.round, env.sender)
            self.seen.check(*natural)
            if natural in self._inflight:
                raise MessageRejected(
                    Reason.DUPLICATE,
                    f"{env.sender!r} has an update for round {env.round} of {env.job!r} in flight",
                )
            self._inflight.add(natural)
        except MessageRejected as exc:
            self._refuse(exc, key_job, env, delivery)
            return
        offset = delivery.offset
        assert offset is not None  # a stream delivery (on_update returns on one without)
        await self._accept(env, offset, natural, norm=norm, nbytes=len(delivery.body))

    # -- updates in parts -----------------------------------------------------------------
    async def _on_transfer_message(self, key_job: str, delivery: Delivery, header: Header) -> None:
        """An ``update.manifest`` or ``update.part`` (every replica reads them; only the
        owner of a transfer, the replica whose share holds its manifest's offset, checks its
        parts and reports). A refusal whose report fails is raised again when the reader
        hands the same offset over again (the transfer is gone by then)."""
        offset = delivery.offset
        assert offset is not None
        again = self._refusals.get((key_job, offset))
        if again is not None:
            raise again
        self.reload_crl()
        now = self._monotonic()
        self._expire(now)
        try:
            if header.kind == UpdateManifest.KIND:
                await self._on_manifest(key_job, delivery, now)
                return
            route = self.routes.route(header.sender, header.body_digest, now)
            if route is Route.MINE or (route is Route.UNKNOWN and self._mine(offset)):
                await self._on_part(key_job, delivery, now)
        except _Refused as exc:
            self._refusals[(key_job, offset)] = exc
            while len(self._refusals) > _REFUSALS_KEPT:
                self._refusals.popitem(last=False)
            raise

    async def _accept(
        self,
        env: Envelope[Update] | Envelope[UpdateManifest],
        offset: int,
        natural: tuple[str, int, str],
        *,
        norm: float,
        nbytes: int,
        **fields: Any,
    ) -> None:
        """Publish ``update.accepted`` for the update (or manifest) at ``offset``, remember
        its digest, count and log it; ``natural`` leaves the in-flight set whatever
        happens."""
        try:
            await emit(
                self, "update.accepted", accepted_update(env, offset), job=env.job, round=env.round
            )
            self.seen.add(env.job, env.round, env.sender, env.body_digest.hex())
        finally:
            self._inflight.discard(natural)
        self.counts["accepted"] += 1
        metrics.update_accepted(self.name, env.job)
        self._client_event(
            "update.accepted",
            env,
            norm=round(norm, 6),
            offset=offset,
            bytes=nbytes,
            **fields,
            sealed=env.sealed,
        )

    def _client_event(self, name: str, env: Envelope[Any], **fields: Any) -> None:
        """Log ``name`` about the client message ``env``: its job, round and sender."""
        event(self.log, name, job=env.job, round=env.round, client=env.sender, **fields)

    def _bounded(self, key_job: str, data: bytes) -> None:
        """TOO_LARGE for a message larger than an update of the job's round can be."""
        info = self.book.get(key_job)
        if info is not None and len(data) > max_envelope_bytes(info):
            raise MessageRejected(
                Reason.TOO_LARGE,
                f"{len(data)} bytes exceed the {max_envelope_bytes(info)} an update "
                f"for round {info.round} of {key_job!r} can take",
            )

    async def _on_manifest(self, key_job: str, delivery: Delivery, now: float) -> None:
        """Open the manifest and note its parts' digests; the owner checks it as it would
        an ``update`` (round, base version, participant, duplicate), its layout against the
        round's tensors, and starts following its parts."""
        offset = delivery.offset
        assert offset is not None
        mine = self._mine(offset)
        env: Envelope[UpdateManifest] | None = None
        try:
            self._bounded(key_job, delivery.body)
            env = of_kind(await self._open(delivery.body), UpdateManifest)
            metrics.message_age(self.name, UpdateManifest.KIND, env.ts)
            _same_job(key_job, env)
        except MessageRejected as exc:
            if mine:
                self._refuse(exc, key_job, env, delivery)
            return
        m = env.body
        self.routes.announce(env.sender, m.transfer, list(m.part_digests), mine=mine, now=now)
        if not mine:
            return
        key = (env.sender, m.transfer)
        self._transfers.pop(key, None)  # a second manifest: the assembler refuses it below
        # the round's news may not have come yet: the parts are checked meanwhile, and the
        # round when the last part is in (the wait is beside the reader, see _finish)
        known = not (
            needs_round_news(self.book, env.job, env.round)
            and self._may_wait(env.job, env.round, env.sender)
        )
        try:
            info = None
            if known:
                info = check_round(
                    self.book,
                    job=env.job,
                    round_=env.round,
                    base_version=m.base_version,
                    client=env.sender,
                    now=self.ctx.clock(),
                )
                self.seen.check(env.job, env.round, env.sender)
            expected = None if info is None else round_layout(info)
            transfer = self.assembler.start(env, expected=expected, now=now)
        except MessageRejected as exc:
            self.routes.close(*key)
            self._refuse(exc, key_job, env, delivery)
            return
        self._transfers[key] = _Transfer(
            env, offset, RunningCheck(transfer.layout), known, offset, len(delivery.body)
        )
        self._client_event(
            "transfer.started", env, offset=offset, parts=transfer.count, values=transfer.total
        )

    async def _on_part(self, key_job: str, delivery: Delivery, now: float) -> None:
        """A part of a transfer this replica checks (or of none it knows: refused)."""
        offset = delivery.offset
        assert offset is not None
        env: Envelope[UpdatePart] | None = None
        try:
            self._bounded(key_job, delivery.body)
            env = of_kind(await self._open(delivery.body), UpdatePart)
            _same_job(key_job, env)
        except MessageRejected as exc:
            # a part that does not open names no one: its transfer waits for the real one
            self._refuse(exc, key_job, env, delivery)
            return
        key = (env.sender, env.body.transfer)
        held = self._transfers.get(key)
        if held is not None and held.last_offset == offset:
            # handed over again (its verdict did not go out): judge, do not count it twice
            if self.assembler.done(*key):
                await self._finish(key_job, key, delivery)
            return
        try:
            start, values = self.assembler.add(env, now=now)
            assert held is not None  # the assembler holds only the transfers started here
            held.last_offset = offset
            held.nbytes += len(delivery.body)
            if values.nbytes > OFF_LOOP_BYTES:
                await asyncio.to_thread(held.check.update, start, values)
            else:
                held.check.update(start, values)
        except MessageRejected as exc:
            if held is None:  # a part of no transfer held here: its own verdict
                self._refuse(exc, key_job, env, delivery)
                return
            self._end_transfer(key)
            where = f"part {env.body.index} at offset {offset}: {exc.detail}"
            self._refuse(
                MessageRejected(exc.reason, where), key_job, held.manifest, delivery, held.offset
            )
            return
        if self.assembler.done(*key):
            await self._finish(key_job, key, delivery)

    async def _finish(
        self, key_job: str, key: TransferKey, delivery: Delivery, waited: bool = False
    ) -> None:
        """Every part is in and passed: check the round again (it may have closed, or been
        unknown at the manifest), the norm and duplicates, then accept the manifest."""
        held = self._transfers.get(key)
        if held is None:
            return
        env = held.manifest
        if (
            not waited
            and not held.round_checked
            and needs_round_news(self.book, env.job, env.round)
        ):
            self.spawn(self._finish_later(key_job, key, delivery), name="ingest-round-news")
            return
        natural = (env.job, env.round, env.sender)
        try:
            info = check_round(
                self.book,
                job=env.job,
                round_=env.round,
                base_version=env.body.base_version,
                client=env.sender,
                now=self.ctx.clock(),
            )
            check_layout(info, held.check.layout)
            check_norm_bound(info, held.check.norm)
            self.seen.check(*natural)
            if natural in self._inflight:
                raise MessageRejected(
                    Reason.DUPLICATE,
                    f"{env.sender!r} has an update for round {env.round} of {env.job!r} in flight",
                )
        except MessageRejected as exc:
            self._end_transfer(key)
            self._refuse(exc, key_job, env, delivery, held.offset)
            return
        self._inflight.add(natural)
        await self._accept(
            env,
            held.offset,
            natural,
            norm=held.check.norm,
            nbytes=held.nbytes,
            parts=len(env.body.part_digests),
        )
        self._end_transfer(key)  # only now: a verdict that failed is made again

    async def _finish_later(self, key_job: str, key: TransferKey, delivery: Delivery) -> None:
        held = self._transfers.get(key)
        if held is None:
            return
        await self._await_news(held.manifest.job, held.manifest.round)
        await self.handle(
            lambda d: self._finish(key_job, key, d, waited=True), delivery, UpdatePart.KIND
        )

    def _end_transfer(self, key: TransferKey) -> None:
        self.assembler.drop(*key)
        self._transfers.pop(key, None)
        self.routes.close(*key)

    def _expire(self, now: float) -> None:
        """Refuse (CHUNK_MISMATCH) the transfers whose parts stopped coming for
        ``part_ttl_s``; reported beside the reader."""
        self.routes.expire(self.options.part_ttl_s, now)
        for key in self.assembler.expire(now):
            held = self._transfers.pop(key, None)
            self.routes.close(*key)
            if held is None:
                continue
            count = len(held.manifest.body.part_digests)
            exc = MessageRejected(
                Reason.CHUNK_MISMATCH,
                f"update in parts incomplete: {held.check.values} of {held.check.layout.size} "
                f"values ({count} parts) after {self.options.part_ttl_s:g}s without a part",
            )
            refused = self._refusal(exc, held.manifest.job, held.manifest, b"", held.offset)
            if refused is not None:
                self.counts["rejected"] += 1
                self.spawn(self._report_soon(refused), name="ingest-report")

    async def _report_soon(self, refused: _Refused) -> None:
        try:
            await self._report(refused)
        except TRANSIENT_ERRORS as exc:
            event(self.log, "report.deferred", logging.WARNING, error=repr(exc))

    async def _expire_every(self) -> None:
        pause = max(0.05, min(self.options.part_ttl_s / 4, 5.0))
        while True:
            await asyncio.sleep(pause)
            self._expire(self._monotonic())

    def _refuse(
        self,
        exc: MessageRejected,
        key_job: str,
        env: Envelope[Any] | None,
        delivery: Delivery,
        offset: int | None = None,
    ) -> None:
        """Raise the rejection for :meth:`on_rejected` to report, or shed it: count it
        for the summary (:meth:`report_shed`) when its sender spent its budget of reported
        rejections (:class:`~qflare.services.ingest.core.RejectionBudget`). ``offset``
        (default: the delivery's) is the one the verdict names: an update in parts is
        named by its manifest's."""
        at = delivery.offset if offset is None else offset
        refused = self._refusal(exc, key_job, env, delivery.body, at)
        if refused is not None:
            raise refused from None

    def _refusal(
        self,
        exc: MessageRejected,
        key_job: str,
        env: Envelope[Any] | None,
        data: bytes,
        offset: int | None,
    ) -> _Refused | None:
        """The rejection to report, or None when it was shed (:meth:`_refuse`)."""
        # the verdict names the stream it judged (the offset is one of updates.<key_job>);
        # an update of another job written there is in no round of this job. A body that
        # fails after its signature and digest verified is its signer's: named, so that the
        # aggregator need not wait for the deadline (a later valid update still enters)
        signed: tuple[str, str, int, bytes] | None = None
        if env is not None:
            signed = (env.sender, env.job, env.round, env.body_digest)
        elif isinstance(exc, SignedBodyRejected):
            signed = (exc.sender, exc.job, exc.round, exc.body_digest)
        sender = signed[0] if signed is not None else UNVERIFIED
        if not self.budget.take(sender, asyncio.get_running_loop().time()):
            self.budget.shed(key_job, sender, exc.reason.value)
            self.counts["shed"] += 1
            metrics.update_rejected(self.name, key_job, exc.reason.value)
            return None
        return _Refused(
            exc,
            job=key_job,
            round_=signed[2] if signed is not None and signed[1] == key_job else 0,
            client=signed[0] if signed is not None else None,
            claimed=None if signed is not None else _claimed_sender(data),
            digest=signed[3] if signed is not None else None,
            offset=offset,
        )

    async def _report_shed_every(self) -> None:
        while True:
            await asyncio.sleep(self.options.shed_report_s)
            await self.report_shed()

    async def report_shed(self) -> None:
        """One ``updates.shed`` warning per job for the rejections shed since the last
        report: how many, at what rate, by reason and by sender. A summary whose alert
        cannot be published now is kept and sent with the job's next one."""
        now = asyncio.get_running_loop().time()
        since, self._shed_since = self._shed_since, now
        due = dict(self._unsent)
        self._unsent.clear()
        for shed in self.budget.drain(now):
            seconds = max(now - since, 1e-9)
            event(
                self.log,
                "updates.shed",
                logging.WARNING,
                job=shed.job,
                count=shed.count,
                seconds=round(seconds, 3),
                per_s=round(shed.count / seconds, 1),
                reasons=shed.by_reason,
                senders=dict(list(shed.by_sender.items())[:10]),
            )
            earlier, began = due.get(shed.job, (None, since))
            due[shed.job] = (shed if earlier is None else earlier.merged(shed), began)
        for job, (shed, began) in sorted(due.items()):
            try:
                await self._alert_shed(shed, max(now - began, 1e-9))
            except TRANSIENT_ERRORS as exc:
                self._unsent[job] = (shed, began)
                event(self.log, "alert.deferred", logging.WARNING, job=job, error=repr(exc))

    async def _alert_shed(self, shed: Shed, seconds: float) -> None:
        reasons = ", ".join(f"{r} {n}" for r, n in shed.by_reason.items())
        senders = ", ".join(
            f"{'unverified senders' if c == UNVERIFIED else c} {n}"
            for c, n in list(shed.by_sender.items())[:10]
        )
        await self.alert(
            kind="updates.shed",
            severity="warning",
            job=shed.job,
            round=self.book.latest(shed.job) or 0,
            reason=next(iter(shed.by_reason)),
            detail=(
                f"{shed.count} rejected messages in {seconds:.1f}s not reported one by "
                f"one (over {self.options.report_burst:g} per sender, then "
                f"{self.options.report_per_s:g}/s): {reasons}; from {senders}"
            )[:4000],
        )

    def _mine(self, offset: int | None) -> bool:
        """Whether the update at ``offset`` is in this replica's share."""
        return offset is not None and offset % self.shares == self.share

    async def _open(self, data: bytes) -> Envelope[Any]:
        """Open a message of the update stream (an update, a manifest or a part)."""
        assert self.ctx.identity is not None and self.ctx.trust is not None
        return await open_off_loop(
            data,
            self.ctx.trust,
            limits=self.limits,
            expect_kind=UPDATE_KINDS,
            kem_key=self.ctx.identity.kem,
            now=self.ctx.clock(),
        )

    async def on_rejected(self, delivery: Delivery, exc: MessageRejected) -> None:
        if not isinstance(exc, _Refused):
            await super().on_rejected(delivery, exc)
            return
        self.counts["rejected"] += 1
        self._refusals.pop((exc.job, -1 if delivery.offset is None else delivery.offset), None)
        if exc.client is None:
            # about a sender whose signature did not verify, which the aggregator ignores:
            # reported beside the reader, so that reporting it holds no update behind it
            self.spawn(self._report(exc), name="ingest-report")
            return
        await self._report(exc)

    async def _report(self, exc: _Refused) -> None:
        who = exc.client or (f"{exc.claimed} (unverified)" if exc.claimed else "?")
        rejected = UpdateRejected(
            client=who[:256],
            reason=exc.reason,
            detail=exc.detail[:2048],
            update_digest=exc.digest,
            offset=exc.offset,
        )
        await emit(self, "update.rejected", rejected, job=exc.job, round=exc.round)
        metrics.update_rejected(self.name, exc.job, exc.reason.value)
        await self.alert(
            kind="update.rejected",
            severity="warning",
            job=exc.job,
            round=exc.round,
            reason=exc.reason.value,
            detail=f"{who}: {exc.detail}"[:4000],
            client=exc.client,
        )


def _same_job(key_job: str, env: Envelope[Any]) -> None:
    """WRONG_JOB for a message in the stream of ``key_job`` that names another job."""
    if env.job != key_job:
        raise MessageRejected(
            Reason.WRONG_JOB, f"the stream of job {key_job!r} holds an update for {env.job!r}"
        )


def _header(data: bytes) -> Header | None:
    """The envelope's unverified header (its kind decides the path), None if unreadable."""
    try:
        return peek_header(data)
    except MessageRejected:
        return None


def _kind(data: bytes) -> str | None:
    header = _header(data)
    return None if header is None else header.kind


def _claimed_sender(data: bytes) -> str | None:
    """The sender an envelope claims, for the rejection report only (never trusted)."""
    try:
        header = unpack(
            data, _HEADER_LIMITS, bin_as_view=True, max_bytes=_HEADER_LIMITS.max_bin_len
        )
    except MessageRejected:
        return None
    sender = header.get("sender") if isinstance(header, dict) else None
    return sender[:64] if isinstance(sender, str) else None


# One level of the envelope map, no tensors: enough to read the claimed sender.
_HEADER_LIMITS = DEFAULT_LIMITS.with_(
    max_depth=1, max_container_len=16, max_bin_len=DEFAULT_LIMITS.max_envelope_bytes
)


def build(ctx: ServiceContext) -> Service:
    return IngestService(ctx)
