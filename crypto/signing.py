"""ML-DSA-65 signatures (FIPS 204) behind a small backend interface.

The default backend is pyca/cryptography (OpenSSL 3.5+ ML-DSA). An optional backend wraps
liboqs-python, used only when a liboqs shared library is already installed: importing the
``oqs`` package without one makes liboqs-python clone and build liboqs at import time, so
:func:`get_backend` looks for the library itself first and never imports ``oqs`` blindly.

Every signature carries an ML-DSA context string (FIPS 204 §5.2, at most 255 bytes);
QFLARE uses ``qflare/v1/<kind>`` so that a signature made for one message kind never
verifies as another (domain separation).

Keys are kept as their 32-byte seed (xi, FIPS 204 Algorithm 6), the compact form that
cryptography, dilithium-py and the IETF ML-DSA private-key encoding share.
"""

from __future__ import annotations

import abc
import ctypes.util
import os
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import mldsa

from qflare.crypto.errors import CryptoUnavailable

Buffer = bytes | bytearray | memoryview

ALGORITHM = "ML-DSA-65"
SEED_SIZE = 32
PUBLIC_KEY_SIZE = 1952
SIGNATURE_SIZE = 3309
MAX_CONTEXT = 255

OQS_INSTALL_HINT = (
    "liboqs is not installed. Build it once as a shared library, e.g.\n"
    "  git clone --depth 1 https://github.com/open-quantum-safe/liboqs && "
    "cmake -S liboqs -B liboqs/build -DBUILD_SHARED_LIBS=ON && "
    "cmake --build liboqs/build --parallel && sudo cmake --install liboqs/build\n"
    "then `pip install qflare[oqs]`, or point OQS_INSTALL_PATH at the install prefix. "
    "The default 'cryptography' backend needs none of this."
)


def context_for(kind: str) -> bytes:
    """The ML-DSA context string binding a signature to one message kind."""
    ctx = f"qflare/v1/{kind}".encode()
    if len(ctx) > MAX_CONTEXT:
        raise ValueError(f"context for kind {kind!r} is {len(ctx)} bytes, over {MAX_CONTEXT}")
    return ctx


class SigningKey(abc.ABC):
    """A private ML-DSA-65 key."""

    @property
    @abc.abstractmethod
    def public_key(self) -> bytes:
        """The 1952-byte encoded public key."""

    @abc.abstractmethod
    def sign(self, data: Buffer, context: bytes) -> bytes:
        """Sign ``data`` under ``context`` (hedged, so two signatures of the same data differ)."""

    @property
    @abc.abstractmethod
    def seed(self) -> bytes:
        """The 32-byte seed the key expands from (the secret to store)."""


class SignatureBackend(abc.ABC):
    """One implementation of ML-DSA-65. ``verify`` answers only True/False."""

    name: str

    @abc.abstractmethod
    def generate(self) -> SigningKey:
        """A fresh random key."""

    @abc.abstractmethod
    def from_seed(self, seed: bytes) -> SigningKey:
        """The key expanded from a 32-byte seed (deterministic)."""

    @abc.abstractmethod
    def verify(self, public_key: bytes, signature: Buffer, data: Buffer, context: bytes) -> bool:
        """Whether ``signature`` is valid for ``data`` under ``context`` and ``public_key``."""


class _CryptographyKey(SigningKey):
    __slots__ = ("_key", "_public")

    def __init__(self, key: mldsa.MLDSA65PrivateKey) -> None:
        self._key = key
        self._public = key.public_key().public_bytes_raw()

    @property
    def public_key(self) -> bytes:
        return self._public

    @property
    def seed(self) -> bytes:
        return self._key.private_bytes_raw()

    @property
    def private_key(self) -> mldsa.MLDSA65PrivateKey:
        """The pyca/cryptography key object (for PKCS#8 serialisation)."""
        return self._key

    def sign(self, data: Buffer, context: bytes) -> bytes:
        return self._key.sign(data, context)

    def __repr__(self) -> str:
        return f"<ML-DSA-65 signing key {self._public[:6].hex()}…>"


class CryptographyBackend(SignatureBackend):
    """pyca/cryptography (OpenSSL) ML-DSA-65; releases the GIL while signing/verifying."""

    name = "cryptography"

    def generate(self) -> SigningKey:
        return _CryptographyKey(mldsa.MLDSA65PrivateKey.generate())

    def from_seed(self, seed: bytes) -> SigningKey:
        if len(seed) != SEED_SIZE:
            raise ValueError(f"ML-DSA-65 seed must be {SEED_SIZE} bytes, got {len(seed)}")
        return _CryptographyKey(mldsa.MLDSA65PrivateKey.from_seed_bytes(seed))

    def verify(self, public_key: bytes, signature: Buffer, data: Buffer, context: bytes) -> bool:
        try:
            key = _public_key(bytes(public_key))
            key.verify(signature, data, context)
        except (InvalidSignature, ValueError):
            return False
        return True


