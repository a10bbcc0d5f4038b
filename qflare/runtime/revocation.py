"""A service's revocation list file, re-read when it changes.

``qflare revoke`` (:func:`qflare.crypto.provision.revoke`) rewrites ``crl.qrl`` in every
identity folder; a service that watches its copy adopts the new list into its trust store on
the next check, without a restart. Ingest checks before each update it judges (a revoked
certificate's update is refused REVOKED); the aggregator on each tick of its clock, and
leaves the list's ``holders`` out of the rounds it selects and waits for
(docs/architecture.md, "Revocation").
"""

from __future__ import annotations

import logging
from pathlib import Path

from qflare.crypto.errors import TrustRejected
from qflare.crypto.pki import RevocationList, TrustStore
from qflare.runtime.logging import event


class RevocationWatch:
    """The revocation list at ``path`` (None: no file to watch), adopted into ``trust``."""

    def __init__(self, path: Path | None, trust: TrustStore, log: logging.Logger) -> None:
        self.path = path
        self.trust = trust
        self.log = log
        self._stamp: tuple[int, int] | None = None

    def reload(self) -> bool:
        """Adopt the file's list if the file changed; True when a newer one was adopted. A
        half-written or foreign file is ignored until it is whole and CA-signed."""
        if self.path is None:
            return False
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        try:
            crl = RevocationList.from_bytes(self.path.read_bytes())
            adopted = self.trust.update_crl(crl)
        except (TrustRejected, OSError, ValueError) as exc:
            event(self.log, "crl.unreadable", path=str(self.path), error=repr(exc))
            return False
        self._stamp = stamp
        if adopted:
            event(self.log, "crl.reloaded", number=crl.number, revoked=len(crl.serials))
        return adopted

    @property
    def holders(self) -> frozenset[str]:
        """The ids whose certificates the adopted list revokes."""
        crl = self.trust.crl
        return frozenset() if crl is None else crl.holders
