"""Accounting agrees with published values and with fresh dp-accounting computations."""

from __future__ import annotations

import functools
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

from qflare.privacy import (
    INVALID_PARAMETERS,
    Charge,
    PrivacyError,
    RunningAccount,
    epsilon,
    filtered_noise_multiplier,
    plan_noise,
    plan_rounds,
)

# TF-Privacy's MNIST DP-SGD tutorial, tutorials/README.md of tensorflow/privacy
# ("Select Parameters" table and compute_dp_sgd_privacy.py example, 2019): N = 60000,
# batch 256, delta = 1e-5, epsilon reported by its RDP accountant with the orders
# [1 + x/10 for x in 1..99] + [12..63], steps = ceil(epochs * N / batch), and the classic
# RDP -> (eps, delta) conversion eps = min_a (rdp(a) - log(delta) / (a - 1)).
#   noise 1.1, 60 epochs -> eps 3.01 ("DP-SGD run with default parameters satisfies
#   differential privacy with eps = 3.01 and delta = 1e-05")
#   noise 1.3, 15 epochs -> 1.19;  noise 0.7, 45 epochs -> 7.10
TF_PRIVACY_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
MNIST = [(1.1, 60, 3.01), (1.3, 15, 1.19), (0.7, 45, 7.10)]


def _mnist_steps(epochs: int) -> tuple[float, int]:
    return 256 / 60000, math.ceil(epochs * 60000 / 256)


@pytest.mark.parametrize("z,epochs,published", MNIST, ids=lambda v: str(v))
def test_tf_privacy_mnist_table_under_its_own_accounting(
    z: float, epochs: int, published: float
) -> None:
    q, steps = _mnist_steps(epochs)
    accountant = rdp_privacy_accountant.RdpAccountant(orders=TF_PRIVACY_ORDERS)
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
    )
    rdp = np.asarray(accountant._rdp)
    classic = float(np.min(rdp - math.log(1e-5) / (np.asarray(TF_PRIVACY_ORDERS) - 1)))
    assert round(classic, 2) == published


@pytest.mark.parametrize("z,epochs,published", MNIST, ids=lambda v: str(v))
def test_mnist_tighter_accountants_stay_below_published(
    z: float, epochs: int, published: float
) -> None:
    """dp-accounting's RDP (more orders, tighter conversion) and PLD give smaller epsilons for
    the same mechanism, PLD the smallest: e.g. 2.597 (RDP) and 2.38 (PLD) for the 3.01 row."""
    q, steps = _mnist_steps(epochs)
    ours_rdp = epsilon(q, z, steps, 1e-5, method="rdp")
    fresh = rdp_privacy_accountant.RdpAccountant()
    fresh.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    assert ours_rdp == pytest.approx(fresh.get_epsilon(1e-5), rel=1e-12)
    ours_pld = epsilon(q, z, steps, 1e-5)
    assert ours_pld < ours_rdp < published
    assert ours_pld > 0.7 * published  # same mechanism, not a different one


@functools.cache
def _fresh_round_pld(q: float, z: float) -> privacy_loss_distribution.PrivacyLossDistribution:
    # Exactly what PLDAccountant.compose builds for PoissonSampled(Gaussian) at its default
    # discretisation (1e-4); cached so the grid pays for each (q, z) once.
    return privacy_loss_distribution.from_gaussian_mechanism(z, sampling_prob=q)


def _fresh_pld(events: list[tuple[float, float, int]], delta: float) -> float:
    """dp-accounting's PLD at its default discretisation, composed from scratch."""
    total = None
    for q, z, count in events:
        group = _fresh_round_pld(q, z).self_compose(count)
        total = group if total is None else total.compose(group)
    return float(total.get_epsilon_for_delta(delta))


def test_fresh_helper_is_the_pld_accountant() -> None:
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(2.0)), 7
    )
    assert _fresh_pld([(0.1, 2.0, 7)], 1e-5) == pytest.approx(
        accountant.get_epsilon(1e-5), rel=1e-8
    )


