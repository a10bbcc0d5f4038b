"""The accountant's pure decision core: many jobs, one :class:`~qflare.privacy.Ledger` each.

No I/O. The message shell (``service.py``) decodes a ``privacy.request``, asks
:meth:`AccountantCore.decide`, persists a fresh decision with
:class:`~qflare.services.accountant.store.LedgerStore`, calls :meth:`AccountantCore.apply`
and publishes ``privacy.granted`` / ``privacy.denied`` built from the decision
(:func:`granted_fields`, :func:`denied_fields`). A redelivered request is answered from the
ledger (``fresh=False``) and charges nothing; a request for a decided (job, round) with other
parameters raises ``PrivacyError(CONFLICTING_REQUEST)``.

A job's budget is fixed when its first request is decided: the store keeps it, and a
restarted accountant keeps deciding that job under the stored budget even if its own
configuration changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from qflare.privacy import BudgetPolicy, Decision, Ledger, PrivacyError, check_request
from qflare.privacy.errors import UNKNOWN_JOB

PolicyFor = Callable[[str], BudgetPolicy | None]


class AccountantCore:
    """Grant/deny decisions for every job the accountant has seen."""

    def __init__(self, policy_for: PolicyFor | BudgetPolicy) -> None:
        """``policy_for(job)`` gives a new job's budget (None: the job is unknown and every
        request for it is refused with ``UNKNOWN_JOB``); a single BudgetPolicy applies to all."""
        if isinstance(policy_for, BudgetPolicy):
            fixed = policy_for
            self._policy_for: PolicyFor = lambda _job: fixed
        else:
            self._policy_for = policy_for
        self._ledgers: dict[str, Ledger] = {}

    @classmethod
    def restore(
        cls,
        policy_for: PolicyFor | BudgetPolicy,
        jobs: Mapping[str, BudgetPolicy],
        decisions: Iterable[Decision],
    ) -> AccountantCore:
        """Rebuild from the store's jobs (with their stored budgets) and decisions."""
        core = cls(policy_for)
        by_job: dict[str, list[Decision]] = {job: [] for job in jobs}
        for decision in decisions:
            if decision.job not in by_job:
                raise ValueError(f"stored decision for job {decision.job!r} without a budget")
            by_job[decision.job].append(decision)
        for job, policy in jobs.items():
            core._ledgers[job] = Ledger.restore(job, policy, by_job[job])
        return core

    def ledger(self, job: str) -> Ledger | None:
        return self._ledgers.get(job)

    def jobs(self) -> dict[str, BudgetPolicy]:
        return {job: ledger.policy for job, ledger in self._ledgers.items()}

    def policy(self, job: str) -> BudgetPolicy:
        """The job's budget: stored if the job is known, else from configuration."""
        ledger = self._ledgers.get(job)
        if ledger is not None:
            return ledger.policy
        policy = self._policy_for(job)
        if policy is None:
            raise PrivacyError(UNKNOWN_JOB, f"no privacy budget configured for job {job!r}")
        return policy

    def decide(self, job: str, round_no: int, q: float, z: float, clip: float) -> Decision:
        """Grant or deny; changes nothing until :meth:`apply`."""
        check_request(job, round_no, q, z, clip)
        ledger = self._ledgers.get(job)
        if ledger is None:
            ledger = Ledger(job, self.policy(job))
        return ledger.decide(round_no, q, z, clip)

    def apply(self, decision: Decision) -> None:
        """Record a fresh decision after it was persisted."""
        if not decision.fresh:
            return
        ledger = self._ledgers.get(decision.job)
        if ledger is None:
            ledger = Ledger(decision.job, self.policy(decision.job))
            self._ledgers[decision.job] = ledger
        ledger.apply(decision)


def granted_fields(decision: Decision) -> dict[str, Any]:
    """Fields of a ``privacy.granted`` body (``qflare.messages.bodies.PrivacyGranted``)."""
    if not decision.granted:
        raise ValueError("decision is a denial")
    return {
        "epsilon_round": None,  # PLD epsilons do not add up; no per-round share is claimed
        "epsilon_total": decision.epsilon_total,
        "delta": decision.delta,
    }


def denied_fields(decision: Decision) -> dict[str, Any]:
    """Fields of a ``privacy.denied`` body (``qflare.messages.bodies.PrivacyDenied``)."""
    if decision.granted:
        raise ValueError("decision is a grant")
    return {
        "reason": decision.reason,
        "epsilon_spent": decision.epsilon_total,
        "budget": decision.budget_epsilon,
    }
