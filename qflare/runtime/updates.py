"""A job's update stream as the stateful services read it (docs/architecture.md, "The data
plane").

Each client update is written once, into the job's stream ``updates.<job>``. Ingest checks
every message there and publishes a small signed verdict naming the update's digest and
offset. The aggregator and the detector read the same bytes from the stream and use an
update only under a digest that is vouched for: by ingest's ``update.accepted`` (the
aggregator) or by the aggregator's signed ``round.closed`` (the detector).
:meth:`UpdateFeed.fetch` reads exactly the vouched offsets and checks that the bytes hash to
the vouched digest before unsealing them with the reader's own key.

To overlap that work with the round, a feed also reads ahead (:meth:`UpdateFeed.start`):
each message the service may want (its ``wants`` callback, asked with the unverified header)
is verified in full (the client's certificate and signature, the body digest), unsealed and
decoded, and handed to ``sink``; the service keeps it under its (client, digest) key and
uses it only once a verdict names that digest. At a verdict the service first waits, for a
bounded time, until the read-ahead has passed the vouched offsets
(:meth:`UpdateFeed.wait_past`: updates it is still decoding are not read twice); whatever
it missed (a restart, a message it could not open) :meth:`fetch` reads again. Nothing is copied to disk: the stream
is the durable copy, and each service commits the offsets it used with its own state.

Reading in order costs every message its delivery, wanted or not: a flood written between
the updates of a round would hold the read-ahead (and the CPU it shares with ingest) on
messages no verdict will name. So a service tells its feed where the verdicts point
(:meth:`UpdateFeed.vouched`, a hint only: what is read still passes the read-ahead's full
checks); a read-ahead more than :data:`READ_AHEAD_MAX_LAG` messages behind a vouched offset
jumps to it, and the vouched updates it jumped over are read one by one at their offsets.
:meth:`fetch` likewise reads far-apart offsets apart, not in one pass over what lies
between them.

An update may also come in parts (:mod:`qflare.messages.parts`): one ``update.manifest``
and its ``update.part`` messages after it, interleaved with other senders' messages. A
verdict names the manifest (its offset and body digest). The feed never holds such an
update whole: the sink gets it with no tensors and its :attr:`StreamUpdate.layout`, and
returns a :class:`PartWriter` (a row of the round's matrix: :func:`into_rows`), into which
each part's values go as the part is read and checked (``PartAssembler``: in order, under the
digest the manifest signed); the writer is committed when the last part is in and aborted
when the transfer fails, so a half-written row never counts as holding the update. A
transfer counts as read (:meth:`UpdateFeed.passed`) only once its last part is in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from qflare.bus import Bus, BusClosed, Delivery, Outcome, StreamNotFound, StreamReader, topology
from qflare.bus.port import StreamOffset
from qflare.crypto.pki import TrustStore
from qflare.crypto.sealing import KemPrivateKey
from qflare.errors import QflareError
from qflare.messages import DEFAULT_LIMITS, Limits, Update
from qflare.messages.bodies import Evaluation, UpdateManifest, UpdatePart
from qflare.messages.envelope import Envelope, Header, of_kind, open_off_loop, peek_header
from qflare.messages.errors import MessageRejected, Reason
from qflare.messages.parts import PartAssembler, TransferKey, Values
from qflare.messages.tensors import Layout, RoundRows, RowWriter

#: Updates the read-ahead verifies and decodes at a time (hashing and AES-GCM release the GIL).
READ_AHEAD_WORKERS = 2
#: A feed whose stream the aggregator has not declared yet looks for it again after this
#: long, doubling up to the cap (a detector that starts first, or a job that ended).
STREAM_WAIT_S = 0.2
STREAM_WAIT_MAX_S = 1.0
#: At a verdict, how long a service waits for its read-ahead to pass the vouched offsets
#: before it reads what is still missing again (:meth:`UpdateFeed.wait_past`).
READ_AHEAD_WAIT_S = 5.0
#: A read-ahead further than this many messages behind an offset a verdict names stops
#: reading in order and jumps to it (:meth:`UpdateFeed.vouched`); offsets further apart
#: than this are read apart by :meth:`UpdateFeed.fetch`. A round's own updates lie closer
#: together than this unless something else was written between them.
READ_AHEAD_MAX_LAG = 256
#: How long reading one vouched offset on its own may take before it is left to the verdict.
FETCH_ONE_S = 30.0
#: The ranges a read-ahead jumped over that a feed remembers, the latest ones (a job's feed
#: lives as long as the job, and every jump adds one). An offset in a range it forgot is not
#: read on its own when a verdict names it: the read-ahead has passed it, so the verdict's
#: :meth:`UpdateFeed.fetch` reads it, as it reads any update the read-ahead did not keep.
MAX_SKIPPED_RANGES = 64
#: An update in parts none of whose parts came in the last this many messages: the
#: read-ahead no longer waits for it (:meth:`UpdateFeed.passed`), and :meth:`UpdateFeed.fetch`
#: counts its remaining parts missing. A transfer's parts follow each other, interleaved
#: with other senders' parts (one each, per round of a fair broker).
MAX_PART_GAP = 16 * READ_AHEAD_MAX_LAG
#: What the read-ahead reads: one-message updates, and updates in parts.
_KINDS = frozenset({Update.KIND, UpdateManifest.KIND, UpdatePart.KIND})


@dataclass(frozen=True, slots=True)
class StreamUpdate:
    """One update read from the stream, opened with the reader's own key."""

    round: int
    client: str
    digest: bytes
    offset: int
    base_version: int
    num_samples: int
    tensors: Mapping[str, np.ndarray]
    metrics: Mapping[str, float] = field(default_factory=dict)
    evaluation: Evaluation | None = None
    layout: Layout | None = None
    """Set for an update sent in parts (``digest`` and ``offset`` are its manifest's):
    ``tensors`` is empty, and the values go, part by part, into the :class:`PartWriter`
    the sink returns."""


