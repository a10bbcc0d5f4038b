"""Local DP by the Laplace mechanism: its scale, clipping and accounting against the
mechanism's formula (b = 2C / epsilon: two inputs of one client, each clipped to the L1 ball
of radius C, differ by at most 2C in L1), and a refusal for every bad parameter."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from scipy import stats

from qflare.privacy import (
    INVALID_PARAMETERS,
    LocalLaplace,
    NoiseSource,
    PrivacyError,
    clip_l1,
    l1_norm,
    laplace_epsilon,
    laplace_scale,
    local_laplace_update,
)


class _NoNoise(NoiseSource):
    """What the mechanism sends before the noise: the clipped update."""

    def laplace(self, scale: float, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape)


@pytest.mark.parametrize(
    ("clip", "epsilon", "scale"),
    [(1.0, 1.0, 2.0), (0.5, 2.0, 0.5), (3.0, 0.1, 60.0), (0.25, 4.0, 0.125)],
    ids=["C1-eps1", "C0.5-eps2", "C3-eps0.1", "C0.25-eps4"],
)
def test_the_scale_is_twice_the_clip_over_epsilon(clip: float, epsilon: float, scale) -> None:
    assert laplace_scale(clip, epsilon) == pytest.approx(scale, rel=1e-15)
    assert LocalLaplace(epsilon=epsilon, clip=clip).scale == pytest.approx(scale, rel=1e-15)


@pytest.mark.parametrize(
    ("clip", "epsilon"), [(0.5, 1.0), (0.1, 0.25), (2.0, 8.0)], ids=["b=1", "b=0.8", "b=0.5"]
)
def test_the_noise_has_the_formulas_scale(clip: float, epsilon: float) -> None:
    """A zero update (inside any clip) released on 200000 coordinates: the noise alone.
    Laplace(b): mean 0, mean absolute deviation b, variance 2 b^2; with n = 2e5 the sample
    MAD has relative standard error 1/sqrt(n) = 0.22%, so 1.5% is about 7 standard errors,
    while the scale of the other common convention (C / epsilon) is off by 50%."""
    n = 200_000
    b = 2 * clip / epsilon
    update = {"w": np.zeros((400, 250)), "b": np.zeros(100_000)}
    out = local_laplace_update(update, clip, epsilon, NoiseSource(seed=20240601))
    assert out["w"].shape == (400, 250) and out["b"].shape == (100_000,)
    noise = np.concatenate([out["b"].ravel(), out["w"].ravel()])
    assert noise.size == n
    assert np.mean(np.abs(noise)) == pytest.approx(b, rel=0.015)
    assert abs(np.mean(noise)) < 6 * math.sqrt(2) * b / math.sqrt(n)
    assert np.var(noise) == pytest.approx(2 * b * b, rel=0.05)
    # and the shape of the distribution is Laplace's (a fixed seed: a fixed p-value)
    assert stats.kstest(noise, "laplace", args=(0.0, b)).pvalue > 1e-3
    assert stats.kstest(noise, "laplace", args=(0.0, b / 2)).pvalue < 1e-12


def test_the_clipping_bound_holds_and_keeps_the_direction() -> None:
    rng = np.random.default_rng(5)
    update = {
        "a": rng.normal(0, 10, (30, 20)).astype(np.float32),
        "b": rng.normal(0, 10, 7).astype(np.float32),
    }
    flat = np.concatenate([update["a"].ravel(), update["b"].ravel()]).astype(np.float64)
    sent = local_laplace_update(update, 1.5, 1.0, _NoNoise())
    assert {k: (v.shape, v.dtype) for k, v in sent.items()} == {
        k: (v.shape, v.dtype) for k, v in update.items()
    }
    released = np.concatenate([sent["a"].ravel(), sent["b"].ravel()]).astype(np.float64)
    assert l1_norm(released) <= 1.5 * (1 + 1e-6)  # float32 rounding of the sent tensors
    np.testing.assert_allclose(released, flat * (1.5 / np.abs(flat).sum()), rtol=1e-6)
    # the vector form, in float64: exactly the bound, the norm before returned
    vec = flat.copy()
    assert clip_l1(vec, 1.5) == pytest.approx(np.abs(flat).sum())
    assert l1_norm(vec) <= 1.5 * (1 + 1e-12)
    # an update already inside the ball is not scaled
    inside = np.array([0.1, -0.2, 0.3])
    assert clip_l1(inside, 1.0) == pytest.approx(0.6)
    np.testing.assert_array_equal(inside, [0.1, -0.2, 0.3])


def test_releases_compose_by_summing_their_epsilons() -> None:
    mech = LocalLaplace(epsilon=0.5, clip=1.0, seed=1)
    update = {"w": np.ones(4, np.float32)}
    for job, rnd in [("a", 1), ("a", 2), ("b", 1), ("a", 3)]:
        mech(update, job=job, round=rnd)
    account = mech.account()
    assert len(account.releases) == 4 and account.epsilon_per_release == 0.5
    assert account.epsilon == pytest.approx(2.0)
    assert account.epsilon_of("a") == pytest.approx(1.5)
    assert account.epsilon_of("b") == pytest.approx(0.5)
    assert account.epsilon_of("c") == 0.0
    assert laplace_epsilon([0.5, 0.25, 1.0]) == pytest.approx(1.75)
    assert laplace_epsilon([]) == 0.0
    report = account.report(central_epsilon=3.2, central_delta=1e-5)
    assert report["local"] == {
        "mechanism": "laplace",
        "epsilon_per_release": 0.5,
        "releases": 4,
        "epsilon": 2.0,
        "delta": 0.0,
        "clip_l1": 1.0,
        "composition": "basic",
        "protects_against": "everyone who sees the updates, the server included",
    }
    assert report["central"]["epsilon"] == 3.2 and report["central"]["delta"] == 1e-5
    assert account.report()["central"] is None


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("releases", [1, 10])
def test_the_sum_agrees_with_dp_accountings_laplace_event(epsilon: float, releases: int) -> None:
    """dp-accounting's Laplace event takes b / sensitivity = (2C / epsilon) / 2C = 1 /
    epsilon; at a vanishing delta its PLD epsilon is the pure epsilon, and k releases
    compose to k epsilon (basic composition is tight for pure DP at delta = 0)."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_accounting.LaplaceDpEvent(1.0 / epsilon), releases)
    total = laplace_epsilon([epsilon] * releases)
    assert accountant.get_epsilon(1e-12) == pytest.approx(total, rel=1e-6)
    assert accountant.get_epsilon(1e-5) <= total


