"""The direct path: the same rounds as the services run, by calling the pure cores in a loop.

No bus, no signatures, no stores: selection, detection, the robust rule and the DP-FedAvg
step are called as functions. It exists for sweeps (dozens of runs, where the services'
per-message costs add up) and as a cross-check of the services path; ``qflare simulate``
uses the services path unless ``--direct`` is given.

Selection, the verdict and aggregation are the services' own pure functions, called with
the same job id and seed, so a direct run and a services run of one configuration agree
round by round: the aggregator core's ``select_participants`` and ``aggregate_round``
(whose step is ``qflare.privacy.dp_fedavg``: with DP off the kept updates' mean divides by
the number kept, with DP on by the expected ``q*N``), the detector core's ``decide`` with
a default :class:`Reputation`, and the accountant's ``AccountantCore`` ledger.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from qflare.privacy import AdaptiveClipping, BudgetPolicy
from qflare.privacy.policy import privacy_charge
from qflare.robust import Reputation
from qflare.services.accountant.core import AccountantCore
from qflare.services.aggregator.core import (
    aggregate_round,
    cap_removals,
    expected_participants,
    select_participants,
)
from qflare.services.detector.core import decide
from qflare.sim.config import SIM_JOB, SimConfig, job_budget
from qflare.sim.federation import Federation
from qflare.sim.report import RoundRecord, RunResult

RoundCallback = Callable[[RoundRecord], None]


def run_direct(
    config: SimConfig,
    federation: Federation | None = None,
    on_round: RoundCallback | None = None,
    adaptive: AdaptiveClipping | None = None,
) -> RunResult:
    """Run ``config``'s rounds. With ``adaptive``, the clip norm starts at ``config.clip``
    and each round's aggregation gives the next round's (docs/privacy.md, "Adaptive
    clipping"); the accountant is asked about the clip norm of the round it charges."""
    fed = federation if federation is not None else Federation.build(config)
    names = fed.names
    params = {k: v.copy() for k, v in fed.initial.items()}
    model = fed.new_model()
    records: list[RoundRecord] = []
    notes: list[str] = []
    ended = "completed"
    reputation = Reputation()
    accountant = (
        AccountantCore(BudgetPolicy(epsilon=job_budget(config), delta=config.delta))
        if config.dp_on
        else None
    )
    # what the aggregator asks the accountant to charge (coverage, q, z): docs/privacy.md
    charge = (
        privacy_charge(
            rule=config.rule_spec,
            detection=config.detection,
            sample_rate=config.sample_rate,
            noise_multiplier=config.noise_multiplier,
            dp_filter_bound=config.dp_filter_bound,
        )
        if accountant is not None
        else None
    )
    clip = config.clip
    start = time.perf_counter()
    for round_index in range(1, config.rounds + 1):
        epsilon: float | None = None
        if accountant is not None:
            # As the services do: the accountant decides before the round opens, and a
            # denial ends the job with nothing more released.
            assert charge is not None
            decision = accountant.decide(SIM_JOB, round_index, charge.q, charge.z, clip)
            if not decision.granted:
                ended = "budget_exhausted"
                notes.append(
                    f"job ended: budget_exhausted (round {round_index} would reach "
                    f"epsilon {decision.epsilon_requested:.3f} > {decision.budget_epsilon})"
                )
                break
            accountant.apply(decision)
            epsilon = decision.epsilon_total
        t0 = time.perf_counter()
        participants = select_participants(
            fed.ids, config.sample_rate, config.seed, SIM_JOB, round_index
        )
        sent = fed.round_updates(round_index, params, participants)
        # Ingest refuses non-finite tensors (NON_FINITE) before the detector sees anything.
        rejected = tuple(
            c for c in participants if not all(np.isfinite(v).all() for v in sent[c].values())
        )
        updates = {c: u for c, u in sent.items() if c not in rejected}
        verdict = decide(
            round_index,
            updates,
            f=config.byzantine,
            detection=config.detection,
            reputation=reputation,
        )
        flagged = tuple(sorted(x.client for x in verdict.flagged))
        # as the aggregator does: with dp_filter_bound k only the k highest-scored go
        kept, removed = cap_removals(
            list(verdict.kept),
            [(x.client, float(x.score)) for x in verdict.flagged],
            config.dp_filter_bound,
        )
        result = aggregate_round(
            job=SIM_JOB,
            round_no=round_index,
            seed=config.seed,
            base=params,
            updates=updates,
            kept=kept,
            rule=config.rule_spec,
            f=config.byzantine,
            clip=clip,
            noise_multiplier=config.noise_multiplier,
            expected_clients=expected_participants(config.sample_rate, config.clients),
            server_lr=config.server_lr,
            adaptive=adaptive,
        )
        clip = result.next_clip
        params = {k: result.model[k].astype(np.float32) for k in names}
        evaluation = fed.evaluate(params, model)
        record = RoundRecord(
            round=round_index,
            accuracy=evaluation.accuracy,
            loss=evaluation.loss,
            participants=tuple(participants),
            flagged=flagged,
            byzantine=tuple(c for c in participants if c in fed.byzantine),
            epsilon=epsilon,
            latency_s=time.perf_counter() - t0,
            rejected=rejected,
            kept_flagged=tuple(sorted(set(flagged) - set(removed))),
        )
        records.append(record)
        if on_round is not None:
            on_round(record)
    return RunResult(
        config=config.to_json(),
        rounds=records,
        byzantine_clients=fed.byzantine,
        path="direct",
        broker=None,
        wall_s=time.perf_counter() - start,
        ended=ended,
        notes=notes,
    )