class PartWriter(Protocol):
    """Where a sink wants an update in parts written (:class:`RowWriter`: a row of the
    round's matrix). :meth:`write` runs in a worker thread; False: it no longer wants them."""

    def write(self, start: int, values: Values) -> bool: ...

    def commit(self) -> bool: ...

    def abort(self) -> None: ...


#: A feed's sink: a one-message update is the sink's to keep (it returns None); for an
#: update in parts it returns where the values go, or None when it does not want them.
Sink = Callable[[StreamUpdate], Awaitable[PartWriter | None]]


async def into_rows(
    rows: RoundRows, update: StreamUpdate, generation: int | None = None
) -> RowWriter | None:
    """What a service's sink does with an update: a one-message update's tensors go into
    its row (in a worker thread; nothing when the row is held or ``generation`` is gone);
    an update in parts gets a writer into its row (None when held). ValueError: not the
    rows' layout."""
    ref = (update.client, update.digest)
    if update.layout is not None:
        return rows.writer(ref, update.layout, generation)
    await asyncio.to_thread(rows.add, ref, update.tensors, generation)
    return None


class _FlatWriter:
    """A :class:`PartWriter` into one flat vector: :meth:`UpdateFeed.fetch` without a sink
    returns such an update whole, as it returns one-message updates."""

    def __init__(self, size: int) -> None:
        self.values = np.empty(size, np.float32)
        self.written = 0

    def write(self, start: int, values: Values) -> bool:
        self.values[start : start + values.size] = values
        self.written += int(values.size)
        return True

    def commit(self) -> bool:
        return self.written == self.values.size

    def abort(self) -> None:
        pass


@dataclass
class _Incoming:
    """An update in parts being read: what the sink got for it, where its values go, the
    next part, and the offset of the last message of it read."""

    update: StreamUpdate
    key: TransferKey
    digests: Sequence[bytes]
    writer: PartWriter
    last: int
    next: int = 0


@dataclass(frozen=True, slots=True)
class Ref:
    """An update a verdict vouches for: its client, digest and offset in the stream."""

    client: str
    digest: bytes
    offset: int


class UpdateNotFound(QflareError):
    """A vouched update cannot be read from the stream (dropped by retention, the stream
    deleted, or its bytes are not the ones vouched for)."""

    reason = "UPDATE_NOT_FOUND"


