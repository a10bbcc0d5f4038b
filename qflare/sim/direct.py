"""The direct path: the same rounds as the services run, by driving the same pure cores in
a loop.

No bus, no signatures, no stores: the aggregator's round is its own state machine
(``qflare.services.aggregator.core``: ``begin``/``step``), fed the inputs the services would
feed it, in the same order, under the services path's own job spec (``job_spec``): the
accountant's answer (``AccountantCore``), then an ``Accepted`` for each participant's update
(a ``Refused`` where ingest would refuse it: non-finite tensors), then the clock (a round
whose participants all answered closes at once; else at its deadline), then the detector
core's ``decide`` over exactly the closed set as the ``Verdict``; its ``Aggregate`` effect
is computed by the core's ``aggregate`` (the job's rule, clip, noise and denominator), and
its ``NextRound``/``EndJob`` effect says what follows, begun at the clip norm the
aggregation gave (adaptive clipping, the job's ``adaptive_clip``). Selection, the close, the removals
under ``dp_filter_bound`` and the arithmetic are therefore the services' own, so a direct
run and a services run of one configuration agree round by round and cannot drift apart.
It exists for sweeps (dozens of runs, where the services' per-message costs add up) and as
a cross-check of the services path; ``qflare simulate`` uses the services path unless
``--direct`` is given.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from qflare.messages.jobs import JobSpec
from qflare.privacy import BudgetPolicy
from qflare.robust import Reputation
from qflare.services.accountant.core import AccountantCore
from qflare.services.aggregator.core import (
    Accepted,
    Aggregate,
    Denied,
    Effect,
    EndJob,
    Granted,
    NextRound,
    Refused,
    RequestPrivacy,
    Round,
    RoundState,
    Step,
    Tick,
    Verdict,
    aggregate,
    begin,
    malformed_of,
    step,
)
from qflare.services.detector.core import FlaggedClient, RoundVerdict, decide
from qflare.sim.config import NO_ATTACK, SIM_JOB, SimConfig, job_budget
from qflare.sim.federation import Federation
from qflare.sim.report import RoundRecord, RunResult
from qflare.sim.services import job_spec

RoundCallback = Callable[[RoundRecord], None]


def run_direct(
    config: SimConfig,
    federation: Federation | None = None,
    on_round: RoundCallback | None = None,
    *,
    oracle: bool = False,
) -> RunResult:
    """Run ``config``'s rounds. ``oracle`` puts a perfect detector in the detector core's
    place (for the evaluation protocol, ``qflare.sim.protocol``): each round's verdict
    flags exactly the attackers among the closed set (none when the attack is ``none``),
    and the aggregator treats it as any verdict. With ``config.adaptive_clip`` the clip norm starts at
    ``config.clip`` and each round's aggregation gives the next round's (docs/privacy.md,
    "Adaptive clipping"); the accountant is asked about the clip norm of the round it
    charges, as the services path's request names it."""
    fed = federation if federation is not None else Federation.build(config)
    spec = job_spec(config, fed.ids)  # the job the services path submits
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
    now = 0.0  # the machine's clock: rounds close when everyone answered, never by timing
    start = time.perf_counter()
    r, effects = begin(spec, 1, 0, now)
    while True:
        t0 = time.perf_counter()
        # the accountant decides before the round opens; a denial ends the job with
        # nothing more released
        (request,) = effects
        epsilon: float | None = None
        if isinstance(request, RequestPrivacy):
            assert accountant is not None
            decision = accountant.decide(SIM_JOB, r.round, request.q, request.z, request.clip)
            if not decision.granted:
                denied = Denied(
                    decision.reason or "", decision.epsilon_total, decision.budget_epsilon
                )
                r, effects = step(spec, r, denied, now)
                ended = _end_of(effects).reason
                notes.append(
                    f"job ended: {ended} (round {r.round} would reach "
                    f"epsilon {decision.epsilon_requested:.3f} > {decision.budget_epsilon})"
                )
                break
            accountant.apply(decision)
            epsilon = decision.epsilon_total
            r, effects = step(spec, r, Granted(decision.epsilon_total), now)
        else:  # DP off: nothing to account
            r, effects = step(spec, r, Granted(math.inf), now)
        sent = fed.round_updates(r.round, params, r.participants)
        # what ingest tells the aggregator: it refuses non-finite tensors (NON_FINITE)
        # before the detector sees anything, and accepts the rest. The coalition's updates
        # enter the stream after the honest ones: an omniscient attack is built from them
        order = sorted(r.participants, key=lambda c: c in fed.byzantine)
        arrival = {c: float(offset) for offset, c in enumerate(order)}
        for offset, c in enumerate(order):
            if all(np.isfinite(v).all() for v in sent[c].values()):
                update = Accepted(c, _digest(r, c), offset, len(fed.shards[c]), r.base_version)
                r, effects = step(spec, r, update, now)
            else:
                r, effects = step(spec, r, Refused(c, "NON_FINITE"), now)
        r, effects = _tick_until_settled(spec, r, now)
        if r.state == RoundState.ABORTED:
            end = _end_of(effects)
            ended = end.reason
            notes.append(f"job ended: {ended} ({end.detail})")
            break
        assert r.closed is not None
        updates = {c: sent[c] for c, _digest, _offset in r.closed}
        if oracle:
            found = _oracle_verdict(updates, fed.byzantine if config.attack != NO_ATTACK else ())
        else:
            found = decide(
                r.round,
                updates,
                f=spec.f,
                detection=spec.detection,
                reputation=reputation,
                malformed=malformed_of(r),
                output_layer=spec.output_layer,
                arrival={c: arrival[c] for c in updates},  # the closed set's
            )
        verdict = Verdict(found.kept, tuple((x.client, float(x.score)) for x in found.flagged))
        r, effects = step(spec, r, verdict, now)
        (command,) = (e for e in effects if isinstance(e, Aggregate))
        result = aggregate(spec, command, params, updates)
        params = {k: result.model[k].astype(np.float32) for k in names}
        evaluation = fed.evaluate(params, model)
        flagged = tuple(sorted(x.client for x in found.flagged))
        record = RoundRecord(
            round=r.round,
            accuracy=evaluation.accuracy,
            loss=evaluation.loss,
            participants=r.participants,
            flagged=flagged,
            byzantine=tuple(c for c in r.participants if c in fed.byzantine),
            epsilon=epsilon,
            latency_s=time.perf_counter() - t0,
            rejected=tuple(c for c, _reason in r.refused if r.holding(c) is None),
            kept_flagged=tuple(sorted(set(flagged) - set(command.removed))),
            clip=command.clip,
        )
        records.append(record)
        if on_round is not None:
            on_round(record)
        after = effects[-1]
        if isinstance(after, EndJob):
            ended = after.reason
            break
        assert isinstance(after, NextRound)
        r, effects = begin(spec, after.round, after.base_version, now, clip=result.next_clip)
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


