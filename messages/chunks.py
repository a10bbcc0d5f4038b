"""Large envelopes as signed chunks plus a signed manifest, reassembled in bounded memory.

A message whose encoded envelope exceeds the chunk size is sent as one ``chunk.manifest``
(total size, chunk size, SHA-256 of every chunk and of the whole envelope) followed by
``chunk`` envelopes, each signed by the same sender. The receiver preallocates the declared
total once, after checking it against the limits; every chunk is verified (signature, then
its digest against the manifest) before its bytes are copied in; out-of-range, duplicate,
oversized and foreign chunks are refused. The reassembled bytes are the original signed
envelope, opened as usual (its own signature covers the inner kind).

Chunks of one transfer must reach the same consumer in the order they were written (a
stream, or a queue with a single active consumer): a chunk out of order is refused. Any
refusal of a message whose signature verified (its sender's own: out of order, repeated,
surplus, the wrong size or bytes) drops that sender's transfer at once, so nothing is left
half-built and nothing half-built is ever used; a chunk whose signature does not verify
names no one and drops nothing. A transfer whose chunks stop coming (a sender that
crashed) is dropped after ``ttl_s``; a reader that starts after a transfer's manifest (a
restart) refuses its chunks as belonging to no transfer, and one that reads again from the
manifest rebuilds it whole.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from qflare.crypto.keystore import Identity
from qflare.crypto.pki import TrustStore
from qflare.messages.bodies import Chunk, ChunkManifest
from qflare.messages.envelope import encode, open_envelope, peek_kind
from qflare.messages.errors import MessageRejected, Reason
from qflare.messages.limits import DEFAULT_LIMITS, Limits, MiB

DEFAULT_CHUNK_SIZE = 8 * MiB
"""A few MB: RabbitMQ's client copies whole bodies, so mid-sized frames move fastest."""
CHUNK_KINDS = frozenset({"chunk", "chunk.manifest"})


