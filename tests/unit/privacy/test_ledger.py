"""Budget decisions: exact exhaustion, idempotent grants, conflicting repeats."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant

from qflare.messages.bodies import PrivacyDenied, PrivacyGranted
from qflare.privacy import (
    BUDGET_EXHAUSTED,
    CONFLICTING_REQUEST,
    INVALID_PARAMETERS,
    UNKNOWN_JOB,
    VALUE_DISCRETIZATION,
    BudgetPolicy,
    Ledger,
    PrivacyError,
    epsilon,
)
from qflare.services.accountant.core import AccountantCore, denied_fields, granted_fields

Q, Z, DELTA = 0.1, 1.0, 1e-5


def _fresh(rounds: int) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(
        value_discretization_interval=VALUE_DISCRETIZATION
    )
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(Z)), rounds
    )
    return float(accountant.get_epsilon(DELTA))


def _run(ledger: Ledger, round_no: int, q: float = Q, z: float = Z, clip: float = 1.0):
    decision = ledger.decide(round_no, q, z, clip)
    ledger.apply(decision)
    return decision


@pytest.mark.parametrize("allowed", [1, 7])
def test_refuses_exactly_the_first_round_that_would_exceed(allowed: int) -> None:
    # a budget strictly between epsilon(allowed) and epsilon(allowed + 1), from dp-accounting
    budget = (_fresh(allowed) + _fresh(allowed + 1)) / 2
    ledger = Ledger("job-a", BudgetPolicy(budget, DELTA))
    decisions = [_run(ledger, r) for r in range(allowed + 3)]
    assert [d.granted for d in decisions] == [True] * allowed + [False] * 3
    assert all(d.epsilon_total <= budget for d in decisions)
    first_denied = decisions[allowed]
    assert first_denied.reason == BUDGET_EXHAUSTED
    assert first_denied.epsilon_requested == pytest.approx(_fresh(allowed + 1), rel=1e-6)
    assert first_denied.epsilon_total == ledger.epsilon == pytest.approx(_fresh(allowed), rel=1e-6)
    assert ledger.rounds_granted == allowed
    # the RDP cross-check recorded with each grant is dp-accounting's RDP of the same rounds
    for k, granted in enumerate(decisions[:allowed], start=1):
        assert granted.epsilon_rdp == pytest.approx(epsilon(Q, Z, k, DELTA, method="rdp"), rel=1e-9)
        assert granted.epsilon_rdp >= granted.epsilon_total
    # a cheaper round may still fit after a denial: denials charge nothing
    cheap = _run(ledger, 100, q=Q, z=50.0)
    assert cheap.granted and cheap.epsilon_total <= budget


def test_budget_equal_to_epsilon_is_granted() -> None:
    ledger = Ledger("job", BudgetPolicy(_fresh(3), DELTA))
    assert [_run(ledger, r).granted for r in range(4)] == [True, True, True, False]


def test_repeated_request_is_answered_from_the_ledger_and_charged_once() -> None:
    ledger = Ledger("job", BudgetPolicy(5.0, DELTA))
    first = _run(ledger, 0)
    eps = ledger.epsilon
    again = ledger.decide(0, Q, Z, 1.0)
    assert again.fresh is False and again.granted
    ledger.apply(again)  # a stale-replay apply is a no-op
    assert ledger.epsilon == eps and ledger.rounds_granted == 1
    assert again.epsilon_total == first.epsilon_total


def test_repeat_of_a_denied_round_stays_denied() -> None:
    ledger = Ledger("job", BudgetPolicy(_fresh(1) * 1.001, DELTA))
    _run(ledger, 0)
    denied = _run(ledger, 1)
    assert not denied.granted
    assert ledger.decide(1, Q, Z, 1.0) == ledger.get(1)
    assert not ledger.decide(1, Q, Z, 1.0).fresh


@pytest.mark.parametrize("changed", [dict(q=0.2), dict(z=1.1), dict(clip=2.0)])
def test_repeat_with_other_parameters_is_an_error(changed: dict) -> None:
    ledger = Ledger("job", BudgetPolicy(5.0, DELTA))
    _run(ledger, 4)
    args = dict(q=Q, z=Z, clip=1.0) | changed
    with pytest.raises(PrivacyError) as info:
        ledger.decide(4, **args)
    assert info.value.reason == CONFLICTING_REQUEST
    assert ledger.rounds_granted == 1


def test_decide_changes_nothing_until_applied() -> None:
    ledger = Ledger("job", BudgetPolicy(5.0, DELTA))
    first = ledger.decide(0, Q, Z, 1.0)
    assert ledger.epsilon == 0.0 and ledger.get(0) is None
    ledger.apply(first)
    stale = ledger.decide(1, Q, Z, 1.0)
    ledger.apply(ledger.decide(2, Q, Z, 1.0))
    with pytest.raises(ValueError):
        ledger.apply(stale)  # decided on an older state


@pytest.mark.parametrize(
    "args",
    [
        dict(round_no=-1, q=Q, z=Z, clip=1.0),
        dict(round_no=0, q=0.0, z=Z, clip=1.0),
        dict(round_no=0, q=1.01, z=Z, clip=1.0),
        dict(round_no=0, q=Q, z=-1.0, clip=1.0),
        dict(round_no=0, q=Q, z=Z, clip=0.0),
        dict(round_no=0, q=Q, z=Z, clip=float("inf")),
        dict(round_no=True, q=Q, z=Z, clip=1.0),
    ],
    ids=["round<0", "q0", "q>1", "z<0", "clip0", "clipinf", "round-bool"],
)
def test_malformed_requests_are_typed_errors(args: dict) -> None:
    ledger = Ledger("job", BudgetPolicy(5.0, DELTA))
    with pytest.raises(PrivacyError) as info:
        ledger.decide(**args)
    assert info.value.reason == INVALID_PARAMETERS


@pytest.mark.parametrize("eps,delta", [(0.0, 1e-5), (-1.0, 1e-5), (1.0, 0.0), (1.0, 1.0)])
def test_bad_budget_is_rejected(eps: float, delta: float) -> None:
    with pytest.raises(PrivacyError):
        BudgetPolicy(eps, delta)


def test_core_keeps_jobs_apart_and_refuses_unknown_jobs() -> None:
    policies = {"a": BudgetPolicy(_fresh(2) * 1.0001, DELTA), "b": BudgetPolicy(5.0, DELTA)}
    core = AccountantCore(policies.get)
    for r in range(3):
        for job in ("a", "b"):
            core.apply(core.decide(job, r, Q, Z, 1.0))
    assert core.ledger("a").rounds_granted == 2 and core.ledger("b").rounds_granted == 3
    with pytest.raises(PrivacyError) as info:
        core.decide("c", 0, Q, Z, 1.0)
    assert info.value.reason == UNKNOWN_JOB


def test_decisions_fill_the_message_bodies() -> None:
    core = AccountantCore(BudgetPolicy(_fresh(1) * 1.0001, DELTA))
    granted = core.decide("j", 0, Q, Z, 1.0)
    core.apply(granted)
    denied = core.decide("j", 1, Q, Z, 1.0)
    body = PrivacyGranted(**granted_fields(granted), coverage="clipped_sum")
    assert body.epsilon_total == granted.epsilon_total and body.delta == DELTA
    refusal = PrivacyDenied(**denied_fields(denied), coverage="clipped_sum")
    assert refusal.reason == BUDGET_EXHAUSTED and refusal.epsilon_spent == granted.epsilon_total
    with pytest.raises(ValueError):
        granted_fields(denied)
