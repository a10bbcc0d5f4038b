"""Updates of any size as one signed manifest and signed parts, sent and checked in bounded
memory.

An update travels as one ``update.manifest`` (what an ``update`` carries besides its
tensors, the tensors' names and shapes, and the signed ``body_digest`` of every part)
followed by ``update.part`` envelopes, each holding ``part_values`` consecutive float32
values of the update flattened in :class:`~qflare.messages.tensors.Layout` order (sorted
names, C order). All are ordinary envelopes of one sender, job and round: peeked, sealed
(each part on its own) and opened like any other message.

Each part opens by itself and its values (a read-only view into the received bytes) go
straight to where they belong: a row of the round's matrix, a model's tensors. Nothing here
keeps an update's values; a transfer in progress is its manifest (32 bytes of digest per
part) and a counter.

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
import hashlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from qflare.crypto.keystore import Identity
from qflare.messages.bodies import (
    Evaluation,
    ModelManifest,
    ModelPart,
    TensorShape,
    TensorSpec,
    UpdateManifest,
    UpdatePart,
)
from qflare.messages.envelope import Envelope, SealTo, encode, of_kind, peek_header
from qflare.messages.errors import MessageRejected, Reason
from qflare.messages.limits import DEFAULT_LIMITS, Limits, MiB
from qflare.messages.tensors import Layout, Tensors

#: A few MB: RabbitMQ's client copies whole bodies, so mid-sized frames move fastest.
DEFAULT_PART_BYTES = 8 * MiB
_F32 = np.dtype("<f4")
#: Values per part: 8 MiB of float32, the size RabbitMQ's client moves fastest.
DEFAULT_PART_VALUES = DEFAULT_PART_BYTES // _F32.itemsize
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
    _check_part_size("part_values", part_values, max_part_values(limits), "values", limits)
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


def _check_part_size(name: str, value: object, most: int, unit: str, limits: Limits) -> None:
    """ValueError unless ``value`` (a part's size, ``name``) is a positive int of at most
    ``most`` (what one envelope of ``limits`` holds)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if value > most:
        raise ValueError(
            f"{name} {value} makes parts larger than one envelope; at most {most} {unit} fit "
            f"in {limits.max_envelope_bytes} bytes"
        )


def check_part(
    index: int,
    next_index: int,
    digest: bytes,
    digests: Sequence[bytes],
    *,
    received: np.ndarray,
    dtype: np.dtype[Any],
    per_part: int,
    total: int,
) -> int:
    """A part (update or model) against its manifest: in range, the next one in order (one
    sender's messages on one stream keep their order), the one the manifest names, and
    holding ``received``, a flat array of ``dtype``, of the size its place among ``total``
    items cut ``per_part`` to a part gives it. Returns the index of its first item.
    MessageRejected otherwise: CHUNK_MISMATCH (out of range, a part missing before it, too
    few items), DUPLICATE (seen before), BAD_DIGEST (other bytes), DTYPE_NOT_ALLOWED,
    TOO_LARGE (too many items)."""
    if index >= len(digests):
        raise MessageRejected(
            Reason.CHUNK_MISMATCH, f"part {index} out of range 0..{len(digests) - 1}"
        )
    if index < next_index:
        raise MessageRejected(Reason.DUPLICATE, f"part {index} received twice")
    if index > next_index:
        raise MessageRejected(
            Reason.CHUNK_MISMATCH, f"part {next_index} missing: part {index} came (out of order)"
        )
    if digest != digests[index]:
        raise MessageRejected(Reason.BAD_DIGEST, f"part {index} is not the one the manifest names")
    if received.dtype != dtype:
        raise MessageRejected(
            Reason.DTYPE_NOT_ALLOWED, f"part {index} is {received.dtype}, not {dtype}"
        )
    start = index * per_part
    expected = min(per_part, total - start)
    if received.ndim != 1 or received.size != expected:
        reason = Reason.TOO_LARGE if received.size > expected else Reason.CHUNK_MISMATCH
        raise MessageRejected(
            reason, f"part {index} has shape {received.shape}, expected ({expected},)"
        )
    return start


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
        return check_part(
            p.index,
            state.next_index,
            env.body_digest,
            m.part_digests,
            received=p.values,
            dtype=_F32,
            per_part=m.part_values,
            total=info.total,
        )


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


# --- models in parts -------------------------------------------------------------------
#
# A model version too large for one ``model.published`` travels into the job's model stream
# as one ``model.manifest`` (what ``model.published`` carries besides its tensors, the
# tensors' names, dtypes and shapes, and each part's signed body digest) followed by
# ``model.part`` envelopes, each ``part_bytes`` consecutive bytes of the model's canonical
# byte string: every tensor's little-endian C-order bytes, by sorted name, the bytes
# :func:`~qflare.messages.tensors.model_digest` hashes. A model keeps its dtypes, so its
# parts are bytes rather than float32 values. The aggregator signs them; nobody seals them.

#: Bytes per model part: the chunk size RabbitMQ's client moves fastest (as an update's).
DEFAULT_MODEL_PART_BYTES = DEFAULT_PART_BYTES
MODEL_PART_KINDS = frozenset({ModelManifest.KIND, ModelPart.KIND})
_U8 = np.dtype("u1")


def max_model_part_bytes(limits: Limits = DEFAULT_LIMITS) -> int:
    """The most bytes one model part may hold so that its envelope fits ``limits``."""
    return limits.max_envelope_bytes - PART_OVERHEAD


@runtime_checkable
class ModelSource(Protocol):
    """A model too large to hold, read a range of its canonical bytes at a time (every
    tensor's little-endian C-order bytes, by sorted name), e.g. the aggregator's model
    file (:class:`qflare.runtime.modelfile.ModelFile`)."""

    @property
    def layout(self) -> Layout: ...

    @property
    def nbytes(self) -> int: ...

    def read_bytes(self, a: int, b: int) -> bytes: ...

    def tensors(self) -> dict[str, Any]: ...


def model_nbytes(tensors: Tensors | ModelSource) -> int:
    """The bytes of a model's tensors (what decides whether it travels in parts)."""
    if isinstance(tensors, ModelSource):
        return tensors.nbytes
    return sum(int(np.asarray(a).nbytes) for a in tensors.values())


class _ModelBytes:
    """A model's tensors as one canonical byte string (tensors by sorted name, each in
    little-endian C order), read a range at a time, and the running
    :func:`~qflare.messages.tensors.model_digest` of the bytes given to :meth:`hash` in
    order. Each tensor is a uint8 view of its array (a copy only for a non-contiguous or
    big-endian one)."""

    def __init__(self, specs: Sequence[tuple[str, np.dtype[Any], tuple[int, ...]]]) -> None:
        self.specs = list(specs)
        self.starts = [0]
        for _name, dtype, shape in self.specs:
            self.starts.append(self.starts[-1] + math.prod(shape) * dtype.itemsize)
        self.flat: list[npt.NDArray[np.uint8]] = []
        self.source: ModelSource | None = None  # read from it instead of ``flat``
        self._sha = hashlib.sha256()
        self._hashed = 0  # bytes hashed so far
        self._headed = 0  # tensors whose name, dtype and shape are hashed

    @property
    def total(self) -> int:
        return self.starts[-1]

    @classmethod
    def of(cls, tensors: Tensors | ModelSource) -> _ModelBytes:
        if isinstance(tensors, ModelSource):
            layout = tensors.layout
            out = cls(
                [
                    (name, np.dtype(dtype).newbyteorder("<"), tuple(int(x) for x in shape))
                    for name, shape, dtype in layout.entries()
                ]
            )
            out.source = tensors
            return out
        names = sorted(tensors)
        arrays = [np.asarray(tensors[n]) for n in names]
        les = [a.astype(a.dtype.newbyteorder("<"), copy=False) for a in arrays]
        out = cls(
            [
                (n, le.dtype, tuple(int(s) for s in le.shape))
                for n, le in zip(names, les, strict=True)
            ]
        )
        out.flat = [np.ascontiguousarray(le).reshape(-1).view(_U8) for le in les]
        return out

    def read(self, a: int, b: int) -> npt.NDArray[np.uint8]:
        """Bytes ``[a, b)``: a view when they lie in one tensor, else a copy."""
        if self.source is not None:
            return np.frombuffer(self.source.read_bytes(a, b), dtype=_U8)
        pieces = [self.flat[t][lo:hi] for t, lo, hi in self._spans(a, b)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def write(self, a: int, data: npt.NDArray[np.uint8]) -> None:
        """Copy ``data`` into bytes ``[a, a + len(data))``."""
        at = 0
        for t, lo, hi in self._spans(a, a + data.size):
            self.flat[t][lo:hi] = data[at : at + hi - lo]
            at += hi - lo

    def _spans(self, a: int, b: int) -> Iterator[tuple[int, int, int]]:
        t = bisect.bisect_right(self.starts, a) - 1
        while a < b:
            while self.starts[t + 1] <= a:  # zero-size tensors
                t += 1
            hi = min(b, self.starts[t + 1])
            yield t, a - self.starts[t], hi - self.starts[t]
            a, t = hi, t + 1

    def hash(self, a: int, data: npt.NDArray[np.uint8]) -> None:
        """Hash bytes ``[a, a + len(data))``, the next in order; each tensor's name, dtype
        and shape go in before its first byte, as :func:`model_digest` hashes them."""
        if a != self._hashed:
            raise ValueError(f"bytes from {a} hashed out of order ({self._hashed} is next)")
        end = a + data.size
        while True:
            self._head()
            if self._hashed >= end:
                return
            t = self._headed - 1  # the tensor the next byte lies in
            hi = min(end, self.starts[t + 1])
            self._sha.update(data[self._hashed - a : hi - a].data)
            self._hashed = hi

    def _head(self) -> None:
        # the name, dtype and shape of every tensor that starts at or before the next byte
        while self._headed < len(self.specs) and self.starts[self._headed] <= self._hashed:
            name, dtype, shape = self.specs[self._headed]
            self._sha.update(name.encode())
            self._sha.update(b"\x00")
            self._sha.update(dtype.str.encode())
            self._sha.update(repr(shape).encode())
            self._headed += 1

    def digest(self) -> bytes:
        """The model's digest, once every byte is hashed."""
        if self._hashed != self.total:
            raise ValueError(f"{self._hashed} of {self.total} bytes hashed")
        self._head()
        return self._sha.digest()


def encode_model_parts(
    identity: Identity,
    tensors: Tensors | ModelSource,
    *,
    job: str,
    round: int,
    version: int,
    epsilon: float,
    digest: bytes | None = None,
    part_bytes: int = DEFAULT_MODEL_PART_BYTES,
    transfer: bytes | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Iterator[bytes]:
    """Yield the encoded ``model.manifest``, then each encoded ``model.part``, of model
    ``version``: publish them in this order into the job's model stream.

    The manifest names each part's body digest and the model's digest, both computed in a
    first pass over the tensors (each part encoded, hashed and dropped); the parts are
    encoded again after the manifest is out, and a part whose digest differs (the tensors
    changed meanwhile) raises RuntimeError before it is yielded. ``digest``, when given
    (the stored model's), must be the tensors' (ValueError otherwise). At most a part's
    bytes are copied at a time. Configuration mistakes raise ValueError."""
    if not tensors:
        raise ValueError("a model needs at least one tensor")
    _check_part_size("part_bytes", part_bytes, max_model_part_bytes(limits), "bytes", limits)
    transfer = os.urandom(16) if transfer is None else transfer
    model = _ModelBytes.of(tensors)
    if model.total == 0:
        raise ValueError("a model needs at least one value")
    specs = [
        TensorSpec.model_validate({"name": n, "dtype": d.name, "shape": list(s)})
        for n, d, s in model.specs
    ]  # a dtype a round cannot name (not float) fails here, before any work
    bounds = [(a, min(a + part_bytes, model.total)) for a in range(0, model.total, part_bytes)]

    def encode_part(index: int) -> bytes:
        a, b = bounds[index]
        body = ModelPart(transfer=transfer, index=index, data=model.read(a, b))
        return encode(ModelPart.KIND, body, identity, job=job, round=round)

    def digest_of(data: bytes) -> bytes:
        return peek_header(data, limits).body_digest

    digests = []
    for index, (a, b) in enumerate(bounds):
        model.hash(a, model.read(a, b))
        digests.append(digest_of(encode_part(index)))
    computed = model.digest()
    if digest is not None and digest != computed:
        raise ValueError(
            f"model version {version}'s tensors hash to {computed.hex()[:16]}, "
            f"not the digest given ({digest.hex()[:16]})"
        )
    manifest = ModelManifest(
        version=version,
        digest=computed,
        epsilon=epsilon,
        transfer=transfer,
        tensors=specs,
        part_bytes=part_bytes,
        part_digests=digests,
    )
    yield encode(ModelManifest.KIND, manifest, identity, job=job, round=round)
    for index, expected in enumerate(digests):
        data = encode_part(index)
        if digest_of(data) != expected:
            raise RuntimeError(
                f"model part {index} differs from the manifest: the tensors changed "
                "while their parts were being sent"
            )
        yield data


class ModelAssembler:
    """One model version received in parts: built from its verified ``model.manifest``
    (the tensors are allocated here, empty), filled by each verified ``model.part`` in
    order (:meth:`add`), and handed out by :meth:`finish` only when every part is in and
    the bytes hash to the manifest's digest. Any refusal leaves it unusable: a reader drops
    it and never uses what it holds."""

    def __init__(self, env: Envelope[Any], limits: Limits = DEFAULT_LIMITS) -> None:
        m = of_kind(env, ModelManifest).body
        names = [s.name for s in m.tensors]
        if names != sorted(set(names)):
            raise MessageRejected(
                Reason.SHAPE_MISMATCH, "tensor names must be sorted and unique (layout order)"
            )
        specs = [(s.name, np.dtype(s.dtype).newbyteorder("<"), tuple(s.shape)) for s in m.tensors]
        # Python ints: a declared shape cannot overflow on its way to the size check
        total = sum(math.prod(shape) * dtype.itemsize for _n, dtype, shape in specs)
        if total > limits.max_body_bytes:
            raise MessageRejected(
                Reason.TOO_LARGE, f"a model of {total} bytes exceeds {limits.max_body_bytes}"
            )
        if m.part_bytes > max_model_part_bytes(limits):
            raise MessageRejected(
                Reason.TOO_LARGE,
                f"parts of {m.part_bytes} bytes exceed one envelope "
                f"(at most {max_model_part_bytes(limits)})",
            )
        count = part_count(total, m.part_bytes)
        if count != len(m.part_digests):
            raise MessageRejected(
                Reason.CHUNK_MISMATCH, f"{len(m.part_digests)} part digests for {count} parts"
            )
        self.job, self.round, self.manifest = env.job, env.round, m
        self.tensors = {name: np.empty(shape, dtype) for name, dtype, shape in specs}
        self._bytes = _ModelBytes(specs)
        self._bytes.flat = [self.tensors[n].reshape(-1).view(_U8) for n, _d, _s in specs]
        self.next_index = 0
        self.failed = False

    @property
    def count(self) -> int:
        return len(self.manifest.part_digests)

    @property
    def done(self) -> bool:
        return self.next_index == self.count and not self.failed

    @property
    def expected(self) -> bytes | None:
        """The body digest of the next part (None once all are in)."""
        return (
            None if self.next_index >= self.count else self.manifest.part_digests[self.next_index]
        )

    def add(self, env: Envelope[Any]) -> None:
        """Check a verified ``model.part`` and copy its bytes into place; a part that is not
        the next one the manifest names is refused (CHUNK_MISMATCH, DUPLICATE, BAD_DIGEST,
        TOO_LARGE) and fails the whole model."""
        try:
            self._add(of_kind(env, ModelPart).body, env)
        except MessageRejected:
            self.failed = True
            raise

    def _add(self, p: ModelPart, env: Envelope[Any]) -> None:
        m = self.manifest
        if self.failed:
            raise MessageRejected(Reason.CHUNK_MISMATCH, "the model's transfer failed before")
        if (env.job, env.round) != (self.job, self.round) or p.transfer != m.transfer:
            raise MessageRejected(
                Reason.CHUNK_MISMATCH,
                f"part of transfer {p.transfer.hex()} (job {env.job!r} round {env.round}), "
                f"expected {m.transfer.hex()} (job {self.job!r} round {self.round})",
            )
        data = p.data
        start = check_part(
            p.index,
            self.next_index,
            env.body_digest,
            m.part_digests,
            received=data,
            dtype=_U8,
            per_part=m.part_bytes,
            total=self._bytes.total,
        )
        self._bytes.write(start, data)
        self._bytes.hash(start, data)
        self.next_index += 1

    def finish(self) -> dict[str, np.ndarray]:
        """The model's tensors, once every part is in and they hash to the manifest's
        digest (BAD_DIGEST otherwise; CHUNK_MISMATCH while parts are missing)."""
        if not self.done:
            raise MessageRejected(
                Reason.CHUNK_MISMATCH,
                f"model version {self.manifest.version} is incomplete: "
                f"{self.next_index} of {self.count} parts",
            )
        if self._bytes.digest() != self.manifest.digest:
            self.failed = True
            raise MessageRejected(
                Reason.BAD_DIGEST,
                f"model version {self.manifest.version} does not hash to its signed digest",
            )
        return self.tensors
