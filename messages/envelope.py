"""The signed envelope: ``{v, kind, sender, cert, job, round, ts, nonce, body_digest, body, sig}``.

``sig`` is ML-DSA-65 (FIPS 204) over the canonical msgpack (keys sorted) of every field but
``sig`` and ``body``, under the context string ``qflare/v1/<kind>``; ``body_digest`` is the
SHA-256 of the ``body`` bytes, so a large body is hashed once and ML-DSA only sees ~6 KB.
``cert`` is the sender's CA-issued certificate, so a verifier needs nothing but the CA
certificate and the revocation list (:class:`qflare.crypto.TrustStore`).

``body`` is the msgpack of the kind's body model, or, when sealed, msgpack ext type 2
holding ``sha256(recipient KEM key)[:8] || qflare.crypto.seal(...)`` with the canonical
signed header minus ``body_digest`` as associated data. ``ts`` is integer Unix milliseconds,
``nonce`` 16 random bytes (a natural de-duplication key together with ``sender``).

:func:`open_envelope` checks, cheapest first: size, msgpack well-formedness, field types,
version, known kind, the caller's expected kind/job, certificate chain/validity/revocation,
sender = certificate id, role allowed for the kind, signature, timestamp skew, body digest,
unsealing, body limits and schema, the expected round. Every failure is MessageRejected.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Generic, TypeVar, cast

import msgpack

from qflare.crypto.errors import TrustRejected
from qflare.crypto.keystore import Identity
from qflare.crypto.pki import Certificate, TrustStore, canonical
from qflare.crypto.sealing import KemPrivateKey, open_for, seal_for
from qflare.crypto.signing import SIGNATURE_SIZE, context_for, verify
from qflare.messages.bodies import BODY_TYPES, Body, body_from_wire, body_to_wire, make_body
from qflare.messages.codec import (
    SEALED_EXT,
    bin_header,
    ext_header,
    pack_parts,
    unpack,
)
from qflare.messages.errors import MessageRejected, Reason, SignedBodyRejected
from qflare.messages.limits import DEFAULT_LIMITS, OFF_LOOP_BYTES, Limits

VERSION = 1
NONCE_SIZE = 16
DIGEST_SIZE = 32
_HEADER_TYPES: dict[str, type] = {
    "v": int,
    "kind": str,
    "sender": str,
    "job": str,
    "round": int,
    "ts": int,
}
_BIN_FIELDS = ("cert", "nonce", "body_digest", "body", "sig")
FIELDS = frozenset(_HEADER_TYPES) | frozenset(_BIN_FIELDS)
_MAX_HEADER_STR = 256


#: What a body is sealed for: a certificate (its KEM key) or a raw hybrid key, or several.
SealTo = Certificate | bytes | Sequence[Certificate | bytes]


def _recipients(seal_to: SealTo) -> list[bytes]:
    """The hybrid public keys a body is sealed for: one certificate or raw key, or several."""
    items = [seal_to] if isinstance(seal_to, Certificate | bytes) else list(seal_to)
    keys = []
    for item in items:
        if isinstance(item, Certificate):
            if item.kem_public_key is None:
                raise ValueError(f"the certificate of {item.id!r} carries no KEM public key")
            keys.append(item.kem_public_key)
        else:
            keys.append(item)
    return keys


B = TypeVar("B", bound=Body, covariant=True)


@dataclass(frozen=True, slots=True)
class Envelope(Generic[B]):
    """An opened (verified) envelope; ``body`` is the pydantic model of its kind (a handler
    declared for ``UpdateAccepted`` receives an ``Envelope[UpdateAccepted]``)."""

    kind: str
    sender: str
    cert: Certificate
    job: str
    round: int
    ts: int
    nonce: bytes
    body_digest: bytes
    body: B
    sealed: bool
    size: int
    v: int = VERSION


def _header(
    kind: str, sender: str, cert: bytes, job: str, round_: int, ts: int, nonce: bytes
) -> dict[str, Any]:
    return {
        "v": VERSION,
        "kind": kind,
        "sender": sender,
        "cert": cert,
        "job": job,
        "round": round_,
        "ts": ts,
        "nonce": nonce,
    }


def _seal_aad(header: dict[str, Any]) -> bytes:
    return b"qflare/v1/seal-aad" + canonical(header)


def encode(
    kind: str,
    body: Body | dict[str, Any],
    identity: Identity,
    *,
    job: str,
    round: int,
    seal_to: SealTo | None = None,
    ts: int | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """Sign and encode one message. ``body`` is the kind's model or a dict for it;
    ``seal_to`` (a certificate with a KEM key or a raw hybrid key, or several of them)
    encrypts the body once, readable by each of them.
    Configuration mistakes (unknown kind, role not allowed, bad body) raise ValueError."""
    if not isinstance(job, str) or not 0 < len(job) <= _MAX_HEADER_STR:
        raise ValueError(f"job must be a non-empty string of at most {_MAX_HEADER_STR} chars")
    if not isinstance(round, int) or round < 0:
        raise ValueError(f"round must be a non-negative int, got {round!r}")
    model = make_body(kind, body)
    if identity.role not in model.SENDERS:
        raise ValueError(
            f"role {identity.role!r} may not send {kind!r} (allowed: {', '.join(model.SENDERS)})"
        )
    header = _header(
        kind,
        identity.id,
        _cert_bytes(identity.cert),
        job,
        round,
        int(time.time() * 1000) if ts is None else ts,
        os.urandom(NONCE_SIZE) if nonce is None else nonce,
    )
    parts = pack_parts(body_to_wire(model))
    if seal_to is not None:
        payload = seal_for(_recipients(seal_to), b"".join(parts), _seal_aad(header))
        parts = [ext_header(len(payload), SEALED_EXT), payload]
    digest = hashlib.sha256()
    size = 0
    for part in parts:
        digest.update(part)
        size += len(part)
    header["body_digest"] = digest.digest()
    sig = identity.key.sign(canonical(header), context_for(kind))
    head = [b"\x8b"]
    for name, value in header.items():
        head.append(_pack_small(name))
        head.append(_pack_small(value))
    head += [_pack_small("sig"), _pack_small(sig), _pack_small("body"), bin_header(size)]
    return b"".join([*head, *parts])


@lru_cache(maxsize=64)
def _cert_bytes(cert: Certificate) -> bytes:
    return cert.to_bytes()


def _pack_small(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _field(obj: dict[str, Any], name: str, typ: type) -> Any:
    value = obj[name]
    if typ is bytes:
        if not isinstance(value, memoryview):
            raise MessageRejected(Reason.MALFORMED, f"envelope field {name} must be bin")
    elif type(value) is not typ:
        raise MessageRejected(Reason.MALFORMED, f"envelope field {name} must be {typ.__name__}")
    elif isinstance(value, str) and len(value) > _MAX_HEADER_STR:
        raise MessageRejected(
            Reason.TOO_LARGE, f"envelope field {name} longer than {_MAX_HEADER_STR}"
        )
    return value


def peek_kind(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> str:
    """The (unverified) kind of an envelope, for routing before a full open."""
    return peek_header(data, limits).kind


@dataclass(frozen=True, slots=True)
class Header:
    """What an envelope claims before it is verified: for routing and for skipping what a
    reader does not want, never for trusting."""

    kind: str
    sender: str
    job: str
    round: int
    body_digest: bytes


def peek_header(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Header:
    """The (unverified) header of an envelope; a malformed one raises MessageRejected."""
    obj = _parse(data, limits, limits.max_envelope_bytes)
    return Header(
        kind=_field(obj, "kind", str),
        sender=_field(obj, "sender", str),
        job=_field(obj, "job", str),
        round=_field(obj, "round", int),
        body_digest=_field(obj, "body_digest", bytes).tobytes(),
    )


def _parse(data: bytes | bytearray | memoryview, limits: Limits, cap: int) -> dict[str, Any]:
    if len(data) > cap:
        raise MessageRejected(Reason.TOO_LARGE, f"envelope of {len(data)} bytes exceeds {cap}")
    obj = unpack(
        data,
        limits.with_(max_depth=1, max_container_len=16, max_bin_len=cap),
        bin_as_view=True,
        max_bytes=cap,
    )
    if not isinstance(obj, dict):
        raise MessageRejected(Reason.MALFORMED, "envelope is not a map")
    if set(obj) != FIELDS:
        missing = sorted(FIELDS - set(obj))
        extra = sorted(set(obj) - FIELDS)[:5]
        raise MessageRejected(
            Reason.MALFORMED, f"envelope fields: missing {missing}, unexpected {extra}"
        )
    return obj


def open_envelope(
    data: bytes | bytearray | memoryview,
    trust: TrustStore,
    *,
    limits: Limits = DEFAULT_LIMITS,
    expect_kind: str | Collection[str] | None = None,
    expect_job: str | None = None,
    expect_round: int | None = None,
    kem_key: KemPrivateKey | None = None,
    now: float | None = None,
    vouched_digest: bytes | None = None,
) -> Envelope[Body]:
    """Verify and decode one envelope; any problem raises :class:`MessageRejected`.

    ``vouched_digest``: the body digest under which a trusted verifier (ingest, in a signed
    ``update.accepted``) accepted exactly these bytes. The certificate and signature are then
    not checked again (a revocation after acceptance does not undo an accepted update); the
    header's ``body_digest`` must equal it and the body must hash to it (``BAD_DIGEST``).

    ``expect_kind`` (one kind or several) is checked before any signature work, so a kind
    the caller does not take costs a parse, not a verification.

    Tensors in the body are read-only views into ``data`` (zero-copy). ``kem_key`` opens
    sealed bodies. ``limits.max_envelope_bytes`` caps ``data``.
    """
    cap = limits.max_envelope_bytes
    obj = _parse(data, limits, cap)
    values = {name: _field(obj, name, typ) for name, typ in _HEADER_TYPES.items()}
    views = {name: _field(obj, name, bytes) for name in _BIN_FIELDS}
    if values["v"] != VERSION:
        raise MessageRejected(Reason.UNSUPPORTED_VERSION, f"envelope v={values['v']}")
    if values["round"] < 0 or not values["job"]:
        raise MessageRejected(Reason.MALFORMED, "round must be >= 0 and job non-empty")
    kind = values["kind"]
    body_type = BODY_TYPES.get(kind)
    if body_type is None:
        raise MessageRejected(Reason.UNKNOWN_KIND, f"unknown kind {kind[:64]!r}")
    if expect_kind is not None and kind not in _kinds(expect_kind):
        wanted = " or ".join(repr(k) for k in sorted(_kinds(expect_kind)))
        raise MessageRejected(Reason.WRONG_KIND, f"expected {wanted}, got {kind!r}")
    if expect_job is not None and values["job"] != expect_job:
        raise MessageRejected(
            Reason.WRONG_JOB, f"expected job {expect_job!r}, got {values['job']!r}"
        )
    if len(views["nonce"]) != NONCE_SIZE or len(views["body_digest"]) != DIGEST_SIZE:
        raise MessageRejected(Reason.MALFORMED, "nonce or body_digest has the wrong size")
    if len(views["sig"]) != SIGNATURE_SIZE:
        raise MessageRejected(Reason.BAD_SIGNATURE, f"signature of {len(views['sig'])} bytes")
    if vouched_digest is not None and views["body_digest"] != vouched_digest:
        raise MessageRejected(Reason.BAD_DIGEST, "body_digest is not the one ingest accepted")
    t = time.time() if now is None else now
    cert_bytes = views["cert"].tobytes()
    try:
        if vouched_digest is None:
            cert = trust.verify_certificate(cert_bytes, now=t)
        else:
            cert = Certificate.from_bytes(cert_bytes)
    except TrustRejected as exc:
        raise MessageRejected.of(exc) from None
    if values["sender"] != cert.id:
        raise MessageRejected(
            Reason.SENDER_MISMATCH,
            f"sender {values['sender']!r} holds the certificate of {cert.id!r}",
        )
    if cert.role not in body_type.SENDERS:
        raise MessageRejected(Reason.ROLE_NOT_ALLOWED, f"role {cert.role!r} may not send {kind!r}")
    header = _header(
        kind,
        values["sender"],
        cert_bytes,
        values["job"],
        values["round"],
        values["ts"],
        views["nonce"].tobytes(),
    )
    signed = {**header, "body_digest": views["body_digest"].tobytes()}
    if vouched_digest is None:
        if not verify(cert.public_key, views["sig"], canonical(signed), context_for(kind)):
            raise MessageRejected(
                Reason.BAD_SIGNATURE, f"{kind} signature of {cert.id!r} does not verify"
            )
        if values["ts"] > (t + limits.max_clock_skew_s) * 1000:
            raise MessageRejected(
                Reason.CLOCK_SKEW, f"timestamp {values['ts']} ms is in the future"
            )
    body = views["body"]
    if hashlib.sha256(body).digest() != signed["body_digest"]:
        raise MessageRejected(Reason.BAD_DIGEST, "body does not match the signed body_digest")
    sealed = len(body) > 0 and body[0] in (0xC7, 0xC8, 0xC9)
    try:
        if sealed:
            body = _unseal(body, kem_key, _seal_aad(header))
        decoded = unpack(body, limits, max_bytes=cap)
        model = body_from_wire(kind, decoded)
    except MessageRejected as exc:
        if vouched_digest is not None:
            raise
        raise SignedBodyRejected(
            exc,
            sender=cert.id,
            job=values["job"],
            round=values["round"],
            body_digest=signed["body_digest"],
        ) from None
    if expect_round is not None and values["round"] != expect_round:
        raise MessageRejected(
            Reason.STALE_ROUND, f"expected round {expect_round}, got {values['round']}"
        )
    return Envelope(
        kind=kind,
        sender=cert.id,
        cert=cert,
        job=values["job"],
        round=values["round"],
        ts=values["ts"],
        nonce=header["nonce"],
        body_digest=signed["body_digest"],
        body=model,
        sealed=sealed,
        size=len(data),
    )


H = TypeVar("H")
K = TypeVar("K", bound=Body)


def of_kind(env: Envelope[Body], body_type: type[K]) -> Envelope[K]:
    """``env`` typed by its body, for a caller that opened it with
    ``expect_kind=body_type.KIND``; another kind is refused as ``WRONG_KIND``."""
    if not isinstance(env.body, body_type):
        raise MessageRejected(Reason.WRONG_KIND, f"expected {body_type.KIND!r}, got {env.kind!r}")
    return cast("Envelope[K]", env)


def by_kind(routes: Mapping[type[Body], H]) -> dict[str, H]:
    """A map from body type to handler, keyed by wire kind for dispatch. Consumers declare
    their handlers by body type; this is the one place a type becomes its ``KIND``. Open
    with ``expect_kind=table.keys()`` so other kinds are refused before any signature work,
    then call ``table[env.kind](env)``."""
    return {body.KIND: handler for body, handler in routes.items()}


async def open_off_loop(
    data: bytes | bytearray | memoryview, trust: TrustStore, **options: Any
) -> Envelope[Body]:
    """:func:`open_envelope`, in a worker thread when the envelope is larger than
    :data:`~qflare.messages.limits.OFF_LOOP_BYTES`, so an event loop keeps serving while a
    large body is hashed, unsealed and decoded (SHA-256 and ML-DSA release the GIL)."""
    if len(data) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(open_envelope, data, trust, **options)
    return open_envelope(data, trust, **options)


def _kinds(expect: str | Collection[str]) -> Collection[str]:
    return (expect,) if isinstance(expect, str) else expect


def _unseal(body: memoryview, kem_key: KemPrivateKey | None, aad: bytes) -> memoryview:
    code = body[0]
    try:
        if code == 0xC7:
            n, ext, start = body[1], struct.unpack_from(">b", body, 2)[0], 3
        elif code == 0xC8:
            n, ext, start = (
                struct.unpack_from(">H", body, 1)[0],
                struct.unpack_from(">b", body, 3)[0],
                4,
            )
        else:
            n, ext, start = (
                struct.unpack_from(">I", body, 1)[0],
                struct.unpack_from(">b", body, 5)[0],
                6,
            )
    except struct.error:
        raise MessageRejected(Reason.MALFORMED, "truncated sealed body") from None
    if ext != SEALED_EXT or start + n != len(body):
        raise MessageRejected(Reason.MALFORMED, "sealed body framing")
    if kem_key is None:
        raise MessageRejected(Reason.UNSEAL_FAILED, "body is sealed but no KEM key was given")
    try:
        return memoryview(open_for(kem_key, body[start:], aad))
    except TrustRejected as exc:
        raise MessageRejected.of(exc) from None
