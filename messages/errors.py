"""The rejection vocabulary: stable :class:`Reason` codes and :class:`MessageRejected`.

Every part of QFLARE that refuses input (the codec, envelopes, ingest, the services, the
client SDK) raises :class:`MessageRejected` with one of these codes; a consumer catches one
type and routes on the code. The cryptographic layer raises its own
:class:`qflare.crypto.errors.TrustRejected` (certificates, revocation lists, sealed bodies),
carrying a code of this enum's values; :meth:`MessageRejected.of` turns it into a rejection
where a message is being opened. docs/CONTRACTS.md lists where each shared word lives.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from qflare.errors import QflareError

if TYPE_CHECKING:
    from qflare.crypto.errors import TrustRejected


class Reason(StrEnum):
    """Stable reason codes for rejected input. Values never change meaning once released;
    each member's ``doc`` says when it is used (rendered into docs/messages.md)."""

    doc: str

    def __new__(cls, value: str, doc: str = "") -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.doc = doc
        return member

    MALFORMED = (
        "MALFORMED",
        "Bytes are not a well-formed envelope/body: garbled or truncated msgpack, a "
        "declared length larger than the data, wrong field types, trailing bytes.",
    )
    TOO_LARGE = (
        "TOO_LARGE",
        "A size limit was exceeded: envelope bytes, string/bytes length, container "
        "length, tensor count, ndim or element count.",
    )
    TOO_DEEP = (
        "TOO_DEEP",
        "Containers nested deeper than the limit (nesting bomb).",
    )
    UNSUPPORTED_VERSION = (
        "UNSUPPORTED_VERSION",
        "Envelope or certificate version this build does not speak.",
    )
    UNKNOWN_KIND = (
        "UNKNOWN_KIND",
        "The envelope's kind is not one of the registered kinds.",
    )
    BAD_SCHEMA = (
        "BAD_SCHEMA",
        "The body does not match its kind's schema (missing/unknown field, wrong type/range).",
    )
    BAD_DIGEST = (
        "BAD_DIGEST",
        "The body does not hash to the signed ``body_digest`` (or a part to its manifest entry).",
    )
    BAD_SIGNATURE = (
        "BAD_SIGNATURE",
        "The ML-DSA-65 signature does not verify, including a signature made for "
        "another kind (the context string ``qflare/v1/<kind>`` differs).",
    )
    UNKNOWN_SIGNER = (
        "UNKNOWN_SIGNER",
        "The sender's certificate is unreadable or not issued by the trusted CA.",
    )
    EXPIRED = (
        "EXPIRED",
        "The sender's certificate is past its expiry.",
    )
    NOT_YET_VALID = (
        "NOT_YET_VALID",
        "The sender's certificate is not valid yet.",
    )
    REVOKED = (
        "REVOKED",
        "The sender's certificate is on the revocation list.",
    )
    SENDER_MISMATCH = (
        "SENDER_MISMATCH",
        "The envelope's ``sender`` is not the id in its certificate.",
    )
    ROLE_NOT_ALLOWED = (
        "ROLE_NOT_ALLOWED",
        "The certificate's role may not send this kind (e.g. a client publishing a model).",
    )
    CLOCK_SKEW = (
        "CLOCK_SKEW",
        "The envelope's timestamp is too far in the future.",
    )
    WRONG_KIND = (
        "WRONG_KIND",
        "A valid envelope of another kind than the caller expected.",
    )
    WRONG_JOB = (
        "WRONG_JOB",
        "A valid envelope for another job than the caller expected.",
    )
    STALE_ROUND = (
        "STALE_ROUND",
        "A valid envelope for another round than the open one.",
    )
    STALE_BASE = (
        "STALE_BASE",
        "An update computed on another model version than the round's. Not the client's "
        "answer to the round: the aggregator waits for its real update.",
    )
    NOT_PARTICIPANT = (
        "NOT_PARTICIPANT",
        "The sender was not selected for this round.",
    )
    ROUND_CLOSED = (
        "ROUND_CLOSED",
        "The round no longer accepts updates (closed or past its deadline).",
    )
    DUPLICATE = (
        "DUPLICATE",
        "Already seen (same natural key: job, round, client / digest / part index).",
    )
    DTYPE_NOT_ALLOWED = (
        "DTYPE_NOT_ALLOWED",
        "A tensor dtype outside the whitelist, or not the one the round expects.",
    )
    SHAPE_MISMATCH = (
        "SHAPE_MISMATCH",
        "Tensor names or shapes differ from the round's tensor spec, or a tensor's "
        "declared shape does not match its data.",
    )
    NON_FINITE = (
        "NON_FINITE",
        "A tensor contains NaN or +/-Inf.",
    )
    UNSEAL_FAILED = (
        "UNSEAL_FAILED",
        "A sealed body could not be opened (wrong recipient key, tampered ciphertext or header).",
    )
    CHUNK_MISMATCH = (
        "CHUNK_MISMATCH",
        "A part does not fit its manifest: unknown transfer, index out of range or out of "
        "order, wrong size, or the transfer is incomplete.",
    )
    BAD_METRICS = (
        "BAD_METRICS",
        "Metrics (an update's training metrics, an evaluation's metrics or loss) outside "
        "their bounds: more than 32 names, a name that is not 1-64 characters of letters, "
        "digits and ``_.:/-``, or a value that is not a finite number.",
    )


#: Refusals that show a participant's own update was unusable: ingest verified the
#: signature, then found the content wrong. A round's clients refused for these (and
#: without an accepted update) are counted in ``round.closed.malformed``: if at most f
#: participants per round are Byzantine, at most f minus that many remain among the
#: accepted updates, and detection assumes no more (:func:`qflare.robust.detect`).
MALFORMED_UPDATE = frozenset(
    {Reason.NON_FINITE, Reason.SHAPE_MISMATCH, Reason.DTYPE_NOT_ALLOWED, Reason.BAD_METRICS}
)


class MessageRejected(QflareError):
    """Bad input: the message is refused with a stable :class:`Reason` and a human detail.

    Consumers reject such a message without requeue (it goes to the dead-letter exchange)
    and keep serving; the detail is for logs and alerts, the reason for routing and metrics.
    """

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason = Reason(reason)
        self.detail = detail
        super().__init__(f"{self.reason.value}: {detail}" if detail else self.reason.value)

    def __reduce__(self) -> tuple[type, tuple[Reason, str]]:
        return (type(self), (self.reason, self.detail))

    @classmethod
    def of(cls, exc: TrustRejected) -> MessageRejected:
        """The rejection for a failed cryptographic check (same code, same detail)."""
        return cls(Reason(exc.code), exc.detail)


class SignedBodyRejected(MessageRejected):
    """A refused message whose signature and body digest verified: its signer sent exactly
    these bytes (a body that does not unseal, decode or fit its schema), so the refusal may
    name the signer, its job and round. A failure before that point (a bad signature, a body
    that does not hash to the signed digest) names no one: anyone can claim a sender or pair
    a signed header with other bytes."""

    def __init__(
        self, cause: MessageRejected, *, sender: str, job: str, round: int, body_digest: bytes
    ) -> None:
        super().__init__(cause.reason, cause.detail)
        self.sender, self.job, self.round, self.body_digest = sender, job, round, body_digest

    def __reduce__(self) -> tuple[type, tuple[Reason, str]]:
        return (MessageRejected, (self.reason, self.detail))
