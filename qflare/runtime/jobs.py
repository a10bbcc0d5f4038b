"""A federated job as configured: who takes part, how rounds are run, filtered and noised.

A :class:`JobSpec` is read from the ``[[jobs]]`` tables of the configuration file (TOML)
for ``qflare serve aggregator``/``qflare up``, or built in code and submitted in-process
(``qflare simulate``). It is validated once, here, so every service can trust its fields.

The privacy fields follow DP-FedAvg (McMahan et al., "Learning Differentially Private
Recurrent Language Models", ICLR 2018): each round samples clients by Poisson sampling at
rate ``q``, clips each update to L2 norm ``clip``, and adds Gaussian noise of standard
deviation ``noise_multiplier * clip`` to the sum. The accountant refuses a round that would
push the job's epsilon (at ``delta``) past ``epsilon_budget``.

What that epsilon covers depends on what runs before the noisy sum (docs/privacy.md,
"Byzantine filtering before the noisy sum"); :func:`privacy_charge` decides, from the spec
alone, the (q, z) the aggregator asks the accountant to charge and the ``coverage`` the
request, the grant and every report carry:

* ``clipped_sum``: rule ``mean`` and no removal by detection (detection off, or
  ``dp_filter_bound = 0``): the clipped-sum Gaussian mechanism of DP-FedAvg, charged at
  (q, z). The epsilon is a guarantee under the page's assumptions.
* ``filter_bounded``: rule ``mean``, detection on, at most ``k = dp_filter_bound`` updates
  removed per round. One client moves the kept sum by at most (2k + 1) C, so the round is
  charged at ``filtered_noise_multiplier(z, k) = z / (2k + 1)``. The detector's reputation
  quarantines clients from earlier rounds' updates, so a client that is *not* sampled in a
  round can still change which others are removed in it: amplification by sampling does not
  hold, and the round is charged at q = 1. The noise added stays z * C.
* ``noise_only``: any other filtering (detection with no bound, or a rule other than
  ``mean``): charged at (q, z), but the epsilon is only that of the noise added, not a DP
  guarantee for the pipeline that ran.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qflare.errors import QflareError
from qflare.messages import DEFAULT_LIMITS

Coverage = Literal["clipped_sum", "filter_bounded", "noise_only"]

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_id(value: str, what: str) -> str:
    """Job and client ids travel as routing-key words: letters, digits, ``_`` and ``-``."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(
            f"{what} must be 1-64 characters of letters, digits, '_' or '-' "
            f"(it is a routing-key word), got {value!r}"
        )
    return value


