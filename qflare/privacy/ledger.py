"""The budget decision for one job: grant or deny each round, idempotently per round.

A :class:`Ledger` holds one job's (epsilon, delta) budget, every decision taken so far and
the running composition of the granted rounds (:class:`RunningAccount`). Deciding is pure
and does not change the ledger; the caller persists a fresh decision and then applies it,
so an in-memory ledger is never ahead of the durable one:

    decision = ledger.decide(round_no, q, z, clip)
    if decision.fresh:
        persist(decision)          # e.g. services.accountant.store.LedgerStore.record
        ledger.apply(decision)

A round is granted exactly when the PLD epsilon of all granted rounds plus this one stays
at or below the budget; a denied round is recorded (so a repeat is answered the same way)
but charges nothing. Rounds are charged in request order; composition commutes, so the
order does not change epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from dp_accounting.pld import privacy_loss_distribution

from qflare.privacy.accounting import (
    Charge,
    RunningAccount,
    check_delta,
    check_round_parameters,
)
from qflare.privacy.errors import (
    BUDGET_EXHAUSTED,
    CONFLICTING_REQUEST,
    INVALID_PARAMETERS,
    PrivacyError,
)


@dataclass(frozen=True)
class BudgetPolicy:
    """A job's privacy budget: the released rounds together must be (epsilon, delta)-DP."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (
            isinstance(self.epsilon, (int, float))
            and math.isfinite(self.epsilon)
            and self.epsilon > 0
        ):
            raise PrivacyError(INVALID_PARAMETERS, f"budget epsilon={self.epsilon!r} must be > 0")
        check_delta(self.delta)


@dataclass(frozen=True)
class Decision:
    """The answer to one (job, round) request, as stored in the ledger.

    ``epsilon_total`` is the PLD epsilon spent after this decision (unchanged by a denial);
    ``epsilon_requested`` is what granting the round would have made it (equal to
    ``epsilon_total`` for a grant); ``epsilon_rdp`` is the RDP cross-check of
    ``epsilon_total``. ``fresh`` is True only for a decision not yet in the ledger.
    """

    job: str
    round: int
    q: float
    z: float
    clip: float
    granted: bool
    reason: str | None
    epsilon_total: float
    epsilon_requested: float
    epsilon_rdp: float
    epsilon_before: float
    budget_epsilon: float
    delta: float
    rounds_granted: int
    fresh: bool = False

    def same_request(self, q: float, z: float, clip: float) -> bool:
        return (self.q, self.z, self.clip) == (float(q), float(z), float(clip))


def check_request(job: str, round_no: int, q: float, z: float, clip: float) -> None:
    """Raise :class:`PrivacyError` (``INVALID_PARAMETERS``) for a malformed request."""
    if not isinstance(job, str) or not job:
        raise PrivacyError(INVALID_PARAMETERS, f"job={job!r} must be a non-empty string")
    if isinstance(round_no, bool) or not isinstance(round_no, int) or round_no < 0:
        raise PrivacyError(INVALID_PARAMETERS, f"round={round_no!r} must be an integer >= 0")
    check_round_parameters(q, z)
    if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise PrivacyError(INVALID_PARAMETERS, f"clip={clip!r} must be > 0")


