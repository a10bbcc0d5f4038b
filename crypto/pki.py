"""Certificates, the certificate authority, revocation lists and the trust store.

A QFLARE certificate is deliberately small and not X.509: a msgpack map of
``{v, serial, id, role, public_key, kem_public_key, issuer, not_before, not_after, sig}``
where ``sig`` is the CA's ML-DSA-65 signature, under context ``qflare/v1/cert``, over the
canonical msgpack (keys sorted, smallest encodings) of every other field. ``public_key`` is
the holder's ML-DSA-65 key, ``kem_public_key`` its hybrid ML-KEM-768 + X25519 key (or nil)
so that others can seal bodies to it. Times are integer Unix seconds.

The revocation list is the same idea: ``{v, issuer, number, issued_at, serials, sig}``
signed under ``qflare/v1/crl``; ``number`` only grows, so a verifier never goes back to an
older list. It also names the ids of the revoked certificates' holders (``holders``, absent
while there are none, so a list that names none has the bytes it always had): a service that
never sees the revoked certificate (the aggregator, which selects participants by id) acts on
the revocation too. Verifiers need just the CA certificate and the current list (a
:class:`TrustStore`), which keeps ingest stateless.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

import msgpack

from qflare.crypto.errors import TrustRejected
from qflare.crypto.signing import (
    PUBLIC_KEY_SIZE,
    SigningKey,
    generate_signing_key,
    verify,
)

CERT_VERSION = 1
CERT_CONTEXT = b"qflare/v1/cert"
CRL_CONTEXT = b"qflare/v1/crl"
ROLES = ("ca", "ingest", "detector", "aggregator", "accountant", "alerting", "client", "operator")
SERVICE_ROLES = ("ingest", "detector", "aggregator", "accountant", "alerting")
KEM_PUBLIC_KEY_SIZE = 1184 + 32  # ML-KEM-768 || X25519, see qflare.crypto.sealing
SERIAL_SIZE = 16
MAX_CERT_BYTES = 16 * 1024
MAX_CRL_BYTES = 16 * 1024 * 1024
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DAY = 86400


def canonical(obj: dict[str, Any]) -> bytes:
    """Canonical msgpack of a flat map: keys sorted, bin for bytes, smallest encodings."""
    data: bytes = msgpack.packb({k: obj[k] for k in sorted(obj)}, use_bin_type=True)
    return data


def check_id(value: str) -> str:
    """Participant ids are short ASCII names usable in file paths and routing keys."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ValueError(
            f"invalid id {value!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return value


def _unpack_map(data: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(data) > limit:
        raise TrustRejected("TOO_LARGE", f"{what} is {len(data)} bytes, limit {limit}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=4096,
            max_bin_len=limit,
            max_array_len=limit // 16,
            max_map_len=32,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as exc:
        raise TrustRejected("MALFORMED", f"{what}: {exc}") from None
    if not isinstance(obj, dict):
        raise TrustRejected("MALFORMED", f"{what} is not a map")
    return obj


class _Signed:
    """A CA-signed record (a dataclass): its wire form is the canonical map of its fields,
    and the CA signs that map without ``sig``."""

    __slots__ = ()

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cast(Any, cls))}

    @classmethod
    def optional_names(cls) -> frozenset[str]:
        """Fields left off the wire while empty (the record's bytes then are those of a
        record without the field)."""
        return frozenset()

    def wire_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(cast(Any, self))}

    def signed_fields(self) -> dict[str, Any]:
        out = self.wire_fields()
        del out["sig"]
        return out

    def to_bytes(self) -> bytes:
        return canonical(self.wire_fields())

    @classmethod
    def _read_map(
        cls, data: bytes, limit: int, what: str, types: dict[str, type]
    ) -> dict[str, Any]:
        """``data`` (at most ``limit`` bytes) as this record's map: exactly its fields, of
        this code's version, each named in ``types`` of that type (exactly: no bool for int).
        ``what`` names the record in errors."""
        obj = _unpack_map(bytes(data), limit, what)
        names = cls.field_names()
        if not names - cls.optional_names() <= set(obj) <= names:
            raise TrustRejected("MALFORMED", f"{what} fields {sorted(obj)}")
        if obj["v"] != CERT_VERSION:
            raise TrustRejected("UNSUPPORTED_VERSION", f"{what} v={obj['v']!r}")
        for name, typ in types.items():
            if type(obj[name]) is not typ:
                raise TrustRejected("MALFORMED", f"{what} field {name} type")
        return obj

    def _check_canonical(self, data: bytes, what: str) -> None:
        """One encoding per record: no malleable variants of the same signed content."""
        if self.to_bytes() != bytes(data):
            raise TrustRejected("MALFORMED", f"{what} is not canonically encoded")


