"""The console's own event model: small typed facts the screen is built from.

The operator console never renders wire envelopes directly. An adapter
(:mod:`qflare.tui.adapter`) turns each verified envelope from ``qflare.events`` /
``qflare.alerts`` into one of these frozen dataclasses, and the history loader
(:mod:`qflare.tui.history`) turns stored rows into the same ones, so the state model
(:mod:`qflare.tui.state`) and its tests need neither a broker nor the codec.

Times are Unix seconds (float), taken from the signed envelope header (``ts``), so what the
screen shows does not depend on when the console happened to receive a message.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

# One severity scale for the whole system: the alerting service's (a pure module).
from qflare.messages.bodies import Severity


class Link(enum.Enum):
    """The console's connection to the broker, as shown in the header."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """Common header: the job and round the fact belongs to, and when it happened."""

    job: str
    round: int
    ts: float


@dataclass(frozen=True, slots=True)
class JobDeclared(FeedEvent):
    """What the console knows of a job before its messages say it (the epsilon budget is
    in the job spec, not in any round message)."""

    epsilon_budget: float | None = None
    rounds: int | None = None


@dataclass(frozen=True, slots=True)
class RoundOpened(FeedEvent):
    participants: tuple[str, ...] = ()
    deadline: float = 0.0
    min_updates: int = 1
    rule: str = ""
    model_version: int = 0


@dataclass(frozen=True, slots=True)
class UpdateAccepted(FeedEvent):
    client: str = ""


@dataclass(frozen=True, slots=True)
class UpdateRejected(FeedEvent):
    client: str = ""
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RoundClosed(FeedEvent):
    clients: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FlaggedClient:
    client: str
    score: float
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RoundVerdict(FeedEvent):
    kept: tuple[str, ...] = ()
    flagged: tuple[FlaggedClient, ...] = ()


@dataclass(frozen=True, slots=True)
class PrivacyGranted(FeedEvent):
    epsilon_round: float | None = None
    epsilon_total: float = 0.0
    delta: float = 0.0
    coverage: str | None = None  # clipped_sum | filter_bounded | noise_only (docs/privacy.md)


@dataclass(frozen=True, slots=True)
class PrivacyDenied(FeedEvent):
    reason: str = ""
    epsilon_spent: float = 0.0
    budget: float = 0.0
    coverage: str | None = None


@dataclass(frozen=True, slots=True)
class ModelPublished(FeedEvent):
    version: int = 0
    epsilon: float = 0.0
    train: Mapping[str, float] = field(default_factory=dict)
    """The round's training metrics, weighted by samples (``model.published`` metrics
    ``train/<name>``)."""


@dataclass(frozen=True, slots=True)
class MetricsEvaluated(FeedEvent):
    """An evaluation of ``model_version``: ``central`` (the job's evaluate_fn, the
    simulator's test set) or ``federated`` (the round's participants, weighted)."""

    model_version: int = 0
    accuracy: float | None = 0.0
    loss: float = 0.0
    source: str = "central"
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AlertRaised(FeedEvent):
    severity: Severity = Severity.WARNING
    kind: str = ""
    reason: str = ""
    client: str | None = None
    detail: str = ""
    source: str = ""
    key: str = field(default="", compare=False)
    """Identity of the message it came from (sender + nonce), so a redelivered alert or
    one read both from history and from the live feed is shown once."""


@dataclass(frozen=True, slots=True)
class JobEnded(FeedEvent):
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RoundSnapshot(FeedEvent):
    """A round as a service stored it (history on start): no per-message times, so no
    latency. ``state`` uses the console's round states."""

    state: str = "open"
    participants: tuple[str, ...] = ()
    received: tuple[str, ...] = ()
    kept: tuple[str, ...] | None = None
    flagged: tuple[str, ...] = ()
    deadline: float | None = None
    rule: str = ""
    epsilon_total: float | None = None
    model_version: int | None = None
    train: Mapping[str, float] = field(default_factory=dict)
    """The round's weighted training metrics, as stored with it."""


@dataclass(frozen=True, slots=True)
class LinkChanged:
    """The broker link went up or down (not tied to a job)."""

    link: Link
    ts: float
    detail: str = ""


Event = FeedEvent | LinkChanged
