"""An in-memory federation for tests and simulations (no files, no passphrases)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qflare.crypto.keystore import Identity
from qflare.crypto.pki import CertificateAuthority, RevocationList, TrustStore
from qflare.crypto.provision import SERVICES
from qflare.crypto.sealing import KemPrivateKey
from qflare.crypto.signing import generate_signing_key


@dataclass
class MemoryFederation:
    """A CA with identities by id; ``trust()`` reflects revocations made through it."""

    ca: CertificateAuthority
    crl: RevocationList
    identities: dict[str, Identity] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Identity:
        return self.identities[name]

    @property
    def clients(self) -> list[str]:
        return [i for i, ident in self.identities.items() if ident.role == "client"]

    def trust(self) -> TrustStore:
        return TrustStore(self.ca.cert, self.crl)

    def add(
        self, holder: str, role: str, *, valid_days: float = 365, now: float | None = None
    ) -> Identity:
        key = generate_signing_key()
        kem = KemPrivateKey.generate()
        cert = self.ca.issue(holder, role, key.public_key, kem.public_key, valid_days, now=now)
        self.identities[holder] = Identity(cert, key, kem)
        return self.identities[holder]

    def revoke(self, *holders: str) -> RevocationList:
        self.crl = self.ca.revoke(self.crl, *(self.identities[h].cert for h in holders))
        return self.crl


def make_federation(
    clients: int = 3, services: tuple[str, ...] = SERVICES, client_prefix: str = "client"
) -> MemoryFederation:
    """A fresh CA, one identity per service role (id = role) and ``clients`` clients."""
    ca = CertificateAuthority.create()
    fed = MemoryFederation(ca, ca.revocation_list())
    for role in services:
        fed.add(role, role)
    for i in range(clients):
        fed.add(f"{client_prefix}-{i:03d}", "client")
    return fed
