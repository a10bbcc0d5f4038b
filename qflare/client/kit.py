"""A participant's kit: what ``qflare provision`` wrote into ``clients/<id>/``.

``cert.qc`` + ``key.pem`` (+ ``kem.pem``) are the identity, ``ca.qc`` + ``crl.qrl`` the
trust store that verifies the aggregator's model, ``ingest.qc`` the certificate whose KEM
key updates are sealed to, and ``broker_password`` (written by ``qflare broker-definitions``)
the client's RabbitMQ password. In-process participants (the simulator) build a
:class:`Kit` straight from an identity and a trust store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from qflare.crypto.keystore import Identity, load_trust
from qflare.crypto.pki import Certificate, TrustStore

INGEST_CERT_FILE = "ingest.qc"
PASSWORD_FILE = "broker_password"


@dataclass(frozen=True)
class Kit:
    identity: Identity
    trust: TrustStore
    ingest_cert: Certificate | None = None
    broker_password: str | None = None
    folder: Path | None = None

    def __post_init__(self) -> None:
        if self.identity.role != "client":
            raise ValueError(
                f"a participant kit holds a client identity, got role {self.identity.role!r}"
            )
        if self.ingest_cert is not None:
            # the sealing key must itself be certified as ingest's, or a swapped file would
            # make the client encrypt its update to someone else
            cert = self.trust.verify_certificate(self.ingest_cert)
            if cert.role != "ingest":
                raise ValueError(f"{INGEST_CERT_FILE} is a {cert.role!r} certificate, not ingest's")

    @property
    def id(self) -> str:
        return self.identity.id

    @classmethod
    def load(cls, folder: str | Path, passphrase: bytes | None = None) -> Kit:
        d = Path(folder)
        if not (d / "cert.qc").exists():
            raise ValueError(
                f"{d} is not a client kit (no cert.qc); pass a clients/<id>/ folder "
                "written by `qflare provision`"
            )
        ingest = d / INGEST_CERT_FILE
        password = d / PASSWORD_FILE
        return cls(
            identity=Identity.load(d, passphrase),
            trust=load_trust(d),
            ingest_cert=Certificate.from_bytes(ingest.read_bytes()) if ingest.exists() else None,
            broker_password=password.read_text().strip() if password.exists() else None,
            folder=d,
        )

    def broker_url(self, url: str) -> str:
        """``url`` with this client's credentials filled in when it names none
        (``amqp://host:5672/qflare`` -> ``amqp://<id>:<password>@host:5672/qflare``)."""
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or parts.username or self.broker_password is None:
            return url
        netloc = f"{quote(self.id, safe='')}:{quote(self.broker_password, safe='')}@{parts.netloc}"
        return urlunsplit(parts._replace(netloc=netloc))

    def with_(self, **changes: Any) -> Kit:
        from dataclasses import replace

        return replace(self, **changes)