def _oracle_verdict(updates: Mapping[str, object], attackers: Sequence[str]) -> RoundVerdict:
    """A perfect detector's verdict: exactly the attackers flagged, everyone else kept."""
    bad = set(attackers)
    clients = sorted(updates)
    flagged = tuple(FlaggedClient(c, 0.0, ("oracle",)) for c in clients if c in bad)
    kept = tuple(c for c in clients if c not in bad)
    return RoundVerdict(kept, flagged, (), "oracle")


def _digest(r: Round, client: str) -> bytes:
    """A stand-in for the digest ingest vouches for: one update per (round, client)."""
    return hashlib.sha256(f"{r.job}/{r.round}/{client}".encode()).digest()


def _tick_until_settled(spec: JobSpec, r: Round, now: float) -> Step:
    """The round after the clock: it closes at once when everyone answered (or nobody was
    selected), else at its deadline (extended, then aborted, when too few came)."""
    r, effects = step(spec, r, Tick(), now)
    out = list(effects)
    while r.state == RoundState.OPEN:
        assert r.deadline is not None
        r, effects = step(spec, r, Tick(), r.deadline)
        out += effects
    return r, tuple(out)


def _end_of(effects: Sequence[Effect]) -> EndJob:
    (end,) = (e for e in effects if isinstance(e, EndJob))
    return end