@lru_cache(maxsize=4096)
def _public_key(raw: bytes) -> mldsa.MLDSA65PublicKey:
    # Parsing a public key expands the matrix A; senders repeat, so cache per key.
    return mldsa.MLDSA65PublicKey.from_public_bytes(raw)


def find_liboqs() -> str | None:
    """Path or name of an installed liboqs shared library, or None. Never imports ``oqs``."""
    prefix = os.environ.get("OQS_INSTALL_PATH")
    if prefix:
        for sub in ("lib", "lib64", "bin"):
            for name in ("liboqs.so", "liboqs.dylib", "oqs.dll"):
                candidate = Path(prefix) / sub / name
                if candidate.exists():
                    return str(candidate)
    home = Path.home() / "_oqs"  # where liboqs-python installs a library it built itself
    for sub in ("lib", "lib64"):
        candidate = home / sub / "liboqs.so"
        if candidate.exists():
            return str(candidate)
    return ctypes.util.find_library("oqs")


class _OqsKey(SigningKey):
    def __init__(self, secret_key: bytes, public_key: bytes, seed: bytes | None) -> None:
        self._secret = secret_key
        self._public = public_key
        self._seed = seed

    @property
    def public_key(self) -> bytes:
        return self._public

    @property
    def seed(self) -> bytes:
        if self._seed is None:
            raise CryptoUnavailable(
                "this liboqs key was generated without a seed; store keys made by the "
                "'cryptography' backend (seed form) instead"
            )
        return self._seed

    def sign(self, data: Buffer, context: bytes) -> bytes:
        import oqs  # guarded: only reachable after OqsBackend checked the library

        with oqs.Signature("ML-DSA-65", self._secret) as signer:
            return bytes(signer.sign_with_ctx_str(bytes(data), context))


class OqsBackend(SignatureBackend):
    """liboqs-python ML-DSA-65. Construct through :func:`get_backend` ("oqs")."""

    name = "oqs"

    def __init__(self) -> None:
        library = find_liboqs()
        if library is None:
            raise CryptoUnavailable(OQS_INSTALL_HINT)
        try:
            import oqs  # noqa: F401  (library present, so no download/build is triggered)
        except ImportError as exc:
            raise CryptoUnavailable(
                f"liboqs found at {library} but the Python binding is missing: "
                "pip install 'qflare[oqs]'"
            ) from exc
        self.library = library

    def generate(self) -> SigningKey:
        import oqs

        with oqs.Signature("ML-DSA-65") as signer:
            public = bytes(signer.generate_keypair())
            return _OqsKey(bytes(signer.export_secret_key()), public, None)

    def from_seed(self, seed: bytes) -> SigningKey:
        # liboqs-python exposes no seed-based ML-DSA key generation; keys stored as seeds
        # sign through the cryptography backend, which every install has.
        raise CryptoUnavailable("liboqs-python cannot expand an ML-DSA seed; use 'cryptography'")

    def verify(self, public_key: bytes, signature: Buffer, data: Buffer, context: bytes) -> bool:
        import oqs

        with oqs.Signature("ML-DSA-65") as verifier:
            return bool(
                verifier.verify_with_ctx_str(bytes(data), bytes(signature), context, public_key)
            )


_BACKENDS: dict[str, SignatureBackend] = {}


def get_backend(name: str | None = None) -> SignatureBackend:
    """The signature backend by name ("cryptography", "oqs"); default from
    ``QFLARE_SIGNATURE_BACKEND`` or "cryptography". Raises :class:`CryptoUnavailable` with
    install instructions when the oqs backend is asked for but liboqs is absent."""
    name = name or os.environ.get("QFLARE_SIGNATURE_BACKEND", "cryptography")
    if name not in _BACKENDS:
        if name == "cryptography":
            _BACKENDS[name] = CryptographyBackend()
        elif name == "oqs":
            _BACKENDS[name] = OqsBackend()
        else:
            raise ValueError(f"unknown signature backend {name!r}; use 'cryptography' or 'oqs'")
    return _BACKENDS[name]


def generate_signing_key(backend: SignatureBackend | None = None) -> SigningKey:
    """A fresh ML-DSA-65 signing key from the default (or given) backend."""
    return (backend or get_backend()).generate()


def signing_key_from_seed(seed: bytes) -> SigningKey:
    """Expand a stored 32-byte seed (always through the cryptography backend)."""
    return get_backend("cryptography").from_seed(seed)


def verify(
    public_key: bytes,
    signature: Buffer,
    data: Buffer,
    context: bytes,
    backend: SignatureBackend | None = None,
) -> bool:
    """Verify with the default (or given) backend; never raises for a bad signature."""
    return (backend or get_backend()).verify(public_key, signature, data, context)