def test_a_seed_reproduces_the_release_and_stays_hidden() -> None:
    update = {"w": np.arange(5, dtype=np.float32)}
    a = LocalLaplace(epsilon=1.0, clip=2.0, seed=7)(update)
    b = LocalLaplace(epsilon=1.0, clip=2.0, seed=7)(update)
    c = LocalLaplace(epsilon=1.0, clip=2.0, seed=8)(update)
    np.testing.assert_array_equal(a["w"], b["w"])
    assert not np.array_equal(a["w"], c["w"])
    assert (
        repr(LocalLaplace(epsilon=1.0, clip=2.0, seed=7)) == "LocalLaplace(epsilon=1.0, clip=2.0)"
    )


BAD_NUMBERS = [0, 0.0, -1.0, math.nan, math.inf, True, "1", None]


@pytest.mark.parametrize("epsilon", BAD_NUMBERS, ids=repr)
def test_a_bad_epsilon_is_refused(epsilon) -> None:
    for call in (
        lambda: LocalLaplace(epsilon=epsilon, clip=1.0),
        lambda: laplace_scale(1.0, epsilon),
        lambda: local_laplace_update({"w": np.zeros(2)}, 1.0, epsilon),
        lambda: laplace_epsilon([1.0, epsilon]),
    ):
        with pytest.raises(PrivacyError) as err:
            call()
        assert err.value.reason == INVALID_PARAMETERS and "epsilon" in str(err.value)


@pytest.mark.parametrize("clip", BAD_NUMBERS, ids=repr)
def test_a_bad_clip_is_refused(clip) -> None:
    for call in (
        lambda: LocalLaplace(epsilon=1.0, clip=clip),
        lambda: laplace_scale(clip, 1.0),
        lambda: local_laplace_update({"w": np.zeros(2)}, clip, 1.0),
        lambda: clip_l1(np.zeros(2), clip),
    ):
        with pytest.raises(PrivacyError) as err:
            call()
        assert err.value.reason == INVALID_PARAMETERS and "clip" in str(err.value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_update_is_refused_not_clipped(value: float) -> None:
    with pytest.raises(PrivacyError, match="non-finite"):
        local_laplace_update({"w": np.array([1.0, value])}, 1.0, 1.0, NoiseSource(1))


@pytest.mark.parametrize("seed", [-1, 1.5, True, "7"], ids=repr)
def test_a_bad_seed_is_refused(seed) -> None:
    with pytest.raises(TypeError, match="seed must be a non-negative int"):
        LocalLaplace(epsilon=1.0, clip=1.0, seed=seed)