@dataclass(frozen=True, slots=True)
class Certificate(_Signed):
    """A CA-signed binding of (id, role, public keys, validity)."""

    serial: bytes
    id: str
    role: str
    public_key: bytes
    kem_public_key: bytes | None
    issuer: str
    not_before: int
    not_after: int
    sig: bytes = b""
    v: int = CERT_VERSION

    @classmethod
    def from_bytes(cls, data: bytes) -> Certificate:
        """Parse (not verify) a certificate; bad bytes raise TrustRejected(MALFORMED)."""
        types = {
            "serial": bytes,
            "id": str,
            "role": str,
            "public_key": bytes,
            "issuer": str,
            "not_before": int,
            "not_after": int,
            "sig": bytes,
        }
        obj = cls._read_map(data, MAX_CERT_BYTES, "certificate", types)
        kem = obj["kem_public_key"]
        if kem is not None and (type(kem) is not bytes or len(kem) != KEM_PUBLIC_KEY_SIZE):
            raise TrustRejected("MALFORMED", "certificate kem_public_key")
        if len(obj["public_key"]) != PUBLIC_KEY_SIZE:
            raise TrustRejected("MALFORMED", "certificate public_key size")
        cert = cls(**obj)
        cert._check_canonical(data, "certificate")
        return cert

    def is_valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after

    def __repr__(self) -> str:
        return (
            f"Certificate(id={self.id!r}, role={self.role!r}, serial={self.serial.hex()}, "
            f"not_after={self.not_after})"
        )


@dataclass(frozen=True, slots=True)
class RevocationList(_Signed):
    """The CA-signed set of revoked certificate serials; ``number`` increases per issue.
    ``holders``: the ids of the revoked certificates' holders, as the CA issued them."""

    issuer: str
    number: int
    issued_at: int
    serials: frozenset[bytes]
    sig: bytes = b""
    v: int = CERT_VERSION
    holders: frozenset[str] = frozenset()

    @classmethod
    def optional_names(cls) -> frozenset[str]:
        return frozenset({"holders"})

    def wire_fields(self) -> dict[str, Any]:
        out = {**_Signed.wire_fields(self), "serials": sorted(self.serials)}
        out["holders"] = sorted(self.holders)
        if not self.holders:
            del out["holders"]
        return out

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationList:
        types = {"issuer": str, "number": int, "issued_at": int, "sig": bytes}
        obj = cls._read_map(data, MAX_CRL_BYTES, "revocation list", types)
        serials = obj["serials"]
        if not isinstance(serials, list) or not all(type(s) is bytes for s in serials):
            raise TrustRejected("MALFORMED", "revocation list serials")
        holders = obj.get("holders", [])
        if not isinstance(holders, list) or not all(type(h) is str for h in holders):
            raise TrustRejected("MALFORMED", "revocation list holders")
        crl = cls(**{**obj, "serials": frozenset(serials), "holders": frozenset(holders)})
        crl._check_canonical(data, "revocation list")
        return crl

    def __contains__(self, cert: object) -> bool:
        serial = cert.serial if isinstance(cert, Certificate) else cert
        return serial in self.serials


@dataclass(slots=True)
class CertificateAuthority:
    """Issues and revokes certificates. Its key never leaves the provisioning machine."""

    key: SigningKey
    cert: Certificate

    @classmethod
    def create(
        cls, ca_id: str = "qflare-ca", valid_days: float = 3650, now: float | None = None
    ) -> CertificateAuthority:
        key = generate_signing_key()
        start = int(time.time() if now is None else now)
        cert = Certificate(
            serial=os.urandom(SERIAL_SIZE),
            id=check_id(ca_id),
            role="ca",
            public_key=key.public_key,
            kem_public_key=None,
            issuer=ca_id,
            not_before=start - 300,
            not_after=start + int(valid_days * _DAY),
        )
        cert = replace(cert, sig=key.sign(canonical(cert.signed_fields()), CERT_CONTEXT))
        return cls(key, cert)

    @property
    def id(self) -> str:
        return self.cert.id

    def issue(
        self,
        holder_id: str,
        role: str,
        public_key: bytes,
        kem_public_key: bytes | None = None,
        valid_days: float = 365,
        now: float | None = None,
    ) -> Certificate:
        """A certificate for ``holder_id`` in ``role``. ``valid_days`` may be negative in
        tests that need an already expired certificate."""
        if role not in ROLES or role == "ca":
            raise ValueError(f"role {role!r} is not one of {ROLES[1:]}")
        if len(public_key) != PUBLIC_KEY_SIZE:
            raise ValueError(f"public_key must be {PUBLIC_KEY_SIZE} bytes (ML-DSA-65)")
        if kem_public_key is not None and len(kem_public_key) != KEM_PUBLIC_KEY_SIZE:
            raise ValueError(f"kem_public_key must be {KEM_PUBLIC_KEY_SIZE} bytes")
        start = int(time.time() if now is None else now)
        end = start + int(valid_days * _DAY)
        cert = Certificate(
            serial=os.urandom(SERIAL_SIZE),
            id=check_id(holder_id),
            role=role,
            public_key=bytes(public_key),
            kem_public_key=None if kem_public_key is None else bytes(kem_public_key),
            issuer=self.cert.id,
            not_before=min(start - 300, end - 1),
            not_after=end,
        )
        return replace(cert, sig=self.key.sign(canonical(cert.signed_fields()), CERT_CONTEXT))

    def revocation_list(
        self,
        serials: frozenset[bytes] = frozenset(),
        number: int = 1,
        now: float | None = None,
        holders: frozenset[str] = frozenset(),
    ) -> RevocationList:
        crl = RevocationList(
            self.cert.id,
            number,
            int(time.time() if now is None else now),
            frozenset(serials),
            holders=frozenset(check_id(h) for h in holders),
        )
        return replace(crl, sig=self.key.sign(canonical(crl.signed_fields()), CRL_CONTEXT))

    def revoke(
        self,
        crl: RevocationList,
        *revoked: Certificate | bytes,
        now: float | None = None,
        holders: frozenset[str] = frozenset(),
    ) -> RevocationList:
        """A new, higher-numbered list that also revokes ``revoked`` (certs or serials) and
        names their holders: each certificate's id, and ``holders`` (those of serials)."""
        serials = {c.serial if isinstance(c, Certificate) else bytes(c) for c in revoked}
        named = {c.id for c in revoked if isinstance(c, Certificate)} | set(holders)
        return self.revocation_list(
            crl.serials | serials, crl.number + 1, now, holders=crl.holders | named
        )


