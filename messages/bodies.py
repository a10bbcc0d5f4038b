"""One pydantic v2 body model per message kind, and which roles may send each kind.

Job and round travel in the signed envelope header only (``Envelope.job`` /
``Envelope.round``); bodies do not repeat them, so there is exactly one value to check and
no way for header and body to disagree. Digests are raw 32-byte SHA-256 values; times are
Unix seconds (float); tensors are ``numpy.ndarray`` (read-only views after decoding).

Models are strict (no coercion: ``"1"`` is not an int), frozen and ``extra="forbid"``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
)

from qflare.crypto.errors import MessageRejected, Reason

Digest = Annotated[bytes, Field(min_length=32, max_length=32)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


def _tensor(value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ValueError(f"expected a tensor, got {type(value).__name__}")
    return value


Tensor = Annotated[np.ndarray, PlainValidator(_tensor),
                   WithJsonSchema({"type": "tensor", "description": "dtype, shape, raw LE bytes"})]
Tensors = dict[Name, Tensor]


class Body(BaseModel):
    """Base of every body: strict, frozen, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True,
                              arbitrary_types_allowed=True)
    KIND: ClassVar[str]
    SENDERS: ClassVar[tuple[str, ...]]


class Part(BaseModel):
    """Base of nested records inside bodies."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TensorSpec(Part):
    """One tensor of the global model: the shape and dtype every update must match."""

    name: Name
    dtype: Literal["float16", "float32", "float64"]
    shape: list[NonNegInt] = Field(max_length=8)


class UpdateRef(Part):
    """An update in a closed round, by client and the digest ingest assigned to it."""

    client: Id
    digest: Digest


class Flagged(Part):
    """A client the detector flagged, its anomaly score and the detectors that fired."""

    client: Id
    score: float
    reasons: list[Name]


class Update(Body):
    """A client's model update for the round in the header."""

    KIND = "update"
    SENDERS = ("client",)
    base_version: NonNegInt
    num_samples: int = Field(gt=0)
    tensors: Tensors


class UpdateAccepted(Body):
    """Ingest validated an update and re-signs it for the stateful services."""

    KIND = "update.accepted"
    SENDERS = ("ingest",)
    client: Id
    update_digest: Digest
    """SHA-256 of the client's update body as received (its envelope ``body_digest``)."""
    base_version: NonNegInt
    num_samples: int = Field(gt=0)
    tensors: Tensors


class UpdateRejected(Body):
    """Ingest refused an update (the reason is a :class:`Reason` code)."""

    KIND = "update.rejected"
    SENDERS = ("ingest",)
    client: str = Field(max_length=256)
    reason: Reason
    detail: str = Field(default="", max_length=2048)
    update_digest: Digest | None = None


class RoundOpened(Body):
    """The aggregator opened a round: who may send what, until when."""

    KIND = "round.opened"
    SENDERS = ("aggregator",)
    model_version: NonNegInt
    model_digest: Digest
    participants: list[Id]
    deadline: float
    """Unix seconds after which ingest refuses updates (ROUND_CLOSED)."""
    min_updates: int = Field(gt=0)
    clip_norm: float = Field(gt=0)
    tensor_spec: list[TensorSpec]
    rule: Name


class RoundClosed(Body):
    """The exact set of accepted updates the round is decided on."""

    KIND = "round.closed"
    SENDERS = ("aggregator",)
    updates: list[UpdateRef]


class RoundVerdict(Body):
    """The detector's decision over exactly the updates of ``round.closed``."""

    KIND = "round.verdict"
    SENDERS = ("detector",)
    kept: list[Id]
    flagged: list[Flagged]
    note: str = Field(default="", max_length=2048)


class PrivacyRequest(Body):
    """The aggregator asks to release one DP-FedAvg round: sampling rate q, noise multiplier
    z, clip norm."""

    KIND = "privacy.request"
    SENDERS = ("aggregator",)
    q: float = Field(gt=0, le=1)
    z: float = Field(gt=0)
    clip: float = Field(gt=0)
    mechanism: Literal["gaussian"] = "gaussian"


class PrivacyGranted(Body):
    """The accountant charged the round; the totals after charging it."""

    KIND = "privacy.granted"
    SENDERS = ("accountant",)
    epsilon_round: NonNegFloat | None = None
    epsilon_total: NonNegFloat
    delta: float = Field(gt=0, lt=1)


