"""A simulation's settings, checked in full before anything starts.

Every impossible combination is refused here with a message naming the numbers: more
Byzantine clients than clients, a rule whose own requirement (``2f < n`` for Krum,
``n >= 4f + 3`` for Bulyan, ...) the numbers break, an unknown attack or rule, a Dirichlet
alpha that is not positive, DP asked for both by noise multiplier and by target epsilon, a
filter bound without DP or without detection.
The rule's requirement is checked by calling the rule itself on a batch of the size it
will see, so the check can never drift from the rule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from qflare.errors import QflareError
from qflare.sim.data import dataset_names
from qflare.sim.model import MODEL_NAMES

#: attacks the simulator applies itself, besides the model-poisoning attacks of qflare.robust
NO_ATTACK = "none"
LABEL_FLIP = "label_flip"
#: the job id the simulator's runs use (it seeds selection and noise in the aggregator)
SIM_JOB = "sim"


class SimConfigError(QflareError, ValueError):
    """A simulation setting (or combination) that cannot run; the message says why."""


@dataclass(frozen=True)
class SimConfig:
    dataset: str = "digits"
    model: str = "mlp"
    clients: int = 20
    byzantine: int = 6
    attack: str = "sign_flip"
    rule: str = "mean"
    detection: bool = True
    rounds: int = 20
    local_epochs: int = 2
    lr: float = 0.1
    batch_size: int = 16
    alpha: float | None = 0.5
    sample_rate: float = 1.0
    server_lr: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float | None = None
    clip: float = 5.0
    delta: float = 1e-5
    epsilon_budget: float | None = None
    #: k: detection removes at most k updates per round, charged at z/(2k+1), q=1
    #: (JobSpec.dp_filter_bound); None: no bound
    dp_filter_bound: int | None = None
    seed: int = 0
    attack_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from qflare.sim.robust_glue import canonical_attack

        object.__setattr__(self, "attack", canonical_attack(self.attack))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
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
        return replace(self, **changes)


def validate(config: SimConfig) -> None:
    """Raise :class:`SimConfigError` for anything that cannot run; cheap, starts nothing."""
    from qflare.sim import robust_glue

    def fail(message: str) -> None:
        raise SimConfigError(message)

    if config.dataset not in dataset_names():
        fail(f"unknown data set {config.dataset!r}; known: {', '.join(dataset_names())}")
    if config.model not in MODEL_NAMES:
        fail(f"unknown model {config.model!r}; known: {', '.join(MODEL_NAMES)}")
    if config.clients < 2:
        fail(f"--clients must be >= 2, got {config.clients}")
    if config.clients > 1000:
        fail(f"--clients must be <= 1000 in a simulation, got {config.clients}")
    if config.byzantine < 0:
        fail(f"--byzantine must be >= 0, got {config.byzantine}")
    if config.byzantine >= config.clients:
        fail(
            f"--byzantine {config.byzantine} must be smaller than --clients {config.clients} "
            "(someone has to be honest)"
        )
    if config.rounds < 1:
        fail(f"--rounds must be >= 1, got {config.rounds}")
    if config.local_epochs < 1:
        fail(f"--local-epochs must be >= 1, got {config.local_epochs}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        fail(f"--lr must be a positive number, got {config.lr}")
    if config.batch_size < 1:
        fail(f"--batch-size must be >= 1, got {config.batch_size}")
    if config.alpha is not None and not (config.alpha > 0 and math.isfinite(config.alpha)):
        fail(
            f"--alpha (Dirichlet concentration) must be > 0, got {config.alpha}; use --iid for an IID split"
        )
    if not 0 < config.sample_rate <= 1:
        fail(f"--sample-rate must be in (0, 1], got {config.sample_rate}")
    if not config.server_lr > 0:
        fail(f"--server-lr must be > 0, got {config.server_lr}")
    if not (config.clip > 0 and math.isfinite(config.clip)):
        fail(f"--clip must be > 0, got {config.clip}")
    if not 0 < config.delta < 1:
        fail(f"--delta must be in (0, 1), got {config.delta}")
    if config.noise_multiplier < 0 or not math.isfinite(config.noise_multiplier):
        fail(f"--noise-multiplier must be >= 0, got {config.noise_multiplier}")
    if config.target_epsilon is not None and not config.target_epsilon > 0:
        fail(f"--target-epsilon must be > 0, got {config.target_epsilon}")
    if config.epsilon_budget is not None and not config.epsilon_budget > 0:
        fail(f"--epsilon-budget must be > 0, got {config.epsilon_budget}")
    if config.seed < 0:
        fail(f"--seed must be >= 0, got {config.seed}")
    k = config.dp_filter_bound
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            fail(f"--dp-filter-bound must be an integer >= 0, got {k!r}")
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


#: The budget a job gets when DP is on but no budget was asked for: large enough never to
#: bind, finite because the ledger takes finite budgets only.
UNBOUNDED_BUDGET = 1e12


def job_budget(config: SimConfig) -> float:
    return config.epsilon_budget if config.epsilon_budget is not None else UNBOUNDED_BUDGET
