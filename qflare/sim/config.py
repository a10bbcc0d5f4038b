"""A simulation's settings, checked in full before anything starts.

Every impossible combination is refused here with a message naming the numbers: more
Byzantine clients than clients, a rule whose own requirement (``2f < n`` for Krum,
``n >= 4f + 3`` for Bulyan, ...) the numbers break, an unknown attack or rule, a Dirichlet
alpha that is not positive, DP asked for both by noise multiplier and by target epsilon, a
filter bound without DP or without detection, adaptive clipping whose count noise is too
small for the noise multiplier.
The rule's requirement is checked by calling the rule itself on a batch of the size it
will see, so the check can never drift from the rule.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator

from qflare.errors import QflareError
from qflare.messages.jobs import JobSettings
from qflare.sim.data import dataset_names
from qflare.sim.model import MODEL_NAMES, OUTPUT_LAYERS

#: attacks the simulator applies itself, besides the model-poisoning attacks of qflare.robust
NO_ATTACK = "none"
LABEL_FLIP = "label_flip"
#: the job id the simulator's runs use (it seeds selection and noise in the aggregator)
SIM_JOB = "sim"


class SimConfigError(QflareError, ValueError):
    """A simulation setting (or combination) that cannot run; the message says why."""


class SimConfig(JobSettings):
    """A simulation: the job's settings (:class:`qflare.messages.jobs.JobSettings`, checked
    there) with the simulator's own (data, model, clients, attack, local training). Four
    job settings have simulation defaults: 20 rounds, DP off, clip 5, no budget (unbounded).
    A field a simulation cannot take raises :class:`SimConfigError` naming its flag."""

    dataset: str = "digits"
    model: str = "mlp"
    clients: int = Field(default=20, ge=2, le=1000)
    byzantine: int = Field(default=6, ge=0)
    attack: str = "sign_flip"
    local_epochs: int = Field(default=2, ge=1)
    lr: float = Field(default=0.1, gt=0, allow_inf_nan=False)
    batch_size: int = Field(default=16, ge=1)
    alpha: float | None = 0.5
    target_epsilon: float | None = Field(default=None, gt=0)
    attack_options: dict[str, Any] = Field(default_factory=dict)
    # the job settings whose defaults differ in a simulation
    rounds: int = Field(default=20, ge=1, le=100_000)
    noise_multiplier: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    clip: float = Field(default=5.0, gt=0.0, allow_inf_nan=False)
    epsilon_budget: float | None = Field(default=None, gt=0.0)  # type: ignore[assignment]  # None: no budget (unbounded)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SimConfigError(_flag_errors(exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _default_output_layer(cls, data: Any) -> Any:
        """A built-in model's output layer unless ``output_layer`` is given (None: off)."""
        if isinstance(data, dict) and "output_layer" not in data:
            return {**data, "output_layer": OUTPUT_LAYERS.get(data.get("model", "mlp"))}
        return data

    @field_validator("attack")
    @classmethod
    def _canonical_attack(cls, value: str) -> str:
        from qflare.sim.robust_glue import canonical_attack

        return canonical_attack(value)

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["rule_resolved"] = self.rule_spec
        return data

    @property
    def dp_on(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def rule_spec(self) -> str:
        """The rule spec with ``f`` filled in from ``--byzantine`` where the spec leaves it out."""
        from qflare.sim.robust_glue import resolve_rule_spec

        return resolve_rule_spec(self.rule, self.byzantine)

    def with_(self, **changes: Any) -> SimConfig:
        data = {**self.model_dump(), **changes}
        if (
            "output_layer" not in changes
            and data["model"] != self.model
            and self.output_layer == OUTPUT_LAYERS.get(self.model)
        ):
            del data["output_layer"]  # the new model's own
        return SimConfig(**data)


def _flag_errors(exc: ValidationError) -> str:
    """pydantic's errors as the command line's flags: ``--clip: Input should be ...``."""
    parts = []
    for err in exc.errors():
        flag = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
        parts.append(f"{flag}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def validate(config: SimConfig) -> None:
    """Raise :class:`SimConfigError` for anything that cannot run; cheap, starts nothing.
    Single settings are checked when the config is built; here: names and combinations."""
    from qflare.sim import robust_glue

    def fail(message: str) -> None:
        raise SimConfigError(message)

    if config.dataset not in dataset_names():
        fail(f"unknown data set {config.dataset!r}; known: {', '.join(dataset_names())}")
    if config.model not in MODEL_NAMES:
        fail(f"unknown model {config.model!r}; known: {', '.join(MODEL_NAMES)}")
    if config.byzantine >= config.clients:
        fail(
            f"--byzantine {config.byzantine} must be smaller than --clients {config.clients} "
            "(someone has to be honest)"
        )
    if config.alpha is not None and not (config.alpha > 0 and math.isfinite(config.alpha)):
        fail(
            f"--alpha (Dirichlet concentration) must be > 0, got {config.alpha}; use --iid for an IID split"
        )
    k = config.dp_filter_bound
    if k is not None:
        if not (config.dp_on or config.target_epsilon is not None):
            fail(
                f"--dp-filter-bound {k} only applies with DP on (--noise-multiplier or "
                "--target-epsilon): it bounds what detection removes so that the epsilon covers it"
            )
        if not config.detection:
            fail(
                f"--dp-filter-bound {k} bounds what detection removes, and detection is off "
                "(--no-detection): nothing is removed, drop the bound"
            )

    attacks = robust_glue.attack_names()
    if config.attack not in attacks:
        fail(f"unknown attack {config.attack!r}; known: {', '.join(attacks)}")
    try:
        robust_glue.check_attack(config.attack, config.attack_options, config.rule_spec)
    except (ValueError, TypeError) as exc:
        given = f" with options {config.attack_options}" if config.attack_options else ""
        fail(f"--attack {config.attack}{given}: {exc}")
    if config.attack != NO_ATTACK and config.byzantine == 0:
        fail(f"--attack {config.attack} needs --byzantine >= 1 (or use --attack none)")
    try:
        rule = robust_glue.build_rule(config.rule_spec)
    except (ValueError, TypeError, KeyError) as exc:
        fail(f"--rule {config.rule!r}: {exc}")
    expected = config.clients
    if config.sample_rate < 1:
        # The aggregator's own seeded Poisson selection, round by round: a round that selects
        # nobody would wait for its deadline and end the job, so refuse it now.
        from qflare.services.aggregator.core import select_participants
        from qflare.sim.federation import client_ids

        ids = client_ids(config.clients)
        sizes = [
            len(select_participants(ids, config.sample_rate, config.seed, SIM_JOB, r))
            for r in range(1, config.rounds + 1)
        ]
        if min(sizes) == 0:
            fail(
                f"--sample-rate {config.sample_rate} with --clients {config.clients} and --seed "
                f"{config.seed} selects nobody in round {sizes.index(0) + 1}; raise the rate or "
                "the number of clients, or change the seed"
            )
        expected = min(sizes)
    # Ask the rule itself whether it can run on a round of that many updates with f
    # Byzantine among them.
    probe = np.random.default_rng(0).normal(size=(expected, 4)).astype(np.float32)
    try:
        rule(probe)
    except (ValueError, TypeError) as exc:
        fail(
            f"--rule {config.rule_spec} cannot run with {expected} updates and "
            f"--byzantine {config.byzantine}: {exc}"
        )
    if config.detection and 2 * config.byzantine >= config.clients:
        fail(
            f"detection needs 2f < n: --byzantine {config.byzantine} with --clients {config.clients}"
        )
    check_adaptive_clip(config)


def check_adaptive_clip(config: SimConfig) -> None:
    """``--adaptive-clip`` with DP on needs ``2 * sigma_b > z`` (the job's own check,
    :func:`qflare.privacy.policy.adaptive_clipping`, with the flags' names); run again once
    ``--target-epsilon`` has become a noise multiplier."""
    from qflare.privacy.errors import PrivacyError
    from qflare.privacy.policy import adaptive_clipping

    try:
        adaptive_clipping(config, config.clients)
    except PrivacyError as exc:
        detail = exc.detail
        for key in ("clip_count_noise_std", "noise_multiplier"):
            detail = detail.replace(key, "--" + key.replace("_", "-"))
        raise SimConfigError(f"--adaptive-clip: {detail}") from None


#: The budget a job gets when DP is on but no budget was asked for: large enough never to
#: bind, finite because the ledger takes finite budgets only.
UNBOUNDED_BUDGET = 1e12


def job_budget(config: SimConfig) -> float:
    return config.epsilon_budget if config.epsilon_budget is not None else UNBOUNDED_BUDGET
