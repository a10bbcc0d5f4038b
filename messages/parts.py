"""Updates of any size as one signed manifest and signed parts, sent and checked in bounded
memory.

An update travels as one ``update.manifest`` (what an ``update`` carries besides its
tensors, the tensors' names and shapes, and the signed ``body_digest`` of every part)
followed by ``update.part`` envelopes, each holding ``part_values`` consecutive float32
values of the update flattened in :class:`~qflare.messages.tensors.Layout` order (sorted
names, C order). All are ordinary envelopes of one sender, job and round: peeked, sealed
(each part on its own) and opened like any other message.

Unlike :mod:`qflare.messages.chunks`, which cuts an encoded envelope and must rebuild it
whole before it can be opened, each part opens by itself and its values (a read-only view
into the received bytes) go straight to where they belong: a row of the round's matrix, a
model's tensors. Nothing here keeps an update's values; a transfer in progress is its
manifest (32 bytes of digest per part) and a counter.

The manifest's signature covers every part's body digest, so the manifest's own body digest
names the whole update: ingest can accept it as the ``update_digest``, and a reader that
ingest vouched for can open part ``i`` with ``open_envelope(..., vouched_digest=
manifest.part_digests[i])`` with no second signature check.

Receiving (:class:`PartAssembler`): the parts of one transfer come in order after their
manifest (one sender's messages on one stream keep their order). A refusal of a message
whose signature verified drops that transfer at once, so nothing half-built is kept and
nothing half-built is used. A message that does not open (a bad signature, bytes that do
not hash to the signed digest) names no one, as anyone can claim a sender: it drops nothing
(and never reaches the assembler). A transfer whose parts stop coming is dropped after
``ttl_s``; a reader that starts between a manifest and its parts refuses them as belonging
to no transfer, and one that reads again from the manifest rebuilds the update.
"""

from __future__ import annotations

import bisect
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from qflare.crypto.keystore import Identity
from qflare.messages.bodies import Evaluation, TensorShape, UpdateManifest, UpdatePart
from qflare.messages.chunks import DEFAULT_CHUNK_SIZE
from qflare.messages.envelope import Envelope, SealTo, encode, of_kind, peek_header
from qflare.messages.errors import MessageRejected, Reason
from qflare.messages.limits import DEFAULT_LIMITS, Limits, MiB
from qflare.messages.tensors import Layout, Tensors

_F32 = np.dtype("<f4")
#: Values per part: 8 MiB of float32, the chunk size RabbitMQ's client moves fastest.
DEFAULT_PART_VALUES = DEFAULT_CHUNK_SIZE // _F32.itemsize
#: An update whose tensor bytes exceed this travels in parts; a smaller one as one ``update``.
PART_THRESHOLD_BYTES = 64 * MiB
#: Bytes of a part envelope besides its values: header, certificate (~6.5 KB), signature
#: (3309), seal framing (~1.2 KB) and tensor header, with room to spare.
PART_OVERHEAD = 64 * 1024
#: Sealed parts are encoded once and kept until the manifest is out: in memory up to this
#: many bytes, then in a temporary file.
DEFAULT_SPOOL_BYTES = 32 * MiB
PART_KINDS = frozenset({UpdateManifest.KIND, UpdatePart.KIND})

Values = npt.NDArray[np.float32]
#: A transfer as a receiver knows it: (sender, transfer id).
TransferKey = tuple[str, bytes]


def max_part_values(limits: Limits = DEFAULT_LIMITS) -> int:
    """The most values one part may hold so that its envelope fits ``limits``."""
    return (limits.max_envelope_bytes - PART_OVERHEAD) // _F32.itemsize


