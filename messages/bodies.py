"""One pydantic v2 body model per message kind, and which roles may send each kind.

Job and round travel in the signed envelope header only (``Envelope.job`` /
``Envelope.round``); bodies do not repeat them, so there is exactly one value to check and
no way for header and body to disagree. Digests are raw 32-byte SHA-256 values; times are
Unix seconds (float); tensors are ``numpy.ndarray`` (read-only views after decoding).

Models are strict (no coercion: ``"1"`` is not an int), frozen and ``extra="forbid"``.
"""

from __future__ import annotations

import enum
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

from qflare.messages.errors import MessageRejected, Reason
from qflare.messages.values import (
    Finite,
    Metrics,
    RoundConfig,
    check_metrics,
    finite,
    reason_of,
)

Digest = Annotated[bytes, Field(min_length=32, max_length=32)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


def _tensor(value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ValueError(f"expected a tensor, got {type(value).__name__}")
    return value


Tensor = Annotated[
    np.ndarray,
    PlainValidator(_tensor),
    WithJsonSchema({"type": "tensor", "description": "dtype, shape, raw LE bytes"}),
]
Tensors = dict[Name, Tensor]


class Body(BaseModel):
    """Base of every body: strict, frozen, unknown fields rejected."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        arbitrary_types_allowed=True,
        use_attribute_docstrings=True,
    )
    KIND: ClassVar[str]
    SENDERS: ClassVar[tuple[str, ...]]


class Part(BaseModel):
    """Base of nested records inside bodies."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True
    )


class TensorSpec(Part):
    """One tensor of the global model: the shape and dtype every update must match."""

    name: Name
    """Tensor name (a key of every update's `tensors`)."""
    dtype: Literal["float16", "float32", "float64"]
    """dtype every update must use for it."""
    shape: list[NonNegInt] = Field(max_length=8)
    """Exact shape every update must use for it."""


class UpdateRef(Part):
    """An update in a closed round: client, digest and where it sits in the update stream."""

    client: Id
    """Client id."""
    digest: Digest
    """The update's digest (`update.accepted.update_digest`)."""
    offset: NonNegInt
    """Its offset in the job's update stream (`update.accepted.offset`)."""


class Flagged(Part):
    """A client the detector flagged, its anomaly score and the detectors that fired."""

    client: Id
    """Client id."""
    score: float
    """Anomaly score (higher is more suspicious)."""
    reasons: list[Name]
    """Names of the detectors that flagged it."""


class Evaluation(Part):
    """A participant's evaluation of a global model on its own held-out data."""

    loss: Finite
    """Mean loss (a finite number)."""
    num_examples: int = Field(gt=0)
    """Held-out examples used (the weight of this evaluation)."""
    metrics: Metrics = Field(default_factory=dict)
    """Further metrics by name (at most 32, finite)."""

    @classmethod
    def of(cls, result: Any, what: str = "evaluate()") -> Evaluation:
        """What an evaluation function returned, Flower's shape ``(loss, num_examples,
        metrics)`` or ``(loss, num_examples)``, or an :class:`Evaluation`: TypeError for
        another shape, MessageRejected(BAD_METRICS) for a value out of bounds."""
        if isinstance(result, Evaluation):
            return result
        if not (isinstance(result, tuple) and len(result) in (2, 3)):
            raise TypeError(f"{what} must return (loss, num_examples, metrics), got {result!r:.80}")
        loss, count = result[0], result[1]
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise TypeError(f"{what}: num_examples must be an int >= 1, got {count!r:.40}")
        return cls(
            loss=finite(loss, f"{what} loss"),
            num_examples=int(count),
            metrics=check_metrics(result[2] if len(result) == 3 else {}, f"{what} metrics"),
        )


class Update(Body):
    """A client's model update for the round in the header, with what the client measured:
    its training metrics, and its evaluation of the round's global model (`base_version`)
    before it trained."""

    KIND = "update"
    SENDERS = ("client",)
    base_version: NonNegInt
    """Global model version the update was computed on."""
    num_samples: int = Field(gt=0)
    """Local training examples used (FedAvg weight)."""
    tensors: Tensors
    """The update (model delta) per tensor name; must match the round's `tensor_spec`."""
    metrics: Metrics = Field(default_factory=dict)
    """Training metrics by name (at most 32, finite; BAD_METRICS otherwise)."""
    evaluation: Evaluation | None = None
    """The client's evaluation of model `base_version` on its held-out data, if it ran one."""


class UpdateAccepted(Body):
    """Ingest's verdict on one message of the job's update stream: the update at ``offset``
    is valid for the round in the header. The bytes stay in the stream; the detector and
    the aggregator read them there and use them only if they hash to ``update_digest``."""

    KIND = "update.accepted"
    SENDERS = ("ingest",)
    client: Id
    """The client that sent the update."""
    update_digest: Digest
    """SHA-256 of the client's update body as received (its envelope ``body_digest``)."""
    base_version: NonNegInt
    """As in the client's update."""
    num_samples: int = Field(gt=0)
    """As in the client's update."""
    offset: NonNegInt
    """Where the update sits in the job's update stream (`updates.<job>`)."""


class UpdateRejected(Body):
    """Ingest refused an update (the reason is a :class:`Reason` code)."""

    KIND = "update.rejected"
    SENDERS = ("ingest",)
    client: str = Field(max_length=256)
    """The claimed sender (may be unauthenticated when the signature failed)."""
    reason: Reason = Field(strict=False)
    """Why (a reason code; on the wire its string value)."""
    detail: str = Field(default="", max_length=2048)
    """Human-readable detail for logs."""
    update_digest: Digest | None = None
    """The update's body digest when it was readable."""
    offset: NonNegInt | None = None
    """Where the refused message sits in the job's update stream."""


class RoundOpened(Body):
    """The aggregator opened a round: who may send what, until when."""

    KIND = "round.opened"
    SENDERS = ("aggregator",)
    model_version: NonNegInt
    """Version of the global model clients train on."""
    model_digest: Digest
    """SHA-256 of that model (as in `model.published`)."""
    participants: list[Id]
    """Clients selected for this round."""
    deadline: float
    """Unix seconds after which ingest refuses updates (ROUND_CLOSED)."""
    min_updates: int = Field(gt=0)
    """Updates needed to close at the deadline."""
    clip_norm: float = Field(gt=0)
    """L2 clip norm C of this round's updates (DP-FedAvg; adaptive clipping moves it)."""
    tensor_spec: list[TensorSpec]
    """Names, dtypes and shapes every update must have."""
    rule: Name
    """Robust aggregation rule by registry name, e.g. `nnm+multikrum(f=3)`."""
    model_offset: NonNegInt
    """Where `model_version` sits in the job's model stream (`models.<job>`)."""
    updates_from: NonNegInt
    """No update of this round sits before this offset of the job's update stream."""
    config: RoundConfig = Field(default_factory=dict)
    """The job's config for this round (e.g. learning rate, local epochs), which the
    participants' `train` and `evaluate` get as `round_info.config`: a JSON-like map of at
    most 4 levels, 256 values, 1024 characters per string and 16 KiB as JSON (TOO_LARGE;
    another type: BAD_SCHEMA)."""


class RoundClosed(Body):
    """The exact set of accepted updates the round is decided on."""

    KIND = "round.closed"
    SENDERS = ("aggregator",)
    updates: list[UpdateRef]
    """The accepted updates in the round."""
    malformed: NonNegInt = 0
    """Selected clients whose update ingest refused for its content (``MALFORMED_UPDATE``:
    non-finite, wrong shapes or dtype, bad metrics) and who have no accepted update: the
    detector assumes at most ``f`` minus this many Byzantine clients among ``updates``."""


class RoundVerdict(Body):
    """The detector's decision over exactly the updates of ``round.closed``."""

    KIND = "round.verdict"
    SENDERS = ("detector",)
    kept: list[Id]
    """Clients whose updates are aggregated."""
    flagged: list[Flagged]
    """Clients excluded, with scores and reasons."""
    note: str = Field(default="", max_length=2048)
    """Free text for operators."""


Coverage = Literal["clipped_sum", "filter_bounded", "noise_only"]
"""What a job's epsilon covers (docs/privacy.md): ``clipped_sum`` a DP guarantee (rule mean,
nothing filtered); ``filter_bounded`` a DP guarantee for a filter removing at most k updates
per round, charged at z/(2k+1) and q=1; ``noise_only`` the epsilon of the noise added, NOT a
DP guarantee (a data-dependent filter or robust rule ran before the noisy sum)."""


class PrivacyRequest(Body):
    """The aggregator asks to release one DP-FedAvg round: sampling rate q, noise multiplier
    z, clip norm, as charged (for ``filter_bounded`` these are q=1 and z/(2k+1), not the
    noise actually added), and what the resulting epsilon covers."""

    KIND = "privacy.request"
    SENDERS = ("aggregator",)
    q: float = Field(gt=0, le=1)
    """Client sampling rate."""
    z: float = Field(gt=0)
    """Noise multiplier (std = z * clip)."""
    clip: float = Field(gt=0)
    """L2 clip norm."""
    mechanism: Literal["gaussian"] = "gaussian"
    """Noise mechanism."""
    coverage: Coverage
    """What the epsilon covers: `clipped_sum`, `filter_bounded` or `noise_only` (not a DP guarantee)."""


class PrivacyGranted(Body):
    """The accountant charged the round; the totals after charging it."""

    KIND = "privacy.granted"
    SENDERS = ("accountant",)
    epsilon_round: NonNegFloat | None = None
    """Epsilon attributable to this round, when defined."""
    epsilon_total: NonNegFloat
    """Epsilon spent so far including this round."""
    delta: float = Field(gt=0, lt=1)
    """The delta the epsilons are for."""
    coverage: Coverage
    """The request's coverage, echoed: `noise_only` means the epsilon is not a DP guarantee."""


class PrivacyDenied(Body):
    """The accountant refused: releasing the round would exceed the budget."""

    KIND = "privacy.denied"
    SENDERS = ("accountant",)
    reason: Name
    """Why (e.g. `budget_exhausted`)."""
    epsilon_spent: NonNegFloat
    """Epsilon spent before this request."""
    budget: NonNegFloat
    """The job's epsilon budget."""
    coverage: Coverage
    """The request's coverage, echoed."""


class ModelPublished(Body):
    """A new global model version (tensors included when broadcast to clients)."""

    KIND = "model.published"
    SENDERS = ("aggregator",)
    version: NonNegInt
    """New global model version."""
    digest: Digest
    """SHA-256 of the model file (safetensors)."""
    epsilon: NonNegFloat
    """Total epsilon spent to produce it."""
    metrics: dict[Name, float] = Field(default_factory=dict)
    """Round metrics (e.g. updates kept)."""
    tensors: Tensors | None = None
    """The model's tensors: present in the job's model stream, absent on `qflare.events`."""


class MetricsEvaluated(Body):
    """Evaluation of a model version on held-out data: `central` (the job's `evaluate_fn`,
    or the simulator's test set) or `federated` (the participants' evaluations of the
    version, weighted by their example counts)."""

    KIND = "metrics.evaluated"
    SENDERS = ("aggregator", "operator")
    model_version: NonNegInt
    """Evaluated model version."""
    accuracy: float | None = Field(default=None, ge=0, le=1)
    """Accuracy on held-out data (the `accuracy` metric, when there is one in [0, 1])."""
    loss: float
    """Mean loss on held-out data."""
    num_examples: NonNegInt = 0
    """Held-out examples used."""
    metrics: Metrics = Field(default_factory=dict)
    """Further metrics by name (at most 32, finite)."""
    source: Literal["central", "federated"] = "central"
    """Who evaluated: the server side (`central`) or the round's participants (`federated`)."""
    clients: NonNegInt = 0
    """Participants whose evaluations are in it (`federated`)."""


class Severity(enum.IntEnum):
    """How urgent an alert is. Ordered so that escalation is ``max``; ``alert.raised``
    carries and ``qflare.alerts`` routing keys use the lower-case name (:attr:`label`).
    Alerting decides with it and the console shows it."""

    INFO = 10
    WARNING = 20
    CRITICAL = 40

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | int | Severity) -> Severity:
        if isinstance(value, Severity):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            raise ValueError(
                f"unknown severity {value!r}; expected one of {', '.join(s.label for s in cls)}"
            ) from None