class UpdateFeed:
    """One job's update stream, read for a service that holds the KEM key it is sealed to."""

    def __init__(
        self,
        bus: Bus,
        job: str,
        *,
        trust: TrustStore,
        kem_key: KemPrivateKey,
        wants: Callable[[int, str], bool],
        sink: Sink,
        limits: Limits = DEFAULT_LIMITS,
        log: logging.Logger | None = None,
    ) -> None:
        self.bus = bus
        self.job = job
        self.trust = trust
        self.kem_key = kem_key
        self.wants = wants
        self.sink = sink
        self.limits = limits
        self.log = log or logging.getLogger("qflare.updates")
        self._reader: StreamReader | None = None
        self._waiting: asyncio.Task[None] | None = None
        self._workers = asyncio.Semaphore(READ_AHEAD_WORKERS)
        self._pending: set[asyncio.Task[None]] = set()
        # offsets handed to the read-ahead and not yet done with (the sink not returned)
        self._in_flight: set[int] = set()
        self._progress = asyncio.Event()
        # vouched offsets the read-ahead has not reached, the ranges it jumped over, and
        # the jump under way (one at a time)
        self._hinted: dict[int, Ref] = {}
        self._skipped: deque[tuple[int, int]] = deque(maxlen=MAX_SKIPPED_RANGES)
        self._jump: asyncio.Task[None] | None = None
        # messages the in-order reader handed over since it last kept an update, and
        # whether it stopped on them
        self._unwanted = 0
        self._stopped = False
        # the in-order reader's generation: one stopped or replaced hands over nothing more
        self._generation = 0
        # updates in parts the in-order reader follows, and each sender's latest message
        # of that kind in flight (its parts are taken in order, one after another)
        self._parts = PartAssembler(limits)
        self._incoming: dict[TransferKey, _Incoming] = {}
        self._chains: dict[str, asyncio.Task[None]] = {}

    @property
    def next_offset(self) -> int | None:
        """The lowest offset the read-ahead has not handed over yet (None before it
        started at an offset it was not given as a number)."""
        return None if self._reader is None else self._reader.next_offset

    @property
    def running(self) -> bool:
        return self._reader is not None

    def passed(self, offset: int) -> bool:
        """Whether the read-ahead is done with every message up to ``offset``: handed over
        and, where it wanted one, verified, decoded and given to the sink; an update in
        parts whose manifest lies there, once its last part is in (or it failed, or no part
        of it came in the last :data:`MAX_PART_GAP` messages, or its round is no longer
        wanted)."""
        reader = self._reader
        position = None if reader is None else reader.next_offset
        if position is None or position <= offset:
            return False
        if any(o <= offset for o in self._in_flight):
            return False
        return not any(
            t.update.offset <= offset
            and position - t.last <= MAX_PART_GAP
            and self.wants(t.update.round, t.update.client)
            for t in self._incoming.values()
        )

    async def wait_past(self, offset: int, timeout: float = READ_AHEAD_WAIT_S) -> bool:
        """Wait until the read-ahead :meth:`passed` ``offset``, at most ``timeout`` seconds
        (at once False when it is not reading, or has handed over nothing since it attached
        at "next": it may never reach ``offset``). The read-ahead's sink has then had every
        update up to ``offset`` it wanted; what it did not keep is the caller's to
        :meth:`fetch`."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while not self.passed(offset):
            reader = self._reader
            left = until - loop.time()
            if reader is None or reader.next_offset is None or left <= 0:
                return False
            if self._stopped and self._jump is None and not self._in_flight:
                return False  # stopped in a flood: only a verdict moves it on
            progress = self._progress
            try:
                await asyncio.wait_for(progress.wait(), left)
            except TimeoutError:
                return self.passed(offset)
        return True

    def _moved(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def start(self, offset: StreamOffset = "next") -> None:
        """Read ahead from ``offset``. The stream is read by name, never declared: the
        aggregator declares a job's streams (and deletes them when the job ends), and the
        other readers' broker users may read ``updates.<job>`` but not configure it, so a
        reader can neither re-create a deleted stream nor delete one. If the stream does not
        exist yet, the feed waits for it in the background and then reads it from its first
        message (nothing in it is older than this call). If reading it fails otherwise (the
        broker away for longer than the bus retries an attach), the feed tries again in the
        background, ``"next"`` then meaning from the second of this call on: a feed that
        gave up would stay registered with its service and never read."""
        if self._reader is not None or self._waiting is not None:
            return
        called = _dt.datetime.fromtimestamp(math.floor(time.time()), _dt.UTC)
        try:
            await self._attach(offset)
        except StreamNotFound:
            start: StreamOffset = "first" if offset in ("next", "last") else offset
            self._waiting = asyncio.get_running_loop().create_task(self._wait_for_stream(start))
        except BusClosed:
            raise
        except Exception:
            self.log.warning("reading the update stream of %r failed", self.job, exc_info=True)
            again: StreamOffset = called if offset == "next" else offset
            self._waiting = asyncio.get_running_loop().create_task(self._wait_for_stream(again))

    async def _attach(self, offset: StreamOffset) -> None:
        self._reader = await self.bus.read_stream(
            topology.update_stream(self.job).name,
            functools.partial(self._read_ahead, self._generation),
            offset=offset,
            prefetch=8,
        )

    async def _wait_for_stream(self, offset: StreamOffset) -> None:
        delay = STREAM_WAIT_S
        while True:
            await asyncio.sleep(delay)
            try:
                await self._attach(offset)
            except StreamNotFound:
                delay = min(2 * delay, STREAM_WAIT_MAX_S)
                continue
            except Exception:
                self.log.warning("reading the update stream of %r failed", self.job, exc_info=True)
                delay = min(2 * delay, STREAM_WAIT_MAX_S)
                continue
            self.log.debug("update stream of %r found; reading ahead", self.job)
            return

    async def stop(self) -> None:
        self._drop_incoming()
        for task in (self._waiting, self._jump):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._waiting = self._jump = None
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.cancel()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    # -- following the verdicts ----------------------------------------------------------
    def vouched(self, ref: Ref) -> None:
        """A verdict names ``ref`` (a hint of where to read; the update read there still
        passes the read-ahead's checks). A read-ahead more than :data:`READ_AHEAD_MAX_LAG`
        messages behind it, or stopped in a flood, jumps to it; an offset it jumped over is
        read on its own."""
        reader = self._reader
        if reader is None or reader.next_offset is None:
            return
        if any(a <= ref.offset < b for a, b in self._skipped):
            self._read_alone(ref.offset)
            return
        if ref.offset < reader.next_offset:
            return  # handed over already
        self._hinted[ref.offset] = ref
        self._plan()

    def _plan(self) -> None:
        """Jump when a vouched offset lies far ahead of the reader, or any lies ahead of a
        reader that stopped in a flood (one jump at a time; the next is planned after it)."""
        reader = self._reader
        if self._jump is not None or reader is None or reader.next_offset is None:
            return
        position = reader.next_offset
        self._hinted = {o: r for o, r in self._hinted.items() if o >= position}
        if not self._hinted:
            return
        target = max(self._hinted)
        if self._stopped or target - position > READ_AHEAD_MAX_LAG:
            self._jump = asyncio.get_running_loop().create_task(self._jump_to(target))

    def _stop_in_flood(self) -> None:
        """The in-order reader handed over :data:`READ_AHEAD_MAX_LAG` messages since it last
        kept an update: it stops there (its position stays) until a verdict points further
        on."""
        reader = self._reader
        if reader is None or self._stopped:
            return
        self._stopped = True
        self._cancel_beside(reader)
        self.log.info(
            "read-ahead of %r stopped at offset %s: %d messages since it kept an update",
            self.job,
            reader.next_offset,
            self._unwanted,
        )
        self._moved()
        self._plan()

    def _cancel_beside(self, reader: StreamReader) -> None:
        # beside, not awaited: its handler may be the caller, or wait for a worker (what it
        # holds is in flight, and waited for by passed()); whatever it hands over until the
        # cancel lands is passed over (another generation)
        self._generation += 1
        self._drop_incoming()  # their parts may lie in what is passed over: fetch reads them
        stopping = asyncio.get_running_loop().create_task(reader.cancel())
        self._pending.add(stopping)
        stopping.add_done_callback(self._pending.discard)

    async def _jump_to(self, offset: int) -> None:
        """Stop reading in order, read the vouched offsets passed over one by one, and go on
        in order from ``offset``."""
        try:
            old = self._reader
            if old is None or old.next_offset is None or old.next_offset > offset:
                return
            start = old.next_offset
            if not self._stopped:
                self._cancel_beside(old)
            passed = sorted(o for o in self._hinted if start <= o < offset)
            for o in passed:
                self._read_alone(o)  # in flight before the new reader says it passed them
            if start < offset:
                self._skip(start, offset)
            self._hinted = {o: r for o, r in self._hinted.items() if o >= offset}
            self.log.info(
                "read-ahead of %r jumped %d messages to offset %d (%d vouched among them)",
                self.job,
                offset - start,
                offset,
                len(passed),
            )
            await self._attach(offset)
            self._stopped, self._unwanted = False, 0
            self._moved()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.warning("read-ahead of %r could not jump", self.job, exc_info=True)
        finally:
            self._jump = None
        self._plan()

    def _skip(self, start: int, end: int) -> None:
        """Remember that the read-ahead jumped over ``[start, end)``: joined to the range
        before it when they touch (a jump before the new reader handed anything over), the
        oldest forgotten past :data:`MAX_SKIPPED_RANGES`."""
        if self._skipped and self._skipped[-1][1] == start:
            start = self._skipped.pop()[0]
        self._skipped.append((start, end))

    def _read_alone(self, offset: int) -> None:
        """Read the update at ``offset`` on its own and hand it to the sink as the
        read-ahead would (what fails is left to the verdict's :meth:`fetch`)."""
        if offset in self._in_flight:
            return
        self._in_flight.add(offset)
        task = asyncio.get_running_loop().create_task(self._open_alone(offset))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _open_alone(self, offset: int) -> None:
        got: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()

        async def take(delivery: Delivery) -> Outcome:
            if delivery.offset == offset and not got.done():
                got.set_result(delivery)
            return Outcome.ACK

        try:
            reader = await self.bus.read_stream(
                topology.update_stream(self.job).name, take, offset=offset, prefetch=2
            )
            try:
                delivery = await asyncio.wait_for(got, FETCH_ONE_S)
            finally:
                await reader.cancel()
            head = peek_header(delivery.body, self.limits)
            if head.job != self.job or not self.wants(head.round, head.sender):
                return
            if head.kind == Update.KIND:
                async with self._workers:
                    await self.sink(await self._open(delivery.body, offset))
            elif head.kind == UpdateManifest.KIND:
                # verified in full (a hint vouches for nothing), then read on for its parts
                env = await self._open_env(delivery.body, UpdateManifest.KIND)
                ref = Ref(env.sender, env.body_digest, offset)
                await self._fetch_run(env.round, [ref], {}, [], FETCH_ONE_S, self.sink)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the verdict's fetch reads it again, or says why not
            self.log.debug("reading offset %s on its own failed: %r", offset, exc)
        finally:
            self._in_flight.discard(offset)
            self._moved()

    async def _read_ahead(self, generation: int, delivery: Delivery) -> Outcome:
        offset = delivery.offset
        assert offset is not None
        if self._stopped or generation != self._generation:
            return Outcome.ACK  # a reader stopped or replaced: its cancel is on the way
        # every message counts until one opens and is kept: a forged header can claim to
        # be wanted, a forged signature cannot
        self._unwanted += 1
        if self._unwanted > READ_AHEAD_MAX_LAG:
            self._stop_in_flood()
        try:
            head = peek_header(delivery.body, self.limits)
        except MessageRejected:
            self._moved()
            return Outcome.ACK  # garbage: ingest reports it
        if (
            head.kind not in _KINDS
            or head.job != self.job
            or not self.wants(head.round, head.sender)
        ):
            self._moved()
            return Outcome.ACK
        self._in_flight.add(offset)
        try:
            await self._workers.acquire()
        except BaseException:
            self._in_flight.discard(offset)
            raise
        loop = asyncio.get_running_loop()
        if head.kind == Update.KIND:
            task = loop.create_task(self._open_ahead(delivery))
        else:  # after the sender's message before it: its parts are checked in order
            before = self._chains.get(head.sender)
            task = loop.create_task(self._part_ahead(generation, delivery, head, before))
            self._chains[head.sender] = task
            task.add_done_callback(functools.partial(self._unchain, head.sender))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return Outcome.ACK

    def _unchain(self, sender: str, task: asyncio.Task[None]) -> None:
        if self._chains.get(sender) is task:
            del self._chains[sender]

    async def _part_ahead(
        self,
        generation: int,
        delivery: Delivery,
        head: Header,
        before: asyncio.Task[None] | None,
    ) -> None:
        """A manifest or part the in-order reader handed over, taken after ``before`` (the
        same sender's message before it). A part opens only while a transfer of its sender
        is followed (it may belong to another, or be a forgery: it then changes nothing)."""
        offset = delivery.offset
        assert offset is not None
        try:
            if before is not None:
                await asyncio.wait([before])  # its outcome is its own
            if generation != self._generation:
                return  # a reader stopped or replaced: what it followed is dropped
            if head.kind == UpdateManifest.KIND:
                await self._manifest_ahead(generation, delivery.body, offset)
            elif any(sender == head.sender for sender, _t in self._incoming):
                await self._part_in(delivery.body, offset)
        except MessageRejected as exc:
            self.log.debug("read-ahead skipped offset %s: %s", offset, exc)
        except Exception:
            self.log.warning("read-ahead failed at offset %s", offset, exc_info=True)
        finally:
            self._workers.release()
            self._in_flight.discard(offset)
            self._moved()

    async def _manifest_ahead(self, generation: int, data: bytes, offset: int) -> None:
        env = await self._open_env(data, UpdateManifest.KIND)
        self._reap()
        transfer = self._parts.start(env)
        update = _stream_update(of_kind(env, UpdateManifest), offset, transfer.layout)
        try:
            writer = await self.sink(update)
        except BaseException:
            self._parts.drop(*transfer.key)
            raise
        self._unwanted = 0
        if writer is None or generation != self._generation:
            self._parts.drop(*transfer.key)
            if writer is not None:
                writer.abort()
            return
        digests = transfer.manifest.part_digests
        self._incoming[transfer.key] = _Incoming(update, transfer.key, digests, writer, offset)

    async def _part_in(self, data: bytes, offset: int) -> None:
        env = await self._open_env(data, UpdatePart.KIND)
        self._reap()
        key = (env.sender, of_kind(env, UpdatePart).body.transfer)
        t = self._incoming.get(key)
        if t is None:
            return  # a part of a transfer not followed
        try:
            start, values = self._parts.add(env)
            wrote = await asyncio.to_thread(t.writer.write, start, values)
        except BaseException:
            self._forget(t)
            raise
        t.last, t.next = offset, t.next + 1
        self._unwanted = 0
        if not wrote:  # the sink wants no more (its round was reset)
            self._forget(t)
        elif self._parts.done(*key):
            self._parts.finish(*key)
            del self._incoming[key]
            if not t.writer.commit():
                self.log.debug("update in parts at offset %s not kept", t.update.offset)

    def _forget(self, t: _Incoming) -> None:
        """Stop following a transfer: its row, half written, is given back."""
        self._incoming.pop(t.key, None)
        self._parts.drop(*t.key)
        t.writer.abort()

    def _reap(self) -> None:
        """Give back the rows of transfers whose parts stopped coming (``ttl_s``)."""
        self._parts.expire()
        for t in [t for key, t in self._incoming.items() if key not in self._parts]:
            self._forget(t)

    def _drop_incoming(self) -> None:
        for t in list(self._incoming.values()):
            self._forget(t)

    async def _open_ahead(self, delivery: Delivery) -> None:
        assert delivery.offset is not None
        try:
            await self.sink(await self._open(delivery.body, delivery.offset))
            self._unwanted = 0
        except MessageRejected as exc:
            # ingest judges and reports it; if a verdict vouches for it anyway, fetch reads it
            self.log.debug("read-ahead skipped offset %s: %s", delivery.offset, exc)
        finally:
            self._workers.release()
            self._in_flight.discard(delivery.offset)
            self._moved()

    async def _open(
        self,
        data: bytes,
        offset: int,
        *,
        round_no: int | None = None,
        vouched: bytes | None = None,
    ) -> StreamUpdate:
        """The update at ``offset``, opened with this reader's key: verified in full, or
        under a ``vouched`` digest (the bytes must hash to it)."""
        env = await self._open_env(data, Update.KIND, round_no=round_no, vouched=vouched)
        return _stream_update(of_kind(env, Update), offset)

    async def _open_env(
        self,
        data: bytes,
        kind: str,
        *,
        round_no: int | None = None,
        vouched: bytes | None = None,
    ) -> Envelope[Any]:
        return await open_off_loop(
            data,
            self.trust,
            limits=self.limits,
            expect_kind=kind,
            expect_job=self.job,
            expect_round=round_no,
            kem_key=self.kem_key,
            vouched_digest=vouched,
        )

    async def fetch(
        self,
        round_no: int,
        refs: Sequence[Ref],
        timeout: float = 60.0,
        *,
        sink: Sink | None = None,
    ) -> dict[str, StreamUpdate]:
        """Read exactly ``refs`` from the stream, each under its vouched digest: one pass
        over each run of offsets less than :data:`READ_AHEAD_MAX_LAG` apart (not over a
        flood between them); raises :class:`UpdateNotFound` if any is missing or not the
        bytes vouched for. With ``sink`` each update is handed to it as it is read and
        returned without its tensors: one update's tensors in memory at a time (a round
        read again after a restart, whatever its size); what ``sink`` raises stops the read
        and is raised.

        A ref may name an update in parts (its manifest's offset and digest): the pass then
        reads on until every part of it is in, each opened under the digest the vouched
        manifest names, its values written as they come into the writer ``sink`` returns
        (without ``sink``, into one vector returned as the update's tensors); a part missing
        (none of the transfer's parts in :data:`MAX_PART_GAP` messages, or the stream ends
        before ``timeout``) is :class:`UpdateNotFound`, its writer aborted."""
        found: dict[str, StreamUpdate] = {}
        failed: list[str] = []
        for run in _runs(sorted(refs, key=lambda r: r.offset), READ_AHEAD_MAX_LAG):
            await self._fetch_run(round_no, run, found, failed, timeout, sink)
        missing = sorted(r.client for r in refs if r.client not in found)
        if missing:
            detail = (
                "; ".join(failed)
                or f"offsets {sorted(r.offset for r in refs)} not all in the stream"
            )
            raise UpdateNotFound(
                f"round {round_no} of {self.job!r}: updates of {missing} cannot be read: {detail}"
            )
        return found

    async def _fetch_run(
        self,
        round_no: int,
        refs: Sequence[Ref],
        found: dict[str, StreamUpdate],
        failed: list[str],
        timeout: float,
        sink: Sink | None = None,
    ) -> None:
        """One pass from the lowest offset of ``refs`` to the highest, and on until the
        parts of every update in parts among them are in, into ``found`` (and ``sink``:
        see :meth:`fetch`)."""
        wanted = {r.offset: r for r in refs}
        last = max(wanted)
        done = asyncio.Event()
        sunk: list[BaseException] = []  # what ``sink`` raised: the pass stops, fetch raises it
        settled: set[str] = set()  # the clients of ``refs`` found or failed in this pass
        parts = PartAssembler(self.limits)
        incoming: dict[str, _Incoming] = {}  # by client: the updates in parts being read

        def fail(ref: Ref, why: str) -> None:
            failed.append(f"offset {ref.offset} ({ref.client}): {why}")
            settled.add(ref.client)

        async def first(ref: Ref, data: bytes) -> None:
            """The message at a vouched offset: an update, or the manifest of one."""
            kind = peek_header(data, self.limits).kind
            if kind != UpdateManifest.KIND:
                update = await self._open(data, ref.offset, round_no=round_no, vouched=ref.digest)
                _check_sender(update.client, ref)
                if sink is not None:
                    await _sunk(sink(update))
                    update = dataclasses.replace(update, tensors={})
                found[ref.client] = update
                settled.add(ref.client)
                return
            env = await self._open_env(
                data, UpdateManifest.KIND, round_no=round_no, vouched=ref.digest
            )
            _check_sender(env.sender, ref)
            transfer = parts.start(env)
            update = _stream_update(of_kind(env, UpdateManifest), ref.offset, transfer.layout)
            writer = _FlatWriter(transfer.total) if sink is None else await _sunk(sink(update))
            if writer is None:  # the sink holds it already
                found[ref.client] = update
                settled.add(ref.client)
                return
            digests = transfer.manifest.part_digests
            incoming[ref.client] = _Incoming(update, transfer.key, digests, writer, ref.offset)

        async def part(t: _Incoming, data: bytes, offset: int) -> None:
            """A part of ``t``'s sender: the next one of ``t`` if it hashes to its digest
            (another transfer's part, or a forgery, changes nothing)."""
            try:
                env = await self._open_env(
                    data, UpdatePart.KIND, round_no=round_no, vouched=t.digests[t.next]
                )
            except MessageRejected:
                return
            ref = wanted[t.update.offset]
            try:
                start, values = parts.add(env)
            except MessageRejected as exc:
                del incoming[ref.client]
                t.writer.abort()
                fail(ref, f"part {t.next}: {exc}")
                return
            wrote = await _sunk(asyncio.to_thread(t.writer.write, start, values))
            t.last, t.next = offset, t.next + 1
            if wrote and not parts.done(*t.key):
                return
            del incoming[ref.client]
            parts.drop(*t.key)
            if not t.writer.commit():
                fail(ref, "its row was given back while its parts were read")
            elif isinstance(t.writer, _FlatWriter):
                tensors = t.update.layout.unflatten(t.writer.values) if t.update.layout else {}
                found[ref.client] = dataclasses.replace(t.update, tensors=tensors)
                settled.add(ref.client)
            else:
                found[ref.client] = t.update
                settled.add(ref.client)

        async def take(delivery: Delivery) -> Outcome:
            offset = delivery.offset
            assert offset is not None
            if done.is_set():
                return Outcome.ACK
            ref = wanted.get(offset)
            try:
                if ref is not None and ref.client not in settled:
                    try:
                        await first(ref, delivery.body)
                    except MessageRejected as exc:
                        fail(ref, str(exc))
                elif incoming:
                    head = _peek(delivery.body, self.limits)
                    t = None if head is None else incoming.get(head.sender)
                    if t is not None and head is not None and head.kind == UpdatePart.KIND:
                        await part(t, delivery.body, offset)
            except _SinkFailed as exc:  # the caller's: raised by fetch, not here
                sunk.append(exc.error)
                done.set()
                return Outcome.ACK
            for client, t in list(incoming.items()):
                if offset - t.last > MAX_PART_GAP:
                    del incoming[client]
                    t.writer.abort()
                    fail(wanted[t.update.offset], _parts_missing(t, offset))
            if not incoming and (offset >= last or len(settled) == len(wanted)):
                done.set()
            return Outcome.ACK

        try:
            reader = await self.bus.read_stream(
                topology.update_stream(self.job).name, take, offset=min(wanted), prefetch=8
            )
        except StreamNotFound as exc:  # deleted: the job ended
            raise UpdateNotFound(
                f"round {round_no} of {self.job!r}: the update stream is gone ({exc})"
            ) from exc
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            await reader.cancel()
            for t in incoming.values():  # the stream ended before their last part
                t.writer.abort()
                fail(wanted[t.update.offset], _parts_missing(t, None))
            incoming.clear()
        if sunk:
            raise sunk[0]


class _SinkFailed(Exception):
    """What a fetch's sink (or the writer it returned) raised, carried out of the pass."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


async def _sunk(call: Awaitable[Any]) -> Any:
    """Await a call of the caller's (a sink, a writer): what it raises is :class:`_SinkFailed`."""
    try:
        return await call
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise _SinkFailed(exc) from exc


def _check_sender(sender: str, ref: Ref) -> None:
    if sender != ref.client:
        raise MessageRejected(
            Reason.SENDER_MISMATCH,
            f"offset {ref.offset} holds an update of {sender!r}, vouched for {ref.client!r}",
        )


def _peek(data: bytes, limits: Limits) -> Header | None:
    try:
        return peek_header(data, limits)
    except MessageRejected:
        return None


def _parts_missing(t: _Incoming, at: int | None) -> str:
    where = "before the stream ended" if at is None else f"by offset {at}"
    return f"parts {t.next}..{len(t.digests) - 1} of the update in parts not found {where}"


def _runs(refs: Sequence[Ref], gap: int) -> list[list[Ref]]:
    """``refs`` (sorted by offset) cut where two neighbours lie more than ``gap`` apart."""
    runs: list[list[Ref]] = []
    for ref in refs:
        if runs and ref.offset - runs[-1][-1].offset <= gap:
            runs[-1].append(ref)
        else:
            runs.append([ref])
    return runs


def _stream_update(
    env: Envelope[Update] | Envelope[UpdateManifest], offset: int, layout: Layout | None = None
) -> StreamUpdate:
    """The update ``env`` carries: its tensors, or for an update in parts (``env`` is its
    manifest) no tensors and the ``layout`` its parts fill."""
    body = env.body
    return StreamUpdate(
        round=env.round,
        client=env.sender,
        digest=env.body_digest,
        offset=offset,
        base_version=body.base_version,
        num_samples=body.num_samples,
        tensors=body.tensors if isinstance(body, Update) else {},
        metrics=body.metrics,
        evaluation=body.evaluation,
        layout=layout,
    )