def part_count(total: int, part_values: int) -> int:
    """Parts of ``total`` values, ``part_values`` each (the last may hold fewer)."""
    return -(-total // part_values)


# --- sending ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitUpdate:
    """An update's tensors cut into parts: what the manifest names, and the parts, made on
    demand (as often as asked: each pass reads the tensors again, one part at a time)."""

    transfer: bytes
    layout: Layout
    """The tensors' names, shapes and dtypes as given (the parts are float32 whatever
    their dtype, as :meth:`Layout.flatten` makes them)."""
    part_values: int
    tensors: Tensors

    @property
    def total(self) -> int:
        return self.layout.size

    @property
    def count(self) -> int:
        return part_count(self.total, self.part_values)

    def shapes(self) -> list[TensorShape]:
        return [
            TensorShape(name=n, shape=list(s))
            for n, s in zip(self.layout.names, self.layout.shapes, strict=True)
        ]

    def parts(self) -> Iterator[UpdatePart]:
        """Each part in order. A part inside one float32 C-contiguous tensor is a view of
        it; any other part is one fresh array of its values (one part copied at a time)."""
        arrays = [np.asarray(self.tensors[n]) for n in self.layout.names]
        t, t_start = 0, 0  # the tensor holding value `pos`, and its first flat index
        for index in range(self.count):
            a = index * self.part_values
            b = min(a + self.part_values, self.total)
            pieces = []
            pos = a
            while pos < b:
                while pos >= t_start + arrays[t].size:  # past this tensor (or it is empty)
                    t_start += arrays[t].size
                    t += 1
                stop = min(b, t_start + arrays[t].size)
                pieces.append(_flat_slice(arrays[t], pos - t_start, stop - t_start))
                pos = stop
            if len(pieces) == 1 and pieces[0].dtype == _F32:
                values = pieces[0]
            else:
                values = np.empty(b - a, _F32)
                offset = 0
                for piece in pieces:
                    values[offset : offset + piece.size] = piece
                    offset += piece.size
            yield UpdatePart(transfer=self.transfer, index=index, values=values)

    def manifest(
        self,
        part_digests: Sequence[bytes],
        *,
        base_version: int,
        num_samples: int,
        metrics: Mapping[str, float] | None = None,
        evaluation: Evaluation | None = None,
    ) -> UpdateManifest:
        """The manifest of these parts, whose envelopes have ``part_digests``."""
        if len(part_digests) != self.count:
            raise ValueError(f"{len(part_digests)} part digests for {self.count} parts")
        return UpdateManifest(
            base_version=base_version,
            num_samples=num_samples,
            metrics=dict(metrics or {}),
            evaluation=evaluation,
            transfer=self.transfer,
            tensors=self.shapes(),
            part_values=self.part_values,
            part_digests=list(part_digests),
        )


def _flat_slice(a: np.ndarray[Any, Any], start: int, stop: int) -> np.ndarray[Any, Any]:
    """Values ``start:stop`` of ``a`` in C order: a view when ``a`` is C-contiguous, else a
    copy of that range only (``reshape(-1)`` would copy the whole tensor)."""
    if a.flags.c_contiguous:
        return a.reshape(-1)[start:stop]
    return np.asarray(a.flat[start:stop])


def split_update(
    tensors: Tensors,
    *,
    part_values: int = DEFAULT_PART_VALUES,
    transfer: bytes | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> SplitUpdate:
    """Cut ``tensors`` (name -> floating-point array) into parts of ``part_values`` values;
    ``transfer`` defaults to 16 random bytes. Nothing is read or copied yet."""
    if not tensors:
        raise ValueError("an update needs at least one tensor")
    if isinstance(part_values, bool) or not isinstance(part_values, int) or part_values <= 0:
        raise ValueError(f"part_values must be a positive int, got {part_values!r}")
    if part_values > max_part_values(limits):
        raise ValueError(
            f"part_values {part_values} makes parts larger than one envelope; at most "
            f"{max_part_values(limits)} values fit in {limits.max_envelope_bytes} bytes"
        )
    for name, array in tensors.items():
        if np.asarray(array).dtype.kind != "f":
            raise ValueError(
                f"tensor {name!r} has dtype {np.asarray(array).dtype}; parts are float32"
            )
    transfer = os.urandom(16) if transfer is None else transfer
    if len(transfer) != 16:
        raise ValueError(f"transfer must be 16 bytes, got {len(transfer)}")
    layout = Layout.of(tensors)
    if layout.size == 0:
        raise ValueError("an update needs at least one value")
    return SplitUpdate(transfer, layout, part_values, tensors)


def encode_update_parts(
    identity: Identity,
    tensors: Tensors,
    *,
    job: str,
    round: int,
    base_version: int,
    num_samples: int,
    metrics: Mapping[str, float] | None = None,
    evaluation: Evaluation | None = None,
    seal_to: SealTo | None = None,
    part_values: int = DEFAULT_PART_VALUES,
    limits: Limits = DEFAULT_LIMITS,
    spool_bytes: int = DEFAULT_SPOOL_BYTES,
    spool_dir: str | None = None,
) -> Iterator[bytes]:
    """Yield the encoded manifest, then each encoded part, of an update: send them in this
    order on one stream. Configuration mistakes raise ValueError (as :func:`encode`).

    The manifest names each part's body digest, so the parts are encoded before it.
    Unsealed, a part's body is a function of its values, so the parts are encoded twice:
    once for their digests (each dropped after it is hashed), again after the manifest is
    out; nothing is kept but the digests. A second pass whose digest differs (the tensors
    changed meanwhile) raises RuntimeError before that part is yielded. Sealing draws fresh
    keys and nonces, so a sealed part encoded twice would not match its digest: sealed parts
    are encoded once and spooled (in memory up to ``spool_bytes``, then to a temporary file
    in ``spool_dir``, deleted when the generator ends) until the manifest is out. Either
    way at most a few parts' bytes are in memory at a time."""
    split = split_update(tensors, part_values=part_values, limits=limits)
    details: dict[str, Any] = dict(
        base_version=base_version, num_samples=num_samples, metrics=metrics, evaluation=evaluation
    )
    split.manifest([bytes(32)] * split.count, **details)  # bad fields fail before any work

    def encode_one(kind: str, body: UpdateManifest | UpdatePart) -> bytes:
        return encode(kind, body, identity, job=job, round=round, seal_to=seal_to)

    def digest_of(data: bytes) -> bytes:
        return peek_header(data, limits).body_digest

    if seal_to is None:
        digests = [digest_of(encode_one(UpdatePart.KIND, p)) for p in split.parts()]
        yield encode_one(UpdateManifest.KIND, split.manifest(digests, **details))
        for part, digest in zip(split.parts(), digests, strict=True):
            data = encode_one(UpdatePart.KIND, part)
            if digest_of(data) != digest:
                raise RuntimeError(
                    f"part {part.index} differs from the manifest: the tensors changed "
                    "while their parts were being sent"
                )
            yield data
        return
    with tempfile.SpooledTemporaryFile(max_size=spool_bytes, dir=spool_dir) as spool:
        sizes, digests = [], []
        for part in split.parts():
            data = encode_one(UpdatePart.KIND, part)
            digests.append(digest_of(data))
            sizes.append(len(data))
            spool.write(data)
            del data
        yield encode_one(UpdateManifest.KIND, split.manifest(digests, **details))
        spool.seek(0)
        for size in sizes:
            yield spool.read(size)


# --- receiving -------------------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """An update being received in parts, as its manifest announced it."""

    sender: str
    job: str
    round: int
    manifest_digest: bytes
    """The manifest envelope's signed ``body_digest``: the digest of the whole update."""
    manifest: UpdateManifest
    layout: Layout
    """Names and shapes from the manifest, dtypes float32."""

    @property
    def key(self) -> TransferKey:
        return (self.sender, self.manifest.transfer)

    @property
    def total(self) -> int:
        return self.layout.size

    @property
    def count(self) -> int:
        return len(self.manifest.part_digests)


@dataclass
class _State:
    info: Transfer
    seen: float
    next_index: int = 0


class PartAssembler:
    """Follows the updates a receiver gets in parts; pass it each opened ``update.manifest``
    (:meth:`start`) and ``update.part`` (:meth:`add`). It keeps no values: :meth:`add`
    returns each part's values for the caller to place.

    ``ttl_s`` drops a transfer whose parts stop coming for that long; ``max_per_sender``
    bounds the transfers one sender has unfinished (a new manifest past it: TOO_LARGE).
    ``clock`` is the time source of ``ttl_s`` (monotonic seconds)."""

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        *,
        ttl_s: float = 600.0,
        max_per_sender: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_per_sender < 1:
            raise ValueError(f"max_per_sender must be >= 1, got {max_per_sender}")
        self.limits = limits
        self.ttl_s = ttl_s
        self.max_per_sender = max_per_sender
        self.clock = clock
        self._transfers: dict[TransferKey, _State] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._transfers

    @property
    def pending(self) -> int:
        """Transfers started and not yet finished or dropped."""
        return len(self._transfers)

    def get(self, sender: str, transfer: bytes) -> Transfer | None:
        state = self._transfers.get((sender, transfer))
        return None if state is None else state.info

    def done(self, sender: str, transfer: bytes) -> bool:
        """Whether every part of that transfer arrived (False for one not held)."""
        state = self._transfers.get((sender, transfer))
        return state is not None and state.next_index == state.info.count

    def drop(self, sender: str, transfer: bytes) -> bool:
        """Forget that transfer; False when it was not held."""
        return self._transfers.pop((sender, transfer), None) is not None

    def finish(self, sender: str, transfer: bytes) -> Transfer:
        """Forget a complete transfer and return it; an incomplete or unknown one is
        refused (CHUNK_MISMATCH) and dropped."""
        state = self._transfers.pop((sender, transfer), None)
        if state is None:
            raise MessageRejected(
                Reason.CHUNK_MISMATCH, f"no transfer {transfer.hex()} of {sender!r}"
            )
        if state.next_index != state.info.count:
            raise MessageRejected(
                Reason.CHUNK_MISMATCH,
                f"transfer {transfer.hex()} of {sender!r} is incomplete: "
                f"{state.next_index} of {state.info.count} parts",
            )
        return state.info

    def expire(self, now: float | None = None) -> list[TransferKey]:
        """Drop transfers whose last message is older than ``ttl_s``; returns their keys."""
        t = self.clock() if now is None else now
        dead = [k for k, s in self._transfers.items() if t - s.seen > self.ttl_s]
        for key in dead:
            del self._transfers[key]
        return dead

    def start(
        self, env: Envelope[Any], *, expected: Layout | None = None, now: float | None = None
    ) -> Transfer:
        """Begin the transfer a verified ``update.manifest`` announces. ``expected`` (the
        round's layout) must have its names and shapes (SHAPE_MISMATCH). A second manifest
        of a held transfer is refused (DUPLICATE) and the transfer dropped."""
        t = self.clock() if now is None else now
        self.expire(t)
        m = of_kind(env, UpdateManifest).body
        key = (env.sender, m.transfer)
        if self._transfers.pop(key, None) is not None:
            raise MessageRejected(
                Reason.DUPLICATE, f"manifest of transfer {m.transfer.hex()} seen before"
            )
        held = sum(1 for sender, _ in self._transfers if sender == env.sender)
        if held >= self.max_per_sender:
            raise MessageRejected(
                Reason.TOO_LARGE,
                f"{env.sender!r} has {held} unfinished transfers, at most {self.max_per_sender}",
            )
        layout = self._layout(m, expected)
        if m.part_values > max_part_values(self.limits):
            raise MessageRejected(
                Reason.TOO_LARGE,
                f"parts of {m.part_values} values exceed one envelope "
                f"(at most {max_part_values(self.limits)})",
            )
        count = part_count(layout.size, m.part_values)
        if count != len(m.part_digests):
            raise MessageRejected(
                Reason.CHUNK_MISMATCH, f"{len(m.part_digests)} part digests for {count} parts"
            )
        info = Transfer(env.sender, env.job, env.round, env.body_digest, m, layout)
        self._transfers[key] = _State(info, t)
        return info

    def _layout(self, m: UpdateManifest, expected: Layout | None) -> Layout:
        names = tuple(s.name for s in m.tensors)
        if list(names) != sorted(set(names)):
            raise MessageRejected(
                Reason.SHAPE_MISMATCH, "tensor names must be sorted and unique (layout order)"
            )
        shapes = tuple(tuple(s.shape) for s in m.tensors)
        # Python ints: a declared shape cannot overflow on its way to the size check
        total = sum(math.prod(s) for s in shapes)
        if total > self.limits.max_total_elements or total * _F32.itemsize > (
            self.limits.max_body_bytes
        ):
            raise MessageRejected(
                Reason.TOO_LARGE,
                f"an update of {total} values exceeds {self.limits.max_total_elements} values "
                f"or {self.limits.max_body_bytes} bytes",
            )
        if expected is not None and (names, shapes) != (expected.names, expected.shapes):
            theirs = list(zip(names, shapes, strict=True))
            ours = list(zip(expected.names, expected.shapes, strict=True))
            raise MessageRejected(
                Reason.SHAPE_MISMATCH,
                f"tensors {theirs[:5]} differ from the round's {ours[:5]}",
            )
        return Layout(names, shapes, ("float32",) * len(names))

    def add(self, env: Envelope[Any], *, now: float | None = None) -> tuple[int, Values]:
        """Check a verified ``update.part`` against its transfer; returns the flat index of
        its first value and its values (read-only, a view into the received bytes). Any
        refusal drops the transfer."""
        t = self.clock() if now is None else now
        self.expire(t)
        p = of_kind(env, UpdatePart).body
        key = (env.sender, p.transfer)
        state = self._transfers.get(key)
        if state is None:
            raise MessageRejected(
                Reason.CHUNK_MISMATCH,
                f"part of no transfer held: {p.transfer.hex()} of {env.sender!r}",
            )
        try:
            start = self._check(state, env, p)
        except MessageRejected:
            del self._transfers[key]
            raise
        state.next_index += 1
        state.seen = t
        return start, p.values

    def _check(self, state: _State, env: Envelope[Any], p: UpdatePart) -> int:
        info = state.info
        m = info.manifest
        if (env.job, env.round) != (info.job, info.round):
            raise MessageRejected(
                Reason.CHUNK_MISMATCH,
                f"part for job {env.job!r} round {env.round}, manifest for job {info.job!r} "
                f"round {info.round}",
            )
        if p.index >= info.count:
            raise MessageRejected(
                Reason.CHUNK_MISMATCH, f"part {p.index} out of range 0..{info.count - 1}"
            )
        if p.index < state.next_index:
            raise MessageRejected(Reason.DUPLICATE, f"part {p.index} received twice")
        if p.index > state.next_index:
            raise MessageRejected(
                Reason.CHUNK_MISMATCH, f"part {p.index} out of order: {state.next_index} is next"
            )
        if env.body_digest != m.part_digests[p.index]:
            raise MessageRejected(
                Reason.BAD_DIGEST, f"part {p.index} is not the one the manifest names"
            )
        start = p.index * m.part_values
        expected = min(m.part_values, info.total - start)
        values = p.values
        if values.dtype != _F32:
            raise MessageRejected(
                Reason.DTYPE_NOT_ALLOWED, f"part {p.index} is {values.dtype}, not float32"
            )
        if values.ndim != 1 or values.size != expected:
            reason = Reason.TOO_LARGE if values.size > expected else Reason.CHUNK_MISMATCH
            raise MessageRejected(
                reason, f"part {p.index} has shape {values.shape}, expected ({expected},)"
            )
        return start


# --- checking values as they stream ----------------------------------------------------


class RunningCheck:
    """An update's values checked as its parts arrive, in any order: every value finite
    (NON_FINITE naming the first bad tensor and index) and the L2 norm, accumulated in
    float64. A float32 value squared in float64 cannot overflow, nor can a sum of 2^29
    of them, so the running sum is finite exactly when every value is."""

    _BLOCK = 1 << 16  # values per float64 temporary (512 KiB)

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._starts = [0]
        for shape in layout.shapes:
            self._starts.append(self._starts[-1] + math.prod(shape))
        self.sum_sq = 0.0
        self.values = 0
        """Values checked so far."""

    @property
    def norm(self) -> float:
        return math.sqrt(self.sum_sq)

    def update(self, start: int, values: npt.NDArray[np.floating[Any]]) -> None:
        """Check ``values``, the update's flat values from index ``start`` on."""
        if start < 0 or start + values.size > self.layout.size:
            raise ValueError(
                f"values {start}..{start + values.size} outside the layout's {self.layout.size}"
            )
        flat = values.reshape(-1)
        total = 0.0
        for i in range(0, flat.size, self._BLOCK):
            block = flat[i : i + self._BLOCK].astype(np.float64)
            s = float(np.dot(block, block))
            if not math.isfinite(s):
                j = i + int(np.argmin(np.isfinite(block)))
                raise MessageRejected(Reason.NON_FINITE, self._where(start + j, flat[j]))
            total += s
        self.sum_sq += total
        self.values += flat.size

    def _where(self, index: int, value: Any) -> str:
        t = bisect.bisect_right(self._starts, index) - 1
        name, shape = self.layout.names[t], self.layout.shapes[t]
        at = tuple(int(k) for k in np.unravel_index(index - self._starts[t], shape))
        return f"{name}{list(at)} is {value}"