class AlertRaised(Body):
    """Something an operator should see (rejected input, flagged client, denied budget)."""

    KIND = "alert.raised"
    SENDERS = ("ingest", "detector", "aggregator", "accountant", "alerting", "operator")
    severity: Literal["info", "warning", "critical"]
    """How urgent."""
    alert_kind: Name
    """What happened, e.g. `update_rejected`, `client_flagged`, `budget_denied`."""
    client: Id | None = None
    """The client concerned, if any."""
    reason: Name
    """A reason code or short cause."""
    detail: str = Field(default="", max_length=4096)
    """Human-readable detail."""


class JobEnded(Body):
    """The job stopped (completed, budget exhausted, operator)."""

    KIND = "job.ended"
    SENDERS = ("aggregator", "operator")
    reason: Name
    """Why, e.g. `completed`, `budget_exhausted`, `operator`."""
    detail: str = Field(default="", max_length=4096)
    """Human-readable detail."""
    model_version: NonNegInt | None = None
    """The final model's version, when the job has one."""
    model_digest: Digest | None = None
    """Its SHA-256 (as in `model.published`)."""
    model_offset: NonNegInt | None = None
    """Where it sits in the job's model stream."""


class TensorShape(Part):
    """One tensor of an update sent in parts: its name and shape (values float32, C order)."""

    name: Name
    """Tensor name."""
    shape: list[NonNegInt] = Field(max_length=8)
    """Its shape."""