class JobSpec(BaseModel):
    """Everything the services need to run one job. Immutable once submitted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    rounds: int = Field(
        ge=1, le=100_000, description="rounds to run unless the budget ends it first"
    )
    participants: tuple[str, ...] = Field(min_length=1, description="enrolled client ids")
    rule: str = Field(default="mean", description="robust rule spec for qflare.robust.get_rule")
    f: int = Field(default=0, ge=0, description="Byzantine clients tolerated per round")
    detection: bool = Field(default=True, description="run the detector; off keeps every update")
    sample_rate: float = Field(default=1.0, gt=0.0, le=1.0, description="Poisson rate q")
    noise_multiplier: float = Field(
        default=1.0,
        ge=0.0,
        description="z: noise std = z * clip; 0 turns DP off (no accountant, epsilon inf)",
    )
    clip: float = Field(default=1.0, gt=0.0, description="L2 clip norm C per update")
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    epsilon_budget: float = Field(default=10.0, gt=0.0)
    dp_filter_bound: int | None = Field(
        default=None,
        ge=0,
        description="k: detection removes at most k updates per round (the k highest-scored "
        "flagged) and rounds are charged at z/(2k+1), q=1; None: no bound, the "
        "epsilon of a filtering job is not a DP guarantee",
    )
    server_lr: float = Field(default=1.0, gt=0.0, description="step applied to the noised mean")
    min_updates: int = Field(default=1, ge=1, description="fewest updates a round closes with")
    deadline_s: float = Field(default=60.0, gt=0.0, description="seconds a round stays open")
    on_short: Literal["extend", "abort"] = Field(
        default="extend",
        description="at the deadline with < min_updates: extend once more or abort the job",
    )
    max_extensions: int = Field(default=3, ge=0)
    seed: int = Field(default=0, ge=0, lt=2**63, description="secret job seed: selection and noise")
    initial_model: Path | None = Field(
        default=None, description="safetensors file of the round-0 model (required to run)"
    )

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, v: str) -> str:
        return check_id(v, "job_id")

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
        return self

    def __repr__(self) -> str:  # the seed is secret: never print it
        fields = ", ".join(
            f"{k}={v!r}" for k, v in self.model_dump().items() if k not in ("seed", "participants")
        )
        return f"JobSpec({fields}, participants=<{len(self.participants)}>, seed=<hidden>)"

    __str__ = __repr__

    def privacy_charge(self) -> PrivacyCharge:
        """What the accountant is asked to charge for each round of this job."""
        return privacy_charge(
            rule=self.rule,
            detection=self.detection,
            sample_rate=self.sample_rate,
            noise_multiplier=self.noise_multiplier,
            dp_filter_bound=self.dp_filter_bound,
        )

    def public(self) -> dict[str, Any]:
        """The spec without its secret seed, for logs, status and round messages."""
        data = self.model_dump(mode="json")
        data.pop("seed")
        return data


@dataclass(frozen=True)
class PrivacyCharge:
    """The sampling rate and noise multiplier a round is charged at, and what the resulting
    epsilon covers (module docstring; docs/privacy.md)."""

    coverage: Coverage
    q: float
    z: float


def privacy_charge(
    *,
    rule: str,
    detection: bool,
    sample_rate: float,
    noise_multiplier: float,
    dp_filter_bound: int | None = None,
) -> PrivacyCharge:
    """The charge for one round with noise ``noise_multiplier * C`` actually added.

    Only the exact rule ``mean`` keeps the clipped-sum argument: any other rule (Krum,
    medians, NNM pre-mixing, ...) chooses or mixes updates from all of them. ``detection``
    removes updates, unless ``dp_filter_bound`` is 0.
    """
    # here, not at the top: qflare.privacy loads dp_accounting (seconds), and this module is
    # loaded by every CLI command
    from qflare.privacy import filtered_noise_multiplier

    if noise_multiplier <= 0:
        raise ValueError("DP is off (noise_multiplier 0): nothing is charged")
    removes = detection and dp_filter_bound != 0
    if rule.strip() != "mean":
        return PrivacyCharge("noise_only", sample_rate, noise_multiplier)
    if not removes:
        return PrivacyCharge("clipped_sum", sample_rate, noise_multiplier)
    if dp_filter_bound is None:
        return PrivacyCharge("noise_only", sample_rate, noise_multiplier)
    # q = 1: the detector's reputation carries earlier rounds' updates into this round's
    # removals, so a client's presence matters even in rounds it is not sampled for.
    return PrivacyCharge(
        "filter_bounded", 1.0, filtered_noise_multiplier(noise_multiplier, dp_filter_bound)
    )


#: What one envelope carries besides the tensors: header, certificate, signature, sealing
#: (a KEM ciphertext and an AEAD tag), with room to spare; plus per tensor its name and shape.
ENVELOPE_OVERHEAD = 64 * 1024
TENSOR_OVERHEAD = 1024


class ModelTooLarge(ValueError, QflareError):
    """A job's model does not fit in one message: the services would fail to broadcast it
    and no update for it would pass ingest. Refused at submission, before the job is
    stored."""

    reason = "TOO_LARGE"

    def __init__(self, job_id: str, nbytes: int, limit: int) -> None:
        self.job_id, self.nbytes, self.limit = job_id, nbytes, limit
        super().__init__(
            f"TOO_LARGE: job {job_id!r}: the model's tensors take {nbytes / 2**20:.1f} MiB, and one "
            f"message (the global model broadcast, each client update) carries at most "
            f"{limit / 2**20:.1f} MiB of tensors (the envelope limit under RabbitMQ's 128 MiB "
            f"message size); the services do not yet send models or updates in chunks"
        )


def max_model_bytes(
    num_tensors: int, envelope_limit: int = DEFAULT_LIMITS.max_envelope_bytes
) -> int:
    """The most tensor bytes a model of ``num_tensors`` tensors may have so that its
    broadcast and its updates each fit in one envelope."""
    return envelope_limit - ENVELOPE_OVERHEAD - TENSOR_OVERHEAD * num_tensors


def check_model_size(
    job_id: str, model: dict[str, Any], envelope_limit: int = DEFAULT_LIMITS.max_envelope_bytes
) -> int:
    """Raise :class:`ModelTooLarge` when ``model`` (name -> array) does not fit in one
    message; returns its tensor bytes."""
    nbytes = sum(int(np.asarray(v).nbytes) for v in model.values())
    limit = max_model_bytes(len(model), envelope_limit)
    if nbytes > limit:
        raise ModelTooLarge(job_id, nbytes, limit)
    return nbytes


def load_jobs(tables: list[dict[str, Any]], base_dir: Path | None = None) -> tuple[JobSpec, ...]:
    """Build specs from the ``[[jobs]]`` tables of a config file; relative model paths are
    taken relative to the file's folder."""
    if not isinstance(tables, list):
        raise TypeError(f"[[jobs]] must be an array of tables, got {type(tables).__name__}")
    jobs = []
    for table in tables:
        data = dict(table)
        if base_dir is not None and data.get("initial_model"):
            path = Path(data["initial_model"])
            data["initial_model"] = path if path.is_absolute() else base_dir / path
        jobs.append(JobSpec.model_validate(data))
    ids = [j.job_id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"job ids must be unique, got {ids}")
    return tuple(jobs)
