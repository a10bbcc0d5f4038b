"""qflare.messages: the wire contract.

Signed envelopes (ML-DSA-65 over the header, SHA-256 binding the body), one strict pydantic
body per kind, tensors as a msgpack ext type decoded zero-copy, limits checked before
allocation, and typed errors with stable reason codes (:class:`Reason`).
"""

from qflare.errors import QflareError
from qflare.messages.bodies import (
    BODY_TYPES,
    KINDS,
    AlertRaised,
    Body,
    Flagged,
    JobEnded,
    MetricsEvaluated,
    ModelManifest,
    ModelPart,
    ModelPublished,
    PrivacyDenied,
    PrivacyGranted,
    PrivacyRequest,
    RoundClosed,
    RoundOpened,
    RoundVerdict,
    Severity,
    TensorSpec,
    Update,
    UpdateAccepted,
    UpdateManifest,
    UpdatePart,
    UpdateRef,
    UpdateRejected,
)
from qflare.messages.codec import packb, unpack
from qflare.messages.envelope import (
    Envelope,
    encode,
    open_envelope,
    peek_kind,
)
from qflare.messages.errors import MessageRejected, Reason
from qflare.messages.limits import ALLOWED_DTYPES, DEFAULT_LIMITS, Limits
from qflare.messages.parts import DEFAULT_PART_BYTES
from qflare.messages.validate import validate_update

__all__ = [
    "ALLOWED_DTYPES",
    "BODY_TYPES",
    "DEFAULT_LIMITS",
    "DEFAULT_PART_BYTES",
    "KINDS",
    "AlertRaised",
    "Body",
    "Envelope",
    "Flagged",
    "JobEnded",
    "Limits",
    "MessageRejected",
    "MetricsEvaluated",
    "ModelManifest",
    "ModelPart",
    "ModelPublished",
    "PrivacyDenied",
    "PrivacyGranted",
    "PrivacyRequest",
    "QflareError",
    "Reason",
    "RoundClosed",
    "RoundOpened",
    "RoundVerdict",
    "Severity",
    "TensorSpec",
    "Update",
    "UpdateAccepted",
    "UpdateManifest",
    "UpdatePart",
    "UpdateRef",
    "UpdateRejected",
    "encode",
    "open_envelope",
    "packb",
    "peek_kind",
    "unpack",
    "validate_update",
]