@dataclass(slots=True)
class TrustStore:
    """What a verifier needs: the CA certificate and the current revocation list.

    Signature checks of certificates are cached by certificate bytes (a sender repeats its
    certificate in every envelope); validity and revocation are checked on every call.
    """

    ca: Certificate
    crl: RevocationList | None = None
    cache_size: int = 4096
    _verified: dict[bytes, Certificate] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.ca.role != "ca" or not verify(
            self.ca.public_key, self.ca.sig, canonical(self.ca.signed_fields()), CERT_CONTEXT
        ):
            raise ValueError(f"{self.ca!r} is not a self-signed CA certificate")
        if self.crl is not None and not self._crl_ok(self.crl):
            raise ValueError("revocation list is not signed by this CA")

    def _crl_ok(self, crl: RevocationList) -> bool:
        return crl.issuer == self.ca.id and verify(
            self.ca.public_key, crl.sig, canonical(crl.signed_fields()), CRL_CONTEXT
        )

    def update_crl(self, crl: RevocationList) -> bool:
        """Adopt a newer revocation list; returns False for one not newer than the current.
        A list not signed by the CA raises TrustRejected(BAD_SIGNATURE)."""
        if not self._crl_ok(crl):
            raise TrustRejected("BAD_SIGNATURE", "revocation list not signed by the CA")
        if self.crl is not None and crl.number <= self.crl.number:
            return False
        self.crl = crl
        return True

    def verify_certificate(
        self, cert: bytes | Certificate, now: float | None = None
    ) -> Certificate:
        """The certificate if it chains to the CA, is within validity and not revoked;
        otherwise TrustRejected with UNKNOWN_SIGNER / NOT_YET_VALID / EXPIRED / REVOKED."""
        raw = cert.to_bytes() if isinstance(cert, Certificate) else bytes(cert)
        parsed = self._verified.get(raw)
        if parsed is None:
            try:
                parsed = Certificate.from_bytes(raw)
            except TrustRejected as exc:
                raise TrustRejected("UNKNOWN_SIGNER", f"unreadable certificate ({exc})") from None
            if parsed.issuer != self.ca.id or not verify(
                self.ca.public_key, parsed.sig, canonical(parsed.signed_fields()), CERT_CONTEXT
            ):
                raise TrustRejected(
                    "UNKNOWN_SIGNER",
                    f"certificate of {parsed.id!r} is not issued by CA {self.ca.id!r}",
                )
            if len(self._verified) >= self.cache_size:
                self._verified.clear()
            self._verified[raw] = parsed
        t = time.time() if now is None else now
        if not self.ca.is_valid_at(t):
            raise TrustRejected("EXPIRED", f"CA certificate {self.ca.id!r} not valid now")
        if t < parsed.not_before:
            raise TrustRejected(
                "NOT_YET_VALID", f"certificate of {parsed.id!r} valid from {parsed.not_before}"
            )
        if t >= parsed.not_after:
            raise TrustRejected(
                "EXPIRED", f"certificate of {parsed.id!r} expired at {parsed.not_after}"
            )
        if self.crl is not None and parsed.serial in self.crl.serials:
            raise TrustRejected(
                "REVOKED", f"certificate of {parsed.id!r} ({parsed.serial.hex()}) revoked"
            )
        return parsed