@pytest.mark.parametrize(
    "q,z", [(q, z) for q in (0.01, 0.1) for z in (1.0, 2.0)], ids=lambda v: str(v)
)
def test_incremental_path_within_one_percent_of_fresh_pld(q: float, z: float) -> None:
    account = RunningAccount()
    for rounds in range(1, 41):
        account.charge(q, z, account.preview(q, z))
        if rounds not in (1, 3, 40):
            continue
        for delta in (1e-5, 1e-8):
            fresh = _fresh_pld([(q, z, rounds)], delta)
            ours = account.epsilon(delta)
            assert ours == pytest.approx(fresh, rel=0.01), (rounds, delta)
            assert ours >= fresh * (1 - 1e-6)  # coarser grid, still pessimistic: never below


@pytest.mark.parametrize("q,z,rounds", [(0.01, 1.0, 1000), (0.1, 2.0, 300)], ids=lambda v: str(v))
def test_restored_and_closed_form_paths_within_one_percent(q: float, z: float, rounds: int) -> None:
    restored = RunningAccount.restore([Charge(q, z, rounds)])
    for delta in (1e-5, 1e-7):
        fresh = _fresh_pld([(q, z, rounds)], delta)
        assert epsilon(q, z, rounds, delta) == pytest.approx(fresh, rel=0.01)
        assert restored.epsilon(delta) == pytest.approx(fresh, rel=0.01)


def test_heterogeneous_rounds_compose_like_fresh_accountant() -> None:
    schedule = [(0.01, 1.0), (0.1, 2.0), (0.01, 2.0)] * 10
    account = RunningAccount()
    for q, z in schedule:
        account.charge(q, z, account.preview(q, z))
    # composition commutes, so the fresh accountant may take each (q, z) group at once
    fresh = _fresh_pld([(0.01, 1.0, 10), (0.1, 2.0, 10), (0.01, 2.0, 10)], 1e-6)
    assert account.epsilon(1e-6) == pytest.approx(fresh, rel=0.01)
    regrouped = RunningAccount.restore(
        [Charge(0.01, 1.0, 10), Charge(0.1, 2.0, 10), Charge(0.01, 2.0, 10)]
    )
    assert regrouped.epsilon(1e-6) == pytest.approx(account.epsilon(1e-6), rel=1e-6)
    # the RDP cross-check is an upper bound of the same composition
    assert account.epsilon_rdp(1e-6) >= account.epsilon(1e-6)


# plan_noise's "smallest z that fits" is checked through the CLI in test_cli.py.
def test_plan_rounds_is_the_most_that_fit() -> None:
    rounds = plan_rounds(1.0, 1e-5, 0.02, 1.2)
    assert rounds > 1
    assert epsilon(0.02, 1.2, rounds, 1e-5) <= 1.0 < epsilon(0.02, 1.2, rounds + 1, 1e-5)
    assert plan_rounds(0.01, 1e-5, 1.0, 0.5) == 0  # not even one round


def test_filtered_noise_multiplier_scales_by_sensitivity() -> None:
    assert filtered_noise_multiplier(3.0, 0) == 3.0
    assert filtered_noise_multiplier(3.0, 1) == pytest.approx(1.0)
    with pytest.raises(PrivacyError):
        filtered_noise_multiplier(3.0, -1)


@pytest.mark.parametrize(
    "call",
    [
        lambda: epsilon(0.0, 1.0, 10, 1e-5),
        lambda: epsilon(1.5, 1.0, 10, 1e-5),
        lambda: epsilon(0.1, 0.0, 10, 1e-5),
        lambda: epsilon(0.1, float("nan"), 10, 1e-5),
        lambda: epsilon(0.1, 1.0, -1, 1e-5),
        lambda: epsilon(0.1, 1.0, 10, 0.0),
        lambda: epsilon(0.1, 1.0, 10, 1.0),
        lambda: plan_noise(0.0, 1e-5, 0.1, 10),
        lambda: plan_noise(1.0, 1e-5, 0.1, 0),
        lambda: plan_rounds(1.0, 1e-5, 0.1, -2.0),
    ],
    ids=["q0", "q>1", "z0", "znan", "T<0", "delta0", "delta1", "eps0", "plan-T0", "plan-z<0"],
)
def test_invalid_parameters_are_typed_errors(call) -> None:
    with pytest.raises(PrivacyError) as info:
        call()
    assert info.value.reason == INVALID_PARAMETERS


def test_zero_rounds_cost_nothing() -> None:
    assert epsilon(0.1, 1.0, 0, 1e-5) == 0.0
    assert RunningAccount().epsilon(1e-5) == 0.0
