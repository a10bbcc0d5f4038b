"""A federated job as configured: who takes part, how rounds are run, filtered and noised.

A :class:`JobSpec` is read from the ``[[jobs]]`` tables of the configuration file (TOML)
for ``qflare serve aggregator``/``qflare up``, or built in code and submitted in-process
(``qflare simulate``). It is validated once, here, so every service can trust its fields. Privacy: what a
job's rounds are charged and what its epsilon covers is decided from the spec by
:func:`qflare.privacy.policy.privacy_charge`.

The privacy fields follow DP-FedAvg (McMahan et al., "Learning Differentially Private
Recurrent Language Models", ICLR 2018): each round samples clients by Poisson sampling at
rate ``q``, clips each update to L2 norm ``clip``, and adds Gaussian noise of standard
deviation ``noise_multiplier * clip`` to the sum. The accountant refuses a round that would
push the job's epsilon (at ``delta``) past ``epsilon_budget``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qflare.messages.errors import MessageRejected
from qflare.messages.values import check_round_config

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_WORD = r"[A-Za-z_][A-Za-z0-9_]*"
_REFERENCE = re.compile(rf"^{_WORD}(?:\.{_WORD})*:{_WORD}(?:\.{_WORD})*$")


def check_reference(value: str, what: str) -> str:
    """A ``module:function`` reference, by its form (it is imported where the job is
    accepted: :mod:`qflare.services.aggregator.hooks`)."""
    if not isinstance(value, str) or not _REFERENCE.match(value):
        raise ValueError(
            f"{what} must be a module:function reference (e.g. mypkg.evaluation:evaluate), "
            f"got {value!r:.80}"
        )
    return value


def check_id(value: str, what: str) -> str:
    """Job and client ids travel as routing-key words: letters, digits, ``_`` and ``-``."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(
            f"{what} must be 1-64 characters of letters, digits, '_' or '-' "
            f"(it is a routing-key word), got {value!r}"
        )
    return value


