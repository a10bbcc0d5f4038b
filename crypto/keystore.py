"""Identities and key files: what a participant holds, and how it lies on disk.

A participant directory (written by ``qflare provision``) holds::

    cert.qc    its certificate (msgpack, see qflare.crypto.pki)
    key.pem    its ML-DSA-65 private key, PKCS#8 PEM (encrypted with the passphrase if set)
    kem.pem    its ML-KEM-768 + X25519 private keys, two PKCS#8 PEM blocks (same rule)
    ca.qc      the CA certificate (the trust anchor)
    crl.qrl    the revocation list current at provisioning time

pyca/cryptography writes ML-DSA and ML-KEM private keys as PKCS#8 (seed form) and encrypts
them with PBES2 (PBKDF2-SHA256 + AES-256-CBC) through ``BestAvailableEncryption``, so no
hand-rolled key wrapping is needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa

from qflare.crypto.pki import Certificate, RevocationList, TrustStore
from qflare.crypto.sealing import KemPrivateKey
from qflare.crypto.signing import SigningKey, signing_key_from_seed

CERT_FILE = "cert.qc"
KEY_FILE = "key.pem"
KEM_FILE = "kem.pem"
CA_FILE = "ca.qc"
CRL_FILE = "crl.qrl"


def _encryption(passphrase: bytes | None) -> serialization.KeySerializationEncryption:
    return (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )


def signing_key_to_pem(key: SigningKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM of an ML-DSA-65 key, encrypted when ``passphrase`` is given."""
    private = mldsa.MLDSA65PrivateKey.from_seed_bytes(key.seed)
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _encryption(passphrase)
    )


def signing_key_from_pem(data: bytes, passphrase: bytes | None = None) -> SigningKey:
    """Load a key written by :func:`signing_key_to_pem`. A wrong or missing passphrase
    raises ValueError/TypeError from cryptography."""
    private = serialization.load_pem_private_key(data, passphrase)
    if not isinstance(private, mldsa.MLDSA65PrivateKey):
        raise ValueError(f"expected an ML-DSA-65 private key, found {type(private).__name__}")
    return signing_key_from_seed(private.private_bytes_raw())


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only."""
    # Create with 0600 from the start so the key is never briefly world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True, slots=True)
class Identity:
    """A participant's certificate with the private keys that go with it."""

    cert: Certificate
    key: SigningKey
    kem: KemPrivateKey | None = None

    def __post_init__(self) -> None:
        if self.key.public_key != self.cert.public_key:
            raise ValueError(f"signing key does not match the certificate of {self.cert.id!r}")
        if self.kem is not None and self.kem.public_key != self.cert.kem_public_key:
            raise ValueError(f"KEM key does not match the certificate of {self.cert.id!r}")

    @property
    def id(self) -> str:
        return self.cert.id

    @property
    def role(self) -> str:
        return self.cert.role

    def save(self, directory: Path | str, passphrase: bytes | None = None) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CERT_FILE).write_bytes(self.cert.to_bytes())
        write_private(d / KEY_FILE, signing_key_to_pem(self.key, passphrase))
        if self.kem is not None:
            write_private(d / KEM_FILE, self.kem.to_pem(passphrase))

    @classmethod
    def load(cls, directory: Path | str, passphrase: bytes | None = None) -> Identity:
        d = Path(directory)
        cert = Certificate.from_bytes((d / CERT_FILE).read_bytes())
        key = signing_key_from_pem((d / KEY_FILE).read_bytes(), passphrase)
        kem_path = d / KEM_FILE
        kem = (
            KemPrivateKey.from_pem(kem_path.read_bytes(), passphrase) if kem_path.exists() else None
        )
        return cls(cert, key, kem)

    def __repr__(self) -> str:
        return f"Identity({self.cert!r})"


def load_trust(directory: Path | str) -> TrustStore:
    """The trust store from a participant (or CA) directory's ``ca.qc`` and ``crl.qrl``."""
    d = Path(directory)
    ca = Certificate.from_bytes((d / CA_FILE).read_bytes())
    crl_path = d / CRL_FILE
    crl = RevocationList.from_bytes(crl_path.read_bytes()) if crl_path.exists() else None
    return TrustStore(ca, crl)


def passphrase_from_env(variable: str | None) -> bytes | None:
    """The passphrase held in environment variable ``variable`` (None when not asked for).
    A named but unset or empty variable is a configuration error."""
    if not variable:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ValueError(f"passphrase variable {variable} is not set or empty")
    return value.encode()
