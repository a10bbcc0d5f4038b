"""Hybrid post-quantum sealing of a message body: ML-KEM-768 + X25519 -> HKDF-SHA256 -> AES-256-GCM.

The combiner follows X-Wing (Barbosa et al., "X-Wing: The Hybrid KEM You've Been Looking
For", IACR ePrint 2024/039): both shared secrets are the key material and the X25519
ciphertext and public key are bound in, so the result stays secret while either ML-KEM-768
(FIPS 203) or X25519 holds. We use HKDF-SHA256 (RFC 5869) instead of SHA3-256 and also
bind the ML-KEM ciphertext and public key:

    key || nonce = HKDF-SHA256(ikm = ss_mlkem || ss_x25519, salt = "qflare/v1/seal",
                               info = ct_mlkem || ct_x25519 || pk_mlkem || pk_x25519)

Each seal uses fresh encapsulations, so the key is single-use and a derived nonce is safe.
The caller passes the envelope header as AES-GCM associated data, so a sealed body moved
into another envelope does not open.

Sealed blob: ``ct_mlkem (1088 B) || ct_x25519 (32 B) || AES-GCM ciphertext+tag``.

A body read by several services is encrypted once (:func:`seal_for`): a fresh AES-256-GCM
content key encrypts it, and that key is sealed as above to each reader's hybrid key.
Sealed-for blob: ``n (1 B) || n x (key id (8 B) || sealed content key) || nonce (12 B) ||
AES-GCM ciphertext+tag``; the same associated data binds every part, so neither a wrapped
key nor the ciphertext can be moved to another envelope.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qflare.crypto.errors import TrustRejected

Buffer = bytes | bytearray | memoryview

MLKEM_PUBLIC_SIZE = 1184
MLKEM_CIPHERTEXT_SIZE = 1088
X25519_SIZE = 32
PUBLIC_KEY_SIZE = MLKEM_PUBLIC_SIZE + X25519_SIZE
OVERHEAD = MLKEM_CIPHERTEXT_SIZE + X25519_SIZE + 16
SEAL_LABEL = b"qflare/v1/seal"
KEY_ID_SIZE = 8
CONTENT_KEY_SIZE = 32
NONCE_SIZE = 12
#: Bytes each reader adds to a sealed-for body: its key id and its sealed content key.
WRAP_SIZE = KEY_ID_SIZE + OVERHEAD + CONTENT_KEY_SIZE
MAX_READERS = 16


def key_id(kem_public_key: bytes) -> bytes:
    """Short identifier of a hybrid KEM public key, carried in sealed-for bodies."""
    return hashlib.sha256(kem_public_key).digest()[:KEY_ID_SIZE]


def _derive(
    ss_m: bytes, ss_x: bytes, ct_m: bytes, ct_x: bytes, pk_m: bytes, pk_x: bytes
) -> tuple[bytes, bytes]:
    okm = HKDF(hashes.SHA256(), 32 + 12, SEAL_LABEL, ct_m + ct_x + pk_m + pk_x).derive(ss_m + ss_x)
    return okm[:32], okm[32:]


@dataclass(frozen=True, slots=True)
class KemPrivateKey:
    """A hybrid decapsulation key (ML-KEM-768 + X25519)."""

    mlkem: mlkem.MLKEM768PrivateKey
    x25519: x25519.X25519PrivateKey

    @classmethod
    def generate(cls) -> KemPrivateKey:
        return cls(mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate())

    @property
    def public_key(self) -> bytes:
        """``pk_mlkem (1184 B) || pk_x25519 (32 B)``, as carried in certificates."""
        return (
            self.mlkem.public_key().public_bytes_raw() + self.x25519.public_key().public_bytes_raw()
        )

    def to_pem(self, passphrase: bytes | None = None) -> bytes:
        """Both keys as PKCS#8 PEM blocks, encrypted with ``passphrase`` when given."""
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        return b"".join(
            k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
            for k in (self.mlkem, self.x25519)
        )

    @classmethod
    def from_pem(cls, data: bytes, passphrase: bytes | None = None) -> KemPrivateKey:
        end = b"-----END"
        cut = data.index(end)
        cut = data.index(b"\n", cut) + 1
        first = serialization.load_pem_private_key(data[:cut], passphrase)
        second = serialization.load_pem_private_key(data[cut:], passphrase)
        if not isinstance(first, mlkem.MLKEM768PrivateKey) or not isinstance(
            second, x25519.X25519PrivateKey
        ):
            raise ValueError("KEM key file must hold an ML-KEM-768 then an X25519 PKCS#8 key")
        return cls(first, second)

    def open(self, sealed: Buffer, aad: Buffer) -> bytes:
        """Decrypt a sealed blob; any failure is TrustRejected(UNSEAL_FAILED)."""
        return open_sealed(self, sealed, aad)


