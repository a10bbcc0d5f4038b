"""The errors of :mod:`qflare.crypto`: cryptographic failures only.

:class:`TrustRejected` is what a failed check of untrusted bytes raises (a certificate or
revocation list that is malformed, unsigned by the CA, expired, not yet valid or revoked; a
sealed body that does not open). Its ``code`` is one of the reason codes of
:class:`qflare.messages.errors.Reason`; where a message is opened it becomes a
``MessageRejected`` with that code (``MessageRejected.of``).
"""

from __future__ import annotations

from typing import Literal

from qflare.errors import QflareError

TrustCode = Literal[
    "MALFORMED",
    "TOO_LARGE",
    "UNSUPPORTED_VERSION",
    "BAD_SIGNATURE",
    "UNKNOWN_SIGNER",
    "EXPIRED",
    "NOT_YET_VALID",
    "REVOKED",
    "UNSEAL_FAILED",
]


class TrustRejected(QflareError):
    """Untrusted bytes failed a cryptographic check; ``code`` says which (stable)."""

    def __init__(self, code: TrustCode, detail: str = "") -> None:
        self.code: TrustCode = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.code, self.detail))


class CryptoUnavailable(QflareError, RuntimeError):
    """A requested crypto backend or algorithm is not available on this machine."""
