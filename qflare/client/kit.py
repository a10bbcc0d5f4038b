"""A participant's kit: what ``qflare provision`` wrote into ``clients/<id>/``.

``cert.qc`` + ``key.pem`` (+ ``kem.pem``) are the identity, ``ca.qc`` + ``crl.qrl`` the
trust store that verifies the aggregator's model, ``ingest.qc``, ``aggregator.qc`` and
``detector.qc`` the certificates of the services that read the client's updates (each update
is sealed once, for their three KEM keys), and ``broker_password`` (written by ``qflare
broker-definitions``) the client's RabbitMQ password. In-process participants (the simulator) build a
:class:`Kit` straight from an identity and a trust store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qflare.bus.port import PASSWORD_FILE, with_login
from qflare.crypto.keystore import Identity, load_trust
from qflare.crypto.pki import Certificate, TrustStore
from qflare.crypto.provision import READER_CERT_FILES


@dataclass(frozen=True)
class Kit:
    identity: Identity
    trust: TrustStore
    ingest_cert: Certificate | None = None
    broker_password: str | None = None
    folder: Path | None = None
    aggregator_cert: Certificate | None = None
    detector_cert: Certificate | None = None

    def __post_init__(self) -> None:
        if self.identity.role != "client":
            raise ValueError(
                f"a participant kit holds a client identity, got role {self.identity.role!r}"
            )
        for role, cert in self._readers().items():
            # each sealing key must itself be certified as that service's, or a swapped file
            # would make the client encrypt its update to someone else
            if cert is not None and self.trust.verify_certificate(cert).role != role:
                raise ValueError(
                    f"{READER_CERT_FILES[role]} is a {cert.role!r} certificate, not {role}'s"
                )

    def _readers(self) -> dict[str, Certificate | None]:
        return {
            "ingest": self.ingest_cert,
            "aggregator": self.aggregator_cert,
            "detector": self.detector_cert,
        }

    @property
    def readers(self) -> tuple[Certificate, ...]:
        """The certificates an update is sealed for (ingest, aggregator, detector); a
        ValueError names the ones the kit lacks."""
        missing = [READER_CERT_FILES[r] for r, c in self._readers().items() if c is None]
        if missing:
            raise ValueError(
                f"kit of {self.id!r} lacks {', '.join(missing)}: an update is sealed for ingest, "
                "the aggregator and the detector (`qflare provision` writes them)"
            )
        return tuple(c for c in self._readers().values() if c is not None)

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
        password = d / PASSWORD_FILE
        certs = {
            role: Certificate.from_bytes((d / name).read_bytes()) if (d / name).exists() else None
            for role, name in READER_CERT_FILES.items()
        }
        return cls(
            identity=Identity.load(d, passphrase),
            trust=load_trust(d),
            ingest_cert=certs["ingest"],
            broker_password=password.read_text().strip() if password.exists() else None,
            folder=d,
            aggregator_cert=certs["aggregator"],
            detector_cert=certs["detector"],
        )

    def broker_url(self, url: str) -> str:
        """``url`` with this client's credentials filled in when it names none
        (``amqp://host:5672/qflare`` -> ``amqp://<id>:<password>@host:5672/qflare``); each
        URL of a cluster's comma-separated list (:func:`qflare.bus.with_login`)."""
        return with_login(url, self.id, self.broker_password)

    def with_(self, **changes: Any) -> Kit:
        from dataclasses import replace

        return replace(self, **changes)