class UpdateManifest(Body):
    """Announces an update sent in parts (see :mod:`qflare.messages.parts`): what an
    `update` carries besides its tensors, the tensors' layout, and the signed body digest of
    every `update.part` that follows, in order. The tensors' values, flattened in this order
    (sorted names, C order) into one float32 vector, travel `part_values` at a time."""

    KIND = "update.manifest"
    SENDERS = ("client",)
    base_version: NonNegInt
    """Global model version the update was computed on."""
    num_samples: int = Field(gt=0)
    """Local training examples used (FedAvg weight)."""
    metrics: Metrics = Field(default_factory=dict)
    """Training metrics by name (at most 32, finite; BAD_METRICS otherwise)."""
    evaluation: Evaluation | None = None
    """The client's evaluation of model `base_version` on its held-out data, if it ran one."""
    transfer: bytes = Field(min_length=16, max_length=16)
    """Random transfer id (per sender), repeated in each part."""
    tensors: list[TensorShape] = Field(min_length=1)
    """Name and shape of each tensor, names sorted and unique (the flat vector's order)."""
    dtype: Literal["float32"] = "float32"
    """dtype of the values in every part."""
    part_values: int = Field(gt=0)
    """Values per part (the last part may hold fewer)."""
    part_digests: list[Digest] = Field(min_length=1)
    """The `body_digest` of each part's envelope, in order: ceil(values / `part_values`)."""