class JobSettings(BaseModel):
    """How a job's rounds run, are filtered and noised: what a job spec and a simulation
    share (``qflare.sim.config.SimConfig`` is built on it). Checked here, once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(
        ge=1, le=100_000, description="rounds to run unless the budget ends it first"
    )
    rule: str = Field(default="mean", description="robust rule spec for qflare.robust.get_rule")
    detection: bool = Field(default=True, description="run the detector; off keeps every update")
    sample_rate: float = Field(default=1.0, gt=0.0, le=1.0, description="Poisson rate q")
    noise_multiplier: float = Field(
        default=1.0,
        ge=0.0,
        allow_inf_nan=False,
        description="z: noise std = z * clip; 0 turns DP off (no accountant, epsilon inf)",
    )
    clip: float = Field(
        default=1.0, gt=0.0, allow_inf_nan=False, description="L2 clip norm C per update"
    )
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    epsilon_budget: float = Field(default=10.0, gt=0.0)
    dp_filter_bound: int | None = Field(
        default=None,
        ge=0,
        strict=True,
        description="k: detection removes at most k updates per round (the k highest-scored "
        "flagged) and rounds are charged at z/(2k+1), q=1; None: no bound, the "
        "epsilon of a filtering job is not a DP guarantee",
    )
    server_lr: float = Field(default=1.0, gt=0.0, description="step applied to the noised mean")
    adaptive_clip: bool = Field(
        default=False,
        strict=True,
        description="adaptive clipping (Andrew et al. 2021): clip is round 1's clip norm, each "
        "round's aggregation moves it towards the clip_target_quantile of the update norms "
        "for the next round; with DP on the update sum's noise multiplier is raised so that "
        "the round, count included, still costs noise_multiplier (docs/privacy.md)",
    )
    clip_target_quantile: float = Field(
        default=0.5,
        gt=0.0,
        lt=1.0,
        description="adaptive clipping: the fraction of updates the clip norm should leave "
        "unclipped",
    )
    clip_learning_rate: float = Field(
        default=0.2,
        gt=0.0,
        allow_inf_nan=False,
        description="adaptive clipping: C <- C * exp(-rate * (unclipped fraction - target))",
    )
    clip_count_noise_std: float | None = Field(
        default=None,
        gt=0.0,
        allow_inf_nan=False,
        description="adaptive clipping with DP on: std sigma_b of the noise on the count of "
        "unclipped updates; None: the paper's expected clients per round / 20. Needs "
        "2 * sigma_b > noise_multiplier",
    )
    seed: int = Field(default=0, ge=0, lt=2**63, description="secret job seed: selection and noise")
    output_layer: tuple[str, str] | None = Field(
        default=None,
        description="the model's output layer as (weight tensor name, bias tensor name), "
        "shapes [classes, hidden] and [classes]: detection then scores each client's label "
        "consistency from it (label flipping, qflare.robust.detection.label_consistency); "
        "None: that score is off",
    )

    @field_validator("output_layer")
    @classmethod
    def _output_layer(cls, v: tuple[str, str] | None) -> tuple[str, str] | None:
        if v is None:
            return v
        weight, bias = v
        if not weight or not bias or weight == bias:
            raise ValueError(
                "output_layer must name two different tensors (weight, bias), "
                f"e.g. ['fc.weight', 'fc.bias'], got {list(v)!r}"
            )
        return v


class JobSpec(JobSettings):
    """Everything the services need to run one job. Immutable once submitted."""

    job_id: str
    participants: tuple[str, ...] = Field(min_length=1, description="enrolled client ids")
    f: int = Field(default=0, ge=0, description="Byzantine clients tolerated per round")
    min_updates: int = Field(default=1, ge=1, description="fewest updates a round closes with")
    deadline_s: float = Field(default=60.0, gt=0.0, description="seconds a round stays open")
    on_short: Literal["extend", "abort"] = Field(
        default="extend",
        description="at the deadline with < min_updates: extend once more or abort the job",
    )
    max_extensions: int = Field(default=3, ge=0)
    initial_model: Path | None = Field(
        default=None, description="safetensors file of the round-0 model (required to run)"
    )
    round_config: dict[str, Any] | str = Field(
        default_factory=dict,
        description="what each round.opened carries to the participants (round_info.config): "
        "a bounded JSON-like table (e.g. {lr = 0.05, local_epochs = 1}), or a "
        "module:function reference called with the round number that returns one",
    )
    evaluate_fn: str | None = Field(
        default=None,
        description="module:function the aggregator calls on each new model, "
        "evaluate_fn(version, tensors, config) -> (loss, num_examples, metrics); its result "
        "is published as metrics.evaluated (source central)",
    )

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, v: str) -> str:
        return check_id(v, "job_id")

    @field_validator("round_config", mode="before")
    @classmethod
    def _round_config(cls, v: Any) -> Any:
        if isinstance(v, str):
            return check_reference(v, "round_config")
        try:
            return check_round_config(v, "round_config")
        except MessageRejected as exc:
            raise ValueError(f"{exc.reason.value}: {exc.detail}") from None

    @field_validator("evaluate_fn")
    @classmethod
    def _evaluate_fn(cls, v: str | None) -> str | None:
        return None if v is None else check_reference(v, "evaluate_fn")

    @field_validator("participants")
    @classmethod
    def _participants(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for cid in v:
            check_id(cid, "participant id")
        if len(set(v)) != len(v):
            raise ValueError(f"participants contain duplicates: {sorted(v)}")
        return tuple(sorted(v))

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        n = len(self.participants)
        if self.min_updates > n:
            raise ValueError(f"min_updates={self.min_updates} exceeds the {n} participants")
        if 2 * self.f >= n:
            raise ValueError(f"f={self.f} needs 2f < n participants, got n={n}")
        if self.adaptive_clip and self.noise_multiplier > 0:
            # the update sum's noise multiplier must exist (a local import: the privacy core
            # is heavy, and only a job with adaptive clipping and DP needs it here)
            from qflare.privacy.errors import PrivacyError
            from qflare.privacy.policy import adaptive_of

            try:
                adaptive_of(self)
            except PrivacyError as exc:
                raise ValueError(exc.detail) from None
        return self

    def __repr__(self) -> str:  # the seed is secret: never print it
        fields = ", ".join(
            f"{k}={v!r}" for k, v in self.model_dump().items() if k not in ("seed", "participants")
        )
        return f"JobSpec({fields}, participants=<{len(self.participants)}>, seed=<hidden>)"

    __str__ = __repr__

    def public(self) -> dict[str, Any]:
        """The spec without its secret seed, for logs, status and round messages."""
        data = self.model_dump(mode="json")
        data.pop("seed")
        return data
