"""Ingest's pure core: what an update must satisfy to enter an open round.

Ingest is stateless (docs/architecture.md): it holds only a cache of the rounds that are open,
learnt from ``round.opened`` / ``round.closed`` events, and a bounded memory of the
``(job, round, client)`` triples it has accepted. Everything here works on plain data
(numpy arrays, ints, strings) and raises :class:`MessageRejected` with a stable
:class:`Reason`, so each rule is unit-tested without a broker, and the service shell only
decodes, calls :func:`check_update_round` and :func:`check_tensors`, and publishes
:func:`accepted_update`.

Order of checks: identity and round first (cheap, and they decide whether the tensors are
worth looking at), then tensor names, dtypes and shapes (metadata only), then the values
(finiteness, L2 norm), computed in float64 so a float32 overflow cannot hide an infinite
norm. Duplicate suppression is best effort (per replica, bounded); the aggregator, which
stores updates keyed by ``(job, round, client)``, is authoritative.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from qflare.messages.bodies import TensorSpec, Update, UpdateAccepted, UpdateManifest
from qflare.messages.envelope import Envelope
from qflare.messages.errors import MessageRejected, Reason
from qflare.messages.tensors import Layout
from qflare.messages.validate import validate_update

#: Rounds remembered as closed per job, so a late ``round.opened`` redelivery cannot reopen one.
_CLOSED_MEMORY = 64


@dataclass(frozen=True, slots=True)
class OpenRound:
    """What ingest knows about one open round (from ``round.opened``).

    ``participants`` is ``None`` when every certified client may contribute.
    ``deadline`` is a unix time (``None``: no deadline at ingest; the aggregator closes).
    ``max_norm`` bounds the L2 norm of the whole update (``None``: only finiteness).
    """

    job: str
    round: int
    base_version: int
    tensors: tuple[TensorSpec, ...]
    participants: frozenset[str] | None = None
    deadline: float | None = None
    max_norm: float | None = None

    @property
    def update_nbytes(self) -> int:
        return sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in self.tensors)


@dataclass
class RoundBook:
    """The open rounds per job, as seen through possibly reordered, redelivered events."""

    _open: dict[str, OpenRound] = field(default_factory=dict)
    _closed: dict[str, OrderedDict[int, None]] = field(default_factory=dict)
    _latest: dict[str, int] = field(default_factory=dict)

    def opened(self, info: OpenRound) -> bool:
        """Record ``round.opened``; returns False when it is stale (an older or closed
        round, e.g. a redelivered or periodically re-announced event)."""
        if info.round in self._closed.get(info.job, ()):
            return False
        if info.round < self._latest.get(info.job, -1):
            return False
        self._open[info.job] = info
        self._latest[info.job] = info.round
        return True

    def closed(self, job: str, round_: int) -> None:
        closed = self._closed.setdefault(job, OrderedDict())
        closed[round_] = None
        while len(closed) > _CLOSED_MEMORY:
            closed.popitem(last=False)
        current = self._open.get(job)
        if current is not None and current.round == round_:
            del self._open[job]
        self._latest[job] = max(self._latest.get(job, -1), round_)

    def ended(self, job: str) -> None:
        self._open.pop(job, None)

    def get(self, job: str) -> OpenRound | None:
        return self._open.get(job)

    def knows(self, job: str) -> bool:
        return job in self._latest

    def latest(self, job: str) -> int | None:
        return self._latest.get(job)

    def was_closed(self, job: str, round_: int) -> bool:
        return round_ in self._closed.get(job, ())

    def jobs(self) -> list[str]:
        return sorted(self._open)


def check_round(
    book: RoundBook, *, job: str, round_: int, base_version: int, client: str, now: float
) -> OpenRound:
    """The update's job/round/base version/sender against the open round; returns it.

    An update for an older round (a replay, or a straggler) is STALE_ROUND; one for the
    latest round after it closed, or past its deadline, is ROUND_CLOSED."""
    info = book.get(job)
    if info is None:
        latest = book.latest(job)
        if latest is None:
            raise MessageRejected(Reason.WRONG_JOB, f"no open round for job {job!r}")
        if round_ == latest and book.was_closed(job, round_):
            raise MessageRejected(Reason.ROUND_CLOSED, f"round {round_} of job {job!r} is closed")
        raise MessageRejected(
            Reason.STALE_ROUND,
            f"job {job!r} has no open round (latest {latest}), update is for round {round_}",
        )
    if round_ != info.round:
        raise MessageRejected(
            Reason.STALE_ROUND,
            f"update for round {round_}, job {job!r} has round {info.round} open",
        )
    if base_version != info.base_version:
        raise MessageRejected(
            Reason.STALE_BASE,
            f"update computed on model version {base_version}, round {info.round} uses {info.base_version}",
        )
    if info.participants is not None and client not in info.participants:
        raise MessageRejected(
            Reason.NOT_PARTICIPANT, f"{client!r} was not selected for round {info.round} of {job!r}"
        )
    if info.deadline is not None and now > info.deadline:
        raise MessageRejected(
            Reason.ROUND_CLOSED,
            f"round {info.round} of {job!r} passed its deadline {now - info.deadline:.1f}s ago",
        )
    return info


def check_update_round(book: RoundBook, env: Envelope[Update], now: float) -> OpenRound:
    """:func:`check_round` for the verified update ``env``: its header names the job, the
    round and the sender, its body the base version."""
    return check_round(
        book,
        job=env.job,
        round_=env.round,
        base_version=env.body.base_version,
        client=env.sender,
        now=now,
    )


def accepted_update(
    env: Envelope[Update] | Envelope[UpdateManifest], offset: int
) -> UpdateAccepted:
    """Ingest's verdict on the update ``env`` that passed every check: it names the bytes
    (their digest and ``offset`` in the job's update stream), not the tensors. For an
    update sent in parts, ``env`` is its manifest, whose body digest covers every part's."""
    return UpdateAccepted(
        client=env.sender,
        update_digest=env.body_digest,
        base_version=env.body.base_version,
        num_samples=env.body.num_samples,
        offset=offset,
    )


def needs_round_news(book: RoundBook, job: str, round_: int) -> bool:
    """True when the update is for a job or round this replica has not heard of yet: the
    ``round.opened`` event may simply not have reached it (a fresh replica, a race between
    its two queues), so the shell waits briefly for news before rejecting."""
    latest = book.latest(job)
    return latest is None or round_ > latest


def check_tensors(info: OpenRound, tensors: Mapping[str, np.ndarray]) -> float:
    """Names, dtypes, shapes and finiteness against the round's tensor spec (the wire's
    :func:`qflare.messages.validate_update`), then the L2 norm; returns the norm."""
    validate_update(tensors, info.tensors)
    return check_norm(info, tensors)


def check_norm(info: OpenRound, tensors: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of the whole update against ``info.max_norm``; returns the norm.
    Assumes finite values (checked before)."""
    total = 0.0
    for name in sorted(tensors):
        flat = tensors[name].reshape(-1)
        if flat.size == 0:
            continue
        if flat.dtype == np.float32:
            with np.errstate(over="ignore"):
                part = float(np.dot(flat, flat))
        else:
            part = math.inf
        if not math.isfinite(part) or part > 1e30:
            # a float32 sum of squares overflows near 1.8e19 per element; redo it in float64
            # (rare: only for absurd updates), keeping the fast single-precision pass for the
            # common case (a bound check tolerates float32's ~1e-4 relative error)
            f64 = flat.astype(np.float64, copy=False)
            part = float(np.dot(f64, f64))
        total += part
    norm = math.sqrt(total)
    if not math.isfinite(norm):
        raise MessageRejected(Reason.NON_FINITE, "update norm overflows float64")
    if info.max_norm is not None and norm > info.max_norm:
        raise MessageRejected(
            Reason.TOO_LARGE, f"update L2 norm {norm:.4g} exceeds the limit {info.max_norm:.4g}"
        )
    return norm


def max_envelope_bytes(info: OpenRound, *, slack: float = 1.25, overhead: int = 64 * 1024) -> int:
    """The largest envelope an honest update for ``info`` can be: tensor bytes plus
    headers, certificate, signature and (sealed) AEAD overhead. Checked before decoding,
    so an oversized message costs no allocation."""
    return int(info.update_nbytes * slack) + overhead


@dataclass
class SeenUpdates:
    """Bounded memory of accepted ``(job, round, client)`` triples (best effort, per replica)."""

    capacity: int = 100_000
    _seen: OrderedDict[tuple[str, int, str], str] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {self.capacity!r}")

    def check(self, job: str, round_: int, client: str) -> None:
        digest = self._seen.get((job, round_, client))
        if digest is not None:
            raise MessageRejected(
                Reason.DUPLICATE,
                f"{client!r} already sent an update for round {round_} of {job!r} ({digest[:16]})",
            )

    def add(self, job: str, round_: int, client: str, digest: str) -> None:
        self._seen[(job, round_, client)] = digest
        self._seen.move_to_end((job, round_, client))
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def forget_round(self, job: str, keep_from: int) -> None:
        """Drop triples of rounds older than ``keep_from`` (the round book rejects them anyway)."""
        for key in [k for k in self._seen if k[0] == job and k[1] < keep_from]:
            del self._seen[key]

    def __len__(self) -> int:
        return len(self._seen)


#: The bucket every sender whose signature did not verify shares: a claimed id costs a forger
#: nothing, so it cannot buy a budget of its own (nor spend an honest client's).
UNVERIFIED = "?"


@dataclass(frozen=True, slots=True)
class Shed:
    """The rejections of one job that were counted instead of reported one by one."""

    job: str
    count: int
    by_reason: dict[str, int]
    by_sender: dict[str, int]

    def merged(self, later: Shed) -> Shed:
        """This summary and a ``later`` one of the same job as one (a summary whose alert
        could not be published goes out with the next)."""
        if later.job != self.job:
            raise ValueError(f"summaries of jobs {self.job!r} and {later.job!r}")
        by_reason = Counter(self.by_reason) + Counter(later.by_reason)
        by_sender = Counter(self.by_sender) + Counter(later.by_sender)
        return Shed(
            self.job,
            self.count + later.count,
            dict(by_reason.most_common()),
            dict(by_sender.most_common()),
        )


@dataclass
class RejectionBudget:
    """How many rejections ingest reports one by one, per sender.

    Each reported rejection costs two signatures and two publishes (``update.rejected`` and
    an alert), about a hundred times what checking a garbage message costs, so a flood of
    rejections reported one by one would hold every update behind it in the stream. A sender
    (a verified client id, or :data:`UNVERIFIED` for everyone else) has a token bucket of
    ``burst`` reports refilled at ``per_s``; a rejection beyond it is shed: counted per
    (job, sender, reason) and reported with the others of its job once per interval
    (:meth:`drain`). An honest client, refused once in a while, always gets its own
    ``update.rejected`` (which the aggregator needs to close a round early)."""

    burst: float = 8.0
    per_s: float = 2.0
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    _shed: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if not self.burst >= 1 or not self.per_s >= 0:
            raise ValueError(f"need burst >= 1 and per_s >= 0, got {self.burst}, {self.per_s}")

    def take(self, sender: str, now: float) -> bool:
        """Whether a rejection of ``sender`` at ``now`` is reported (spends a token)."""
        tokens, last = self._buckets.get(sender, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.per_s)
        if tokens < 1.0:
            self._buckets[sender] = (tokens, now)
            return False
        self._buckets[sender] = (tokens - 1.0, now)
        return True

    def shed(self, job: str, sender: str, reason: str) -> None:
        self._shed[(job, sender, reason)] += 1

    @property
    def pending(self) -> int:
        return sum(self._shed.values())

    def drain(self, now: float) -> list[Shed]:
        """What was shed since the last drain, per job; forgets the buckets that have
        filled up again (so memory follows the senders active lately)."""
        jobs: dict[str, tuple[Counter[str], Counter[str]]] = {}
        for (job, sender, reason), n in self._shed.items():
            by_reason, by_sender = jobs.setdefault(job, (Counter(), Counter()))
            by_reason[reason] += n
            by_sender[sender] += n
        self._shed.clear()
        for sender, (tokens, last) in list(self._buckets.items()):
            if tokens + max(0.0, now - last) * self.per_s >= self.burst:
                del self._buckets[sender]
        return [
            Shed(job, sum(r.values()), dict(r.most_common()), dict(s.most_common()))
            for job, (r, s) in sorted(jobs.items())
        ]


# --- updates in parts (qflare.messages.parts) -------------------------------------------


def round_layout(info: OpenRound) -> Layout:
    """The round's tensors as an update in parts must lay them out: sorted names, their
    shapes (the values are float32 whatever the model's dtype)."""
    spec = sorted(info.tensors, key=lambda t: t.name)
    return Layout(
        tuple(t.name for t in spec),
        tuple(tuple(t.shape) for t in spec),
        ("float32",) * len(spec),
    )


def check_layout(info: OpenRound, layout: Layout) -> None:
    """A manifest's tensor names and shapes against the round's (SHAPE_MISMATCH)."""
    ours = round_layout(info)
    if (layout.names, layout.shapes) != (ours.names, ours.shapes):
        theirs = list(zip(layout.names, layout.shapes, strict=True))
        raise MessageRejected(
            Reason.SHAPE_MISMATCH,
            f"tensors {theirs[:5]} differ from the round's "
            f"{list(zip(ours.names, ours.shapes, strict=True))[:5]}",
        )


def check_norm_bound(info: OpenRound, norm: float) -> None:
    """An L2 norm computed as the parts came (finite: :class:`RunningCheck` refused any
    value that was not) against ``info.max_norm``."""
    if info.max_norm is not None and norm > info.max_norm:
        raise MessageRejected(
            Reason.TOO_LARGE, f"update L2 norm {norm:.4g} exceeds the limit {info.max_norm:.4g}"
        )


class Route(StrEnum):
    """What a replica does with a message of a transfer (:class:`PartRoutes`)."""

    MINE = "mine"
    """Its transfer is this replica's: open the part and check it."""
    OTHERS = "others"
    """Another replica checks its transfer: pass it over."""
    CLOSED = "closed"
    """Its transfer was accepted, refused or expired: pass it over."""
    UNKNOWN = "unknown"
    """No manifest read here names it: the replica whose offset share holds it refuses it."""


@dataclass
class _Routed:
    mine: bool
    digests: tuple[bytes, ...]
    seen: float
    next_index: int = 0
    closed: bool = False


@dataclass
class PartRoutes:
    """Which replica checks each part, as every replica reads every manifest.

    With ``share = "i/N"`` a replica checks the offsets ``o`` with ``o % N == i``; an update
    in parts belongs as a whole to the replica whose share holds its manifest's offset. Each
    replica therefore opens every manifest (a few hundred bytes plus 32 per part) and notes
    the signed body digest of each of its parts; a part's header (read unverified, without
    opening the body) then tells whose it is: its digest, or else the claimed sender's open
    transfer. A part that no manifest read here names (its transfer started before this
    replica began reading, or a part no one announced) is :attr:`Route.UNKNOWN`. Transfers
    are remembered after they end (their late or repeated parts are passed over), at most
    ``capacity`` of them."""

    capacity: int = 10_000
    _transfers: OrderedDict[tuple[str, bytes], _Routed] = field(default_factory=OrderedDict)
    _digests: dict[bytes, tuple[str, bytes]] = field(default_factory=dict)

    def announce(
        self, sender: str, transfer: bytes, digests: list[bytes], *, mine: bool, now: float
    ) -> None:
        """A manifest opened: its parts (by digest) go to this replica when ``mine``."""
        key = (sender, transfer)
        self._forget(key)
        self._transfers[key] = _Routed(mine, tuple(digests), now)
        for d in digests:
            self._digests[d] = key
        while len(self._transfers) > self.capacity:
            self._forget(next(iter(self._transfers)))

    def _forget(self, key: tuple[str, bytes]) -> None:
        routed = self._transfers.pop(key, None)
        if routed is not None:
            for d in routed.digests:
                if self._digests.get(d) == key:
                    del self._digests[d]

    def route(self, sender: str, digest: bytes, now: float) -> Route:
        """Whose is the part that claims ``sender`` and has the signed ``digest``."""
        key = self._digests.get(digest)
        if key is None:
            # a part no manifest named: the claimed sender's open transfer (if any) decides,
            # so its owner refuses it with that transfer (out of range, forged, ...)
            open_ = [r for (s, _), r in self._transfers.items() if s == sender and not r.closed]
            if not open_:
                return Route.UNKNOWN
            return Route.MINE if open_[-1].mine else Route.OTHERS
        routed = self._transfers[key]
        if routed.closed:
            return Route.CLOSED
        routed.seen = now
        if not routed.mine:
            # another replica's transfer: it ends here when its last part goes by
            if routed.digests.index(digest) == len(routed.digests) - 1:
                routed.closed = True
            return Route.OTHERS
        return Route.MINE

    def close(self, sender: str, transfer: bytes) -> None:
        """The transfer was accepted, refused or expired: its parts are passed over."""
        routed = self._transfers.get((sender, transfer))
        if routed is not None:
            routed.closed = True

    def expire(self, ttl_s: float, now: float) -> None:
        """Close the other replicas' transfers quiet for ``ttl_s`` (this replica's own are
        expired by its :class:`~qflare.messages.parts.PartAssembler`, which reports them)."""
        for routed in self._transfers.values():
            if not routed.mine and now - routed.seen > ttl_s:
                routed.closed = True

    def __len__(self) -> int:
        return len(self._transfers)