def seal(recipient_public_key: bytes, plaintext: Buffer, aad: Buffer) -> bytes:
    """Encrypt ``plaintext`` to the holder of ``recipient_public_key`` (1216-byte hybrid key)
    with ``aad`` authenticated but not encrypted."""
    if len(recipient_public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(
            f"hybrid public key must be {PUBLIC_KEY_SIZE} bytes, got {len(recipient_public_key)}"
        )
    pk_m = bytes(recipient_public_key[:MLKEM_PUBLIC_SIZE])
    pk_x = bytes(recipient_public_key[MLKEM_PUBLIC_SIZE:])
    ss_m, ct_m = mlkem.MLKEM768PublicKey.from_public_bytes(pk_m).encapsulate()
    ephemeral = x25519.X25519PrivateKey.generate()
    ss_x = ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(pk_x))
    ct_x = ephemeral.public_key().public_bytes_raw()
    key, nonce = _derive(ss_m, ss_x, ct_m, ct_x, pk_m, pk_x)
    return ct_m + ct_x + AESGCM(key).encrypt(nonce, plaintext, bytes(aad))


def open_sealed(private_key: KemPrivateKey, sealed: Buffer, aad: Buffer) -> bytes:
    """Inverse of :func:`seal`."""
    view = memoryview(sealed)
    if len(view) < OVERHEAD:
        raise TrustRejected("UNSEAL_FAILED", f"sealed body of {len(view)} bytes is too short")
    ct_m = bytes(view[:MLKEM_CIPHERTEXT_SIZE])
    ct_x = bytes(view[MLKEM_CIPHERTEXT_SIZE : MLKEM_CIPHERTEXT_SIZE + X25519_SIZE])
    public = private_key.public_key
    try:
        ss_m = private_key.mlkem.decapsulate(ct_m)
        ss_x = private_key.x25519.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
        key, nonce = _derive(
            ss_m, ss_x, ct_m, ct_x, public[:MLKEM_PUBLIC_SIZE], public[MLKEM_PUBLIC_SIZE:]
        )
    except ValueError as exc:
        raise _unseal_failed("this key and header", exc) from None
    return _decrypt(
        key, nonce, view[MLKEM_CIPHERTEXT_SIZE + X25519_SIZE :], aad, "this key and header"
    )


def _decrypt(key: bytes, nonce: bytes, ciphertext: Buffer, aad: Buffer, what: str) -> bytes:
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, bytes(aad))
    except (InvalidTag, ValueError) as exc:
        raise _unseal_failed(what, exc) from None


def _unseal_failed(what: str, exc: Exception) -> TrustRejected:
    return TrustRejected(
        "UNSEAL_FAILED", f"sealed body does not open with {what} ({type(exc).__name__})"
    )


def seal_for(recipients: Sequence[bytes], plaintext: Buffer, aad: Buffer) -> bytes:
    """Encrypt ``plaintext`` once for several holders of hybrid keys (module docstring)."""
    if not 1 <= len(recipients) <= MAX_READERS:
        raise ValueError(f"a body is sealed for 1..{MAX_READERS} readers, got {len(recipients)}")
    ids = [key_id(pk) for pk in recipients]
    if len(set(ids)) != len(ids):
        raise ValueError("a body is sealed for the same key twice")
    content_key = AESGCM.generate_key(bit_length=8 * CONTENT_KEY_SIZE)
    nonce = os.urandom(NONCE_SIZE)
    parts = [bytes([len(recipients)])]
    for pk, kid in zip(recipients, ids, strict=True):
        parts += [kid, seal(pk, content_key, aad)]
    parts += [nonce, AESGCM(content_key).encrypt(nonce, plaintext, bytes(aad))]
    return b"".join(parts)


def open_for(private_key: KemPrivateKey, sealed: Buffer, aad: Buffer) -> bytes:
    """Inverse of :func:`seal_for` for one of its readers; any failure (not a reader,
    tampered, truncated) is TrustRejected(UNSEAL_FAILED)."""
    view = memoryview(sealed)
    n = view[0] if len(view) else 0
    start = 1 + n * WRAP_SIZE
    if not 1 <= n <= MAX_READERS or len(view) < start + NONCE_SIZE + 16:
        raise TrustRejected("UNSEAL_FAILED", f"sealed body of {len(view)} bytes is malformed")
    mine = key_id(private_key.public_key)
    for i in range(n):
        entry = view[1 + i * WRAP_SIZE : 1 + (i + 1) * WRAP_SIZE]
        if bytes(entry[:KEY_ID_SIZE]) == mine:
            content_key = open_sealed(private_key, entry[KEY_ID_SIZE:], aad)
            break
    else:
        raise TrustRejected("UNSEAL_FAILED", "body is not sealed for this key")
    nonce = bytes(view[start : start + NONCE_SIZE])
    return _decrypt(content_key, nonce, view[start + NONCE_SIZE :], aad, "its content key")