class UpdatePart(Body):
    """Values `index * part_values` up to `(index + 1) * part_values` (or the end) of an
    update announced by an `update.manifest` of the same sender, job and round."""

    KIND = "update.part"
    SENDERS = ("client",)
    transfer: bytes = Field(min_length=16, max_length=16)
    """Transfer id from the manifest."""
    index: NonNegInt
    """Position of this part (0-based)."""
    values: Tensor
    """The part's values: a one-dimensional float32 tensor."""


class ModelManifest(Body):
    """Announces a model version sent in parts into the job's model stream (a model too large
    for one `model.published`; see :mod:`qflare.messages.parts`): what `model.published`
    carries besides its tensors, the tensors' layout, and the signed body digest of every
    `model.part` that follows, in order. The tensors' little-endian C-order bytes, one tensor
    after another by sorted name, travel `part_bytes` at a time."""

    KIND = "model.manifest"
    SENDERS = ("aggregator",)
    version: NonNegInt
    """Global model version."""
    digest: Digest
    """The model's digest (`model_digest`: what `round.opened` names), checked once every
    part is in."""
    epsilon: NonNegFloat
    """Total epsilon spent to produce it."""
    transfer: bytes = Field(min_length=16, max_length=16)
    """Random transfer id, repeated in each part."""
    tensors: list[TensorSpec] = Field(min_length=1)
    """Name, dtype and shape of each tensor, names sorted and unique (the bytes' order)."""
    part_bytes: int = Field(gt=0)
    """Bytes per part (the last part may hold fewer)."""
    part_digests: list[Digest] = Field(min_length=1)
    """The `body_digest` of each part's envelope, in order: ceil(bytes / `part_bytes`)."""


class ModelPart(Body):
    """Bytes `index * part_bytes` up to `(index + 1) * part_bytes` (or the end) of a model
    announced by a `model.manifest`."""

    KIND = "model.part"
    SENDERS = ("aggregator",)
    transfer: bytes = Field(min_length=16, max_length=16)
    """Transfer id from the manifest."""
    index: NonNegInt
    """Position of this part (0-based)."""
    data: Tensor
    """The part's bytes: a one-dimensional uint8 tensor."""


BODY_TYPES: dict[str, type[Body]] = {
    cls.KIND: cls
    for cls in (
        Update,
        UpdateAccepted,
        UpdateRejected,
        RoundOpened,
        RoundClosed,
        RoundVerdict,
        PrivacyRequest,
        PrivacyGranted,
        PrivacyDenied,
        ModelPublished,
        MetricsEvaluated,
        AlertRaised,
        JobEnded,
        UpdateManifest,
        UpdatePart,
        ModelManifest,
        ModelPart,
    )
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
    """Validate a decoded body against its kind's model; failures are BAD_SCHEMA, or the
    code a bounded value's check gives (BAD_METRICS, TOO_LARGE: :mod:`qflare.messages.values`)."""
    cls = BODY_TYPES.get(kind)
    if cls is None:
        raise MessageRejected(Reason.UNKNOWN_KIND, f"unknown kind {kind[:64]!r}")
    if not isinstance(obj, dict):
        raise MessageRejected(Reason.BAD_SCHEMA, f"{kind} body must be a map")
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[:3]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in first)
        reason = reason_of(errors) or Reason.BAD_SCHEMA
        raise MessageRejected(reason, f"{kind}: {detail}") from None


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