class Ledger:
    """One job's decisions and running composition. Pure: no I/O, no clock."""

    def __init__(self, job: str, policy: BudgetPolicy) -> None:
        check_request(job, 0, 1.0, 1.0, 1.0)
        self.job = job
        self.policy = policy
        self._decisions: dict[int, Decision] = {}
        self._account = RunningAccount()
        self._epsilon = 0.0
        self._pending: (
            tuple[int, float, float, privacy_loss_distribution.PrivacyLossDistribution] | None
        ) = None

    def __repr__(self) -> str:
        return (
            f"Ledger(job={self.job!r}, budget={self.policy.epsilon}, delta={self.policy.delta}, "
            f"rounds_granted={self.rounds_granted}, epsilon={self._epsilon:.6g})"
        )

    @classmethod
    def restore(cls, job: str, policy: BudgetPolicy, decisions: Iterable[Decision]) -> Ledger:
        """Rebuild a ledger from its stored decisions (any order)."""
        ledger = cls(job, policy)
        groups: dict[tuple[float, float], int] = {}
        for decision in sorted(decisions, key=lambda d: d.round):
            if decision.job != job:
                raise ValueError(f"decision for job {decision.job!r} in ledger of {job!r}")
            if decision.round in ledger._decisions:
                raise ValueError(f"round {decision.round} stored twice for job {job!r}")
            ledger._decisions[decision.round] = replace(decision, fresh=False)
            if decision.granted:
                key = (decision.q, decision.z)
                groups[key] = groups.get(key, 0) + 1
        ledger._account = RunningAccount.restore(Charge(q, z, n) for (q, z), n in groups.items())
        ledger._epsilon = ledger._account.epsilon(policy.delta)
        return ledger

    @property
    def epsilon(self) -> float:
        """PLD epsilon of the rounds granted so far."""
        return self._epsilon

    @property
    def rounds_granted(self) -> int:
        return self._account.rounds

    def decisions(self) -> list[Decision]:
        """Every decision so far, by round."""
        return [self._decisions[r] for r in sorted(self._decisions)]

    def get(self, round_no: int) -> Decision | None:
        return self._decisions.get(round_no)

    def decide(self, round_no: int, q: float, z: float, clip: float) -> Decision:
        """Grant or deny (round, q, z, clip). Changes nothing; see :meth:`apply`.

        A round already decided is answered from the ledger (``fresh=False``); the same round
        with other parameters raises ``CONFLICTING_REQUEST``.
        """
        check_request(self.job, round_no, q, z, clip)
        known = self._decisions.get(round_no)
        if known is not None:
            if not known.same_request(q, z, clip):
                raise PrivacyError(
                    CONFLICTING_REQUEST,
                    f"job {self.job!r} round {round_no} was decided for q={known.q}, z={known.z}, "
                    f"clip={known.clip}; now asked with q={q}, z={z}, clip={clip}",
                )
            return known
        composed = self._account.preview(q, z)
        requested = float(composed.get_epsilon_for_delta(self.policy.delta))
        granted = requested <= self.policy.epsilon
        self._pending = (round_no, float(q), float(z), composed) if granted else None
        rdp_after = self._account.epsilon_rdp(self.policy.delta, plus=(q, z) if granted else None)
        return Decision(
            job=self.job,
            round=round_no,
            q=float(q),
            z=float(z),
            clip=float(clip),
            granted=granted,
            reason=None if granted else BUDGET_EXHAUSTED,
            epsilon_total=requested if granted else self._epsilon,
            epsilon_requested=requested,
            epsilon_rdp=rdp_after,
            epsilon_before=self._epsilon,
            budget_epsilon=self.policy.epsilon,
            delta=self.policy.delta,
            rounds_granted=self.rounds_granted + (1 if granted else 0),
            fresh=True,
        )

    def apply(self, decision: Decision) -> None:
        """Record a fresh decision returned by :meth:`decide` on this ledger's current state."""
        if not decision.fresh:
            return
        if decision.job != self.job:
            raise ValueError(f"decision for job {decision.job!r} applied to ledger of {self.job!r}")
        if decision.round in self._decisions:
            raise ValueError(f"round {decision.round} of job {self.job!r} is already recorded")
        if decision.epsilon_before != self._epsilon:
            raise ValueError("decision was taken on another ledger state; decide again")
        if decision.granted:
            pending = self._pending
            composed = None
            if pending is not None and pending[:3] == (decision.round, decision.q, decision.z):
                composed = pending[3]
            self._account.charge(decision.q, decision.z, composed)
            self._epsilon = decision.epsilon_total
        self._pending = None
        self._decisions[decision.round] = replace(decision, fresh=False)
