"""Pure differential-privacy core: DP-FedAvg mechanism, accounting, budget decisions.

See docs/privacy.md for what the guarantee covers. No I/O here: the accountant service
(``qflare.services.accountant``) persists the ledger.
"""

from qflare.privacy.accounting import (
    VALUE_DISCRETIZATION,
    Charge,
    RunningAccount,
    epsilon,
    filtered_noise_multiplier,
    plan_noise,
    plan_rounds,
    round_event,
)
from qflare.privacy.errors import (
    BUDGET_EXHAUSTED,
    CONFLICTING_REQUEST,
    INVALID_PARAMETERS,
    UNKNOWN_JOB,
    PrivacyError,
)
from qflare.privacy.ledger import BudgetPolicy, Decision, Ledger, check_request
from qflare.privacy.mechanism import (
    AdaptiveClipping,
    DPStep,
    NoiseSource,
    adaptive_sum_noise_multiplier,
    clip_rows,
    default_count_noise_std,
    dp_fedavg,
    fedavg_denominator,
    l2_norm,
    local_dp_update,
    local_epsilon,
    next_clip,
    poisson_sample,
)

__all__ = [
    "BUDGET_EXHAUSTED",
    "CONFLICTING_REQUEST",
    "INVALID_PARAMETERS",
    "UNKNOWN_JOB",
    "VALUE_DISCRETIZATION",
    "AdaptiveClipping",
    "BudgetPolicy",
    "Charge",
    "DPStep",
    "Decision",
    "Ledger",
    "NoiseSource",
    "PrivacyError",
    "RunningAccount",
    "adaptive_sum_noise_multiplier",
    "check_request",
    "clip_rows",
    "default_count_noise_std",
    "dp_fedavg",
    "epsilon",
    "fedavg_denominator",
    "filtered_noise_multiplier",
    "l2_norm",
    "local_dp_update",
    "local_epsilon",
    "next_clip",
    "plan_noise",
    "plan_rounds",
    "poisson_sample",
    "round_event",
]