def split(
    envelope: bytes | bytearray | memoryview,
    identity: Identity,
    *,
    job: str,
    round: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[bytes]:
    """Yield the manifest, then the chunks, of an encoded envelope (one chunk in memory at
    a time). Send them in this order over one route."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    view = memoryview(envelope).cast("B")
    total = len(view)
    if total == 0:
        raise ValueError("cannot chunk an empty envelope")
    inner_kind = peek_kind(view, DEFAULT_LIMITS.with_(max_envelope_bytes=max(total, 1)))
    bounds = [(start, min(start + chunk_size, total)) for start in range(0, total, chunk_size)]
    transfer = os.urandom(16)
    manifest = ChunkManifest(
        transfer=transfer,
        inner_kind=inner_kind,
        total_size=total,
        chunk_size=chunk_size,
        chunk_digests=[hashlib.sha256(view[a:b]).digest() for a, b in bounds],
        envelope_digest=hashlib.sha256(view).digest(),
    )
    yield encode("chunk.manifest", manifest, identity, job=job, round=round)
    for index, (a, b) in enumerate(bounds):
        # model_construct: the slice is a memoryview, encoded by reference (no extra copy);
        # the fields are produced here, not received, so validation adds nothing.
        body = Chunk.model_construct(transfer=transfer, index=index, data=view[a:b])
        yield encode("chunk", body, identity, job=job, round=round)


@dataclass
class _Transfer:
    sender: str
    job: str
    round: int
    manifest: ChunkManifest
    buffer: bytearray
    started: float
    next_index: int = 0


class Reassembler:
    """Collects chunked envelopes; pass every delivery through :meth:`feed`.

    ``max_inflight_bytes`` bounds the memory held by incomplete transfers together;
    ``ttl_s`` drops a transfer whose chunks stop coming.
    """

    def __init__(
        self,
        trust: TrustStore,
        limits: Limits = DEFAULT_LIMITS,
        *,
        max_inflight_bytes: int | None = None,
        ttl_s: float = 600.0,
    ) -> None:
        self.trust = trust
        self.limits = limits
        self.max_inflight_bytes = (
            limits.max_body_bytes if max_inflight_bytes is None else max_inflight_bytes
        )
        self.ttl_s = ttl_s
        self._transfers: dict[tuple[str, bytes], _Transfer] = {}

    @property
    def inflight_bytes(self) -> int:
        return sum(len(t.buffer) for t in self._transfers.values())

    @property
    def pending(self) -> int:
        """Transfers started and not complete."""
        return len(self._transfers)

    def expire(self, now: float | None = None) -> list[tuple[str, bytes]]:
        """Drop transfers older than ``ttl_s``; returns their (sender, transfer) keys."""
        t = time.monotonic() if now is None else now
        dead = [k for k, tr in self._transfers.items() if t - tr.started > self.ttl_s]
        for key in dead:
            del self._transfers[key]
        return dead

    def feed(
        self, data: bytes | bytearray | memoryview, *, now: float | None = None
    ) -> bytes | bytearray | memoryview | None:
        """Returns a complete envelope to open (``data`` itself when it is not part of a
        chunked transfer, the reassembled bytes after the last chunk), else None.
        Bad chunks raise MessageRejected."""
        kind = peek_kind(data, self.limits)
        if kind not in CHUNK_KINDS:
            return data
        self.expire()
        env = open_envelope(data, self.trust, limits=self.limits, now=now)
        # signed by env.sender from here on: a refusal drops that sender's transfer
        key = (env.sender, env.body.transfer)  # type: ignore[attr-defined]
        try:
            if kind == "chunk.manifest":
                self._start(env.sender, env.job, env.round, env.body)  # type: ignore[arg-type]
                return None
            return self._add(env.sender, env.job, env.round, env.body)  # type: ignore[arg-type]
        except MessageRejected:
            self._transfers.pop(key, None)
            raise

    def _start(self, sender: str, job: str, round_: int, m: ChunkManifest) -> None:
        key = (sender, m.transfer)
        if key in self._transfers:
            raise MessageRejected(Reason.DUPLICATE, f"manifest {m.transfer.hex()} seen before")
        if m.total_size > self.limits.max_body_bytes:
            raise MessageRejected(
                Reason.TOO_LARGE,
                f"chunked envelope of {m.total_size} bytes exceeds {self.limits.max_body_bytes}",
            )
        if m.chunk_size > self.limits.max_envelope_bytes:
            raise MessageRejected(Reason.TOO_LARGE, f"chunk size {m.chunk_size} too large")
        count = -(-m.total_size // m.chunk_size)
        if count != len(m.chunk_digests):
            raise MessageRejected(
                Reason.CHUNK_MISMATCH, f"{len(m.chunk_digests)} digests for {count} chunks"
            )
        if self.inflight_bytes + m.total_size > self.max_inflight_bytes:
            raise MessageRejected(Reason.TOO_LARGE, "too many bytes in unfinished transfers")
        self._transfers[key] = _Transfer(
            sender, job, round_, m, bytearray(m.total_size), time.monotonic()
        )

    def _add(self, sender: str, job: str, round_: int, c: Chunk) -> bytearray | None:
        key = (sender, c.transfer)
        tr = self._transfers.get(key)
        if tr is None:
            raise MessageRejected(
                Reason.CHUNK_MISMATCH,
                f"chunk of unknown transfer {c.transfer.hex()} from {sender!r}",
            )
        m = tr.manifest
        if (job, round_) != (tr.job, tr.round):
            raise MessageRejected(Reason.CHUNK_MISMATCH, "chunk job/round differ from manifest")
        if c.index >= len(m.chunk_digests):
            raise MessageRejected(
                Reason.CHUNK_MISMATCH,
                f"chunk index {c.index} out of range 0..{len(m.chunk_digests) - 1}",
            )
        if c.index < tr.next_index:
            raise MessageRejected(Reason.DUPLICATE, f"chunk {c.index} received twice")
        if c.index > tr.next_index:
            raise MessageRejected(
                Reason.CHUNK_MISMATCH, f"chunk {c.index} out of order: {tr.next_index} is next"
            )
        start = c.index * m.chunk_size
        expected = min(m.chunk_size, m.total_size - start)
        if len(c.data) != expected:
            raise MessageRejected(
                Reason.CHUNK_MISMATCH,
                f"chunk {c.index} has {len(c.data)} bytes, expected {expected}",
            )
        if hashlib.sha256(c.data).digest() != m.chunk_digests[c.index]:
            raise MessageRejected(Reason.BAD_DIGEST, f"chunk {c.index} does not match manifest")
        tr.buffer[start : start + expected] = c.data
        tr.next_index += 1
        if tr.next_index < len(m.chunk_digests):
            return None
        del self._transfers[key]
        # Every byte was checked against a digest in the signed manifest, so hashing the
        # whole envelope again (envelope_digest) would add time, not assurance.
        return tr.buffer