class PrivacyDenied(Body):
    """The accountant refused: releasing the round would exceed the budget."""

    KIND = "privacy.denied"
    SENDERS = ("accountant",)
    reason: Name
    epsilon_spent: NonNegFloat
    budget: NonNegFloat


class ModelPublished(Body):
    """A new global model version (tensors included when broadcast to clients)."""

    KIND = "model.published"
    SENDERS = ("aggregator",)
    version: NonNegInt
    digest: Digest
    epsilon: NonNegFloat
    metrics: dict[Name, float] = Field(default_factory=dict)
    tensors: Tensors | None = None


class MetricsEvaluated(Body):
    """Evaluation of a model version on held-out data."""

    KIND = "metrics.evaluated"
    SENDERS = ("aggregator", "operator")
    model_version: NonNegInt
    accuracy: float = Field(ge=0, le=1)
    loss: float
    num_examples: NonNegInt = 0
    metrics: dict[Name, float] = Field(default_factory=dict)


class AlertRaised(Body):
    """Something an operator should see (rejected input, flagged client, denied budget)."""

    KIND = "alert.raised"
    SENDERS = ("ingest", "detector", "aggregator", "accountant", "alerting", "operator")
    severity: Literal["info", "warning", "critical"]
    alert_kind: Name
    client: Id | None = None
    reason: Name
    detail: str = Field(default="", max_length=4096)


class JobEnded(Body):
    """The job stopped (completed, budget exhausted, operator)."""

    KIND = "job.ended"
    SENDERS = ("aggregator", "operator")
    reason: Name
    detail: str = Field(default="", max_length=4096)


class Chunk(Body):
    """One slice of a large envelope (see :mod:`qflare.messages.chunks`)."""

    KIND = "chunk"
    SENDERS = ("client", "ingest", "detector", "aggregator", "accountant", "alerting",
               "operator")
    transfer: bytes = Field(min_length=16, max_length=16)
    index: NonNegInt
    data: bytes


class ChunkManifest(Body):
    """Announces a chunked envelope: its size, digest, and the digest of every chunk."""

    KIND = "chunk.manifest"
    SENDERS = Chunk.SENDERS
    transfer: bytes = Field(min_length=16, max_length=16)
    inner_kind: Name
    total_size: int = Field(gt=0)
    chunk_size: int = Field(gt=0)
    chunk_digests: list[Digest] = Field(min_length=1)
    envelope_digest: Digest


BODY_TYPES: dict[str, type[Body]] = {
    cls.KIND: cls
    for cls in (Update, UpdateAccepted, UpdateRejected, RoundOpened, RoundClosed,
                RoundVerdict, PrivacyRequest, PrivacyGranted, PrivacyDenied, ModelPublished,
                MetricsEvaluated, AlertRaised, JobEnded, Chunk, ChunkManifest)
}
KINDS: tuple[str, ...] = tuple(BODY_TYPES)


def body_to_wire(body: Body) -> dict[str, Any]:
    """The body as plain msgpack-able values (tensors stay arrays, no copies)."""
    return {name: _wire(getattr(body, name)) for name in type(body).model_fields}


def _wire(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {name: _wire(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, Reason):
        return value.value
    if isinstance(value, list):
        return [_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _wire(v) for k, v in value.items()}
    return value


def body_from_wire(kind: str, obj: Any) -> Body:
    """Validate a decoded body against its kind's model; failures are BAD_SCHEMA."""
    cls = BODY_TYPES.get(kind)
    if cls is None:
        raise MessageRejected(Reason.UNKNOWN_KIND, f"unknown kind {kind[:64]!r}")
    if not isinstance(obj, dict):
        raise MessageRejected(Reason.BAD_SCHEMA, f"{kind} body must be a map")
    if kind == "update.rejected" and isinstance(obj.get("reason"), str):
        # StrEnum fields are strict about the enum type; a known code string is the wire form.
        try:
            obj = {**obj, "reason": Reason(obj["reason"])}
        except ValueError:
            pass
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[:3]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in first)
        raise MessageRejected(Reason.BAD_SCHEMA, f"{kind}: {detail}") from None


def make_body(kind: str, body: Body | dict[str, Any]) -> Body:
    """``body`` as the model of ``kind`` (validating a plain dict)."""
    cls = BODY_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    if isinstance(body, cls):
        return body
    if isinstance(body, Body):
        raise TypeError(f"a {type(body).__name__} body cannot be sent as {kind!r}")
    return cls.model_validate(body)
