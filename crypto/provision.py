"""Provisioning a federation on disk: a CA, one identity per service, one kit per client.

Layout under the output directory::

    ca/ca.qc  ca/key.pem  ca/crl.qrl  ca/issued/<id>.qc     (the CA's own; keep offline)
    services/<role>/{cert.qc,key.pem,kem.pem,ca.qc,crl.qrl} (ingest, detector, aggregator,
                                                             accountant, alerting, operator)
    clients/<id>/{cert.qc,key.pem,kem.pem,ca.qc,crl.qrl}    (one kit per client)

Every participant gets an ML-DSA-65 signing key and a hybrid KEM key whose public halves
are in its certificate. A client's update is sealed once for the three services that read it
from the update stream (ingest, the aggregator, the detector): their certificates are copied
into each kit (``ingest.qc``, ``aggregator.qc``, ``detector.qc``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from qflare.crypto.keystore import (
    CA_FILE,
    CERT_FILE,
    CRL_FILE,
    KEY_FILE,
    Identity,
    load_trust,
    signing_key_from_pem,
    signing_key_to_pem,
    write_private,
)
from qflare.crypto.pki import (
    SERVICE_ROLES,
    Certificate,
    CertificateAuthority,
    RevocationList,
    TrustStore,
    check_id,
)
from qflare.crypto.sealing import KemPrivateKey
from qflare.crypto.signing import generate_signing_key

SERVICES: tuple[str, ...] = (*SERVICE_ROLES, "operator")
#: The services that read a client's sealed update, and the file of each one's certificate
#: in a client's kit.
READER_CERT_FILES: dict[str, str] = {
    "ingest": "ingest.qc",
    "aggregator": "aggregator.qc",
    "detector": "detector.qc",
}


@dataclass
class Federation:
    """Paths of a provisioned federation, with loaders."""

    root: Path
    services: dict[str, Path] = field(default_factory=dict)
    clients: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def at(cls, root: Path | str) -> Federation:
        r = Path(root)
        services = {p.name: p for p in sorted((r / "services").glob("*")) if p.is_dir()}
        clients = {p.name: p for p in sorted((r / "clients").glob("*")) if p.is_dir()}
        return cls(r, services, clients)

    def identity(self, name: str, passphrase: bytes | None = None) -> Identity:
        """The identity of a service (by role) or a client (by id)."""
        path = self.services.get(name) or self.clients.get(name)
        if path is None:
            raise KeyError(f"no service or client {name!r} under {self.root}")
        return Identity.load(path, passphrase)

    def trust(self) -> TrustStore:
        """The CA certificate and the current revocation list (from ``ca/``)."""
        return load_trust(self.root / "ca")


def _issue_into(
    ca: CertificateAuthority,
    directory: Path,
    holder: str,
    role: str,
    valid_days: float,
    passphrase: bytes | None,
    crl: RevocationList,
) -> Identity:
    key = generate_signing_key()
    kem = KemPrivateKey.generate()
    cert = ca.issue(holder, role, key.public_key, kem.public_key, valid_days)
    identity = Identity(cert, key, kem)
    identity.save(directory, passphrase)
    (directory / CA_FILE).write_bytes(ca.cert.to_bytes())
    (directory / CRL_FILE).write_bytes(crl.to_bytes())
    (ca_dir(directory.parent.parent) / "issued" / f"{holder}.qc").write_bytes(cert.to_bytes())
    return identity


def ca_dir(root: Path) -> Path:
    return root / "ca"


def provision(
    out: Path | str,
    clients: int,
    *,
    passphrase: bytes | None = None,
    expiry_days: float = 365,
    ca_expiry_days: float = 3650,
    client_prefix: str = "client",
    services: Iterable[str] = SERVICES,
    force: bool = False,
) -> Federation:
    """Create a CA, identities for ``services`` and ``clients`` client kits under ``out``.

    Refuses to overwrite an existing CA unless ``force`` (a new CA invalidates every kit).
    """
    if clients < 0:
        raise ValueError(f"clients must be >= 0, got {clients}")
    if expiry_days <= 0 or ca_expiry_days < expiry_days:
        raise ValueError(
            f"need 0 < expiry_days ({expiry_days}) <= ca_expiry_days ({ca_expiry_days})"
        )
    root = Path(out)
    if (root / "ca").exists():
        if not force:
            raise FileExistsError(
                f"{root / 'ca'} exists; pass force=True (--force) to replace the whole federation"
            )
        for sub in ("ca", "services", "clients"):
            shutil.rmtree(root / sub, ignore_errors=True)
    (root / "ca" / "issued").mkdir(parents=True)
    ca = CertificateAuthority.create(valid_days=ca_expiry_days)
    crl = ca.revocation_list()
    (root / "ca" / CA_FILE).write_bytes(ca.cert.to_bytes())
    write_private(root / "ca" / KEY_FILE, signing_key_to_pem(ca.key, passphrase))
    (root / "ca" / CRL_FILE).write_bytes(crl.to_bytes())
    fed = Federation(root)
    for role in services:
        d = root / "services" / role
        _issue_into(ca, d, role, role, expiry_days, passphrase, crl)
        fed.services[role] = d
    width = max(3, len(str(max(clients - 1, 0))))
    for i in range(clients):
        cid = check_id(f"{client_prefix}-{i:0{width}d}")
        d = root / "clients" / cid
        _issue_into(ca, d, cid, "client", expiry_days, passphrase, crl)
        for role, name in READER_CERT_FILES.items():
            reader_cert = root / "services" / role / CERT_FILE
            if reader_cert.exists():
                shutil.copyfile(reader_cert, d / name)
        fed.clients[cid] = d
    return fed


def load_ca(root: Path | str, passphrase: bytes | None = None) -> CertificateAuthority:
    """The CA of a provisioned federation (needs its private key, so its passphrase)."""
    d = Path(root) / "ca"
    cert = Certificate.from_bytes((d / CA_FILE).read_bytes())
    key = signing_key_from_pem((d / KEY_FILE).read_bytes(), passphrase)
    if key.public_key != cert.public_key:
        raise ValueError(f"{d / KEY_FILE} does not match {d / CA_FILE}")
    return CertificateAuthority(key, cert)


def revoke(
    root: Path | str, targets: Iterable[str | bytes], passphrase: bytes | None = None
) -> RevocationList:
    """Revoke participants by id (or certificate serial, bytes or hex) and write the new,
    higher-numbered revocation list to ``ca/`` and to every kit under ``root``. The list
    names the holder of each revoked certificate the CA issued (``ca/issued/``), also of one
    revoked by serial.

    Verifiers pick it up by loading ``crl.qrl`` again (:meth:`TrustStore.update_crl`)."""
    r = Path(root)
    ca = load_ca(r, passphrase)
    current = RevocationList.from_bytes((r / "ca" / CRL_FILE).read_bytes())
    resolved = resolve_targets(r, targets)
    serials = [t.serial if isinstance(t, Certificate) else t for t in resolved]
    holders = frozenset(t.id for t in resolved if isinstance(t, Certificate))
    crl = ca.revoke(current, *serials, holders=holders)
    data = crl.to_bytes()
    for path in [
        r / "ca" / CRL_FILE,
        *r.glob("services/*/" + CRL_FILE),
        *r.glob("clients/*/" + CRL_FILE),
    ]:
        path.write_bytes(data)
    return crl


def resolve_targets(root: Path | str, targets: Iterable[str | bytes]) -> list[Certificate | bytes]:
    """What to revoke: an id, or a serial (bytes or hex) of a certificate the CA issued
    (``ca/issued/``), is that certificate; another serial stays a serial. ValueError for a
    target that is neither an issued id nor a serial."""
    r = Path(root)
    issued = {
        cert.serial: cert
        for cert in (
            Certificate.from_bytes(path.read_bytes())
            for path in sorted((r / "ca" / "issued").glob("*.qc"))
        )
    }
    out: list[Certificate | bytes] = []
    for target in targets:
        if isinstance(target, bytes):
            out.append(issued.get(target, target))
            continue
        path = r / "ca" / "issued" / f"{check_id(target)}.qc" if _is_id(target) else None
        if path is not None and path.exists():
            out.append(Certificate.from_bytes(path.read_bytes()))
            continue
        try:
            serial = bytes.fromhex(target)
        except ValueError:
            raise ValueError(
                f"{target!r} is neither an issued id under {r} nor a hex serial"
            ) from None
        out.append(issued.get(serial, serial))
    return out


def _is_id(value: str) -> bool:
    try:
        check_id(value)
    except ValueError:
        return False
    return True
