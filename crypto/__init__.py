"""qflare.crypto: post-quantum signing, sealing and the small PKI QFLARE runs on.

- ML-DSA-65 signatures (FIPS 204) with per-kind context strings, behind a backend interface
  (pyca/cryptography by default; liboqs-python only when a liboqs library is installed).
- Hybrid ML-KEM-768 + X25519 sealing (HKDF-SHA256, AES-256-GCM).
- Certificates, a certificate authority, revocation lists and a trust store; identities and
  encrypted key files; provisioning of a whole federation.
"""

from qflare.crypto.errors import CryptoUnavailable, TrustRejected
from qflare.crypto.keystore import (
    Identity,
    load_trust,
    passphrase_from_env,
    signing_key_from_pem,
    signing_key_to_pem,
)
from qflare.crypto.pki import (
    ROLES,
    SERVICE_ROLES,
    Certificate,
    CertificateAuthority,
    RevocationList,
    TrustStore,
)
from qflare.crypto.provision import Federation, load_ca, provision, revoke
from qflare.crypto.sealing import KemPrivateKey, open_sealed, seal
from qflare.crypto.signing import (
    ALGORITHM,
    CryptographyBackend,
    OqsBackend,
    SignatureBackend,
    SigningKey,
    context_for,
    find_liboqs,
    generate_signing_key,
    get_backend,
    signing_key_from_seed,
    verify,
)
from qflare.errors import QflareError

__all__ = [
    "ALGORITHM",
    "ROLES",
    "SERVICE_ROLES",
    "Certificate",
    "CertificateAuthority",
    "CryptoUnavailable",
    "CryptographyBackend",
    "Federation",
    "Identity",
    "KemPrivateKey",
    "OqsBackend",
    "QflareError",
    "RevocationList",
    "SignatureBackend",
    "SigningKey",
    "TrustRejected",
    "TrustStore",
    "context_for",
    "find_liboqs",
    "generate_signing_key",
    "get_backend",
    "load_ca",
    "load_trust",
    "open_sealed",
    "passphrase_from_env",
    "provision",
    "revoke",
    "seal",
    "signing_key_from_pem",
    "signing_key_from_seed",
    "signing_key_to_pem",
    "verify",
]
