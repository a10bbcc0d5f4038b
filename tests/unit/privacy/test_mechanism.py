"""DP-FedAvg mechanism: clipping bound, noise scale, the denominator, sampling, adaptive
clipping, local DP. The round as production runs it (``aggregate_round``) is tested in
``tests/unit/services/test_aggregator_core.py``; these are the privacy core's own laws."""

from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from qflare.privacy import (
    AdaptiveClipping,
    NoiseSource,
    PrivacyError,
    adaptive_sum_noise_multiplier,
    clip_rows,
    default_count_noise_std,
    dp_fedavg,
    epsilon,
    fedavg_denominator,
    l2_norm,
    local_dp_update,
    local_epsilon,
    next_clip,
    poisson_sample,
)


def _mean(rows: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    return np.asarray(rows, dtype=np.float64).mean(axis=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_clipping_bounds_every_contribution(dtype: type) -> None:
    rng = np.random.default_rng(7)
    clip = 0.75
    # float32 rows are scaled by a float32 factor: the bound holds to float32 rounding
    slack = 1e-6 if dtype == np.float32 else 1e-12
    for scale in (1e-6, 0.1, 1.0, 10.0, 1e6, 1e30):
        x = (rng.standard_normal((50, int(rng.integers(1, 300)))) * scale).astype(dtype)
        before = x.copy()
        norms = clip_rows(x, clip)
        assert norms.dtype == np.float64
        assert np.allclose(norms, np.linalg.norm(before.astype(np.float64), axis=1), rtol=1e-6)
        for row, old, norm in zip(x, before, norms, strict=True):
            assert l2_norm(row) <= clip * (1 + slack)
            if norm <= clip:
                assert np.array_equal(row, old)  # small updates pass unchanged
            else:
                assert np.allclose(row / l2_norm(row), old / norm, rtol=1e-5)  # direction kept


def test_norms_are_the_same_bits_whatever_the_memory_layout() -> None:
    row = np.random.default_rng(1).standard_normal(100_003).astype(np.float32)
    strided = np.repeat(row, 2)[::2]
    assert l2_norm(row).hex() == l2_norm(strided).hex() == l2_norm(row.copy()).hex()


def test_non_finite_updates_are_refused() -> None:
    with pytest.raises(PrivacyError, match="update 1"):
        clip_rows(np.array([[1.0, 0.0], [1.0, np.nan]]), 1.0)
    with pytest.raises(PrivacyError):
        clip_rows(np.array([[np.inf, 0.0]], np.float32), 1.0)
    with pytest.raises(PrivacyError):
        clip_rows(np.zeros((1, 2)), 0.0)


def test_the_noisy_sum_moves_by_at_most_clip_when_one_client_is_added() -> None:
    rng = np.random.default_rng(3)
    others = np.stack([rng.standard_normal(50) * s for s in (0.1, 5.0, 100.0)])
    outlier = rng.standard_normal((1, 50)) * 1e9

    def noisy_sum(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        step = dp_fedavg(
            rows, _mean, clip=2.0, noise_multiplier=1.0, expected_clients=1.0, noise=NoiseSource(11)
        ).step
        return step

    without = noisy_sum(others.copy())
    with_one = noisy_sum(np.concatenate([others, outlier]))
    assert np.linalg.norm(with_one - without) <= 2.0 + 1e-9


@pytest.mark.parametrize(("z", "clip"), [(1.0, 1.0), (0.5, 3.0), (2.5, 0.2)])
def test_empirical_noise_std_matches_z_times_clip_also_with_nobody_kept(
    z: float, clip: float
) -> None:
    dim = 200_000
    step = dp_fedavg(
        np.empty((0, dim), np.float32),
        _mean,
        clip=clip,
        noise_multiplier=z,
        expected_clients=1.0,
        noise=NoiseSource(seed=1234),
    ).step
    # std of a sample std of n normals is about sigma / sqrt(2n): 0.16% here; allow 1%
    assert np.std(step) == pytest.approx(z * clip, rel=0.01)
    assert abs(np.mean(step)) < 5 * z * clip / math.sqrt(dim)


def test_dp_fedavg_is_clipped_sum_plus_noise_over_the_fixed_denominator() -> None:
    rng = np.random.default_rng(5)
    rows = np.stack([rng.standard_normal(15) * s for s in (0.1, 1.0, 30.0)]).astype(np.float32)
    clipped = rows.astype(np.float64)
    for row in clipped:
        row *= min(1.0, 1.5 / np.linalg.norm(row))
    expected = (clipped.sum(axis=0) + NoiseSource(99).gaussian(0.8 * 1.5, (15,))) / 4.0
    got = dp_fedavg(
        rows, _mean, clip=1.5, noise_multiplier=0.8, expected_clients=4.0, noise=NoiseSource(99)
    )
    assert np.allclose(got.step, expected, atol=1e-6)
    assert got.next_clip == 1.5 and got.norms.shape == (3,) and got.norms[2] > 1.5


@pytest.mark.parametrize(
    ("z", "kept", "expected", "denominator"),
    [
        pytest.param(0.0, 3, 10.0, 3.0, id="dp-off-divides-by-kept"),
        pytest.param(0.0, 0, 10.0, 1.0, id="dp-off-nobody-kept"),
        pytest.param(1.0, 3, 10.0, 10.0, id="dp-on-fixed-denominator"),
        pytest.param(1.0, 0, 10.0, 10.0, id="dp-on-nobody-kept"),
    ],
)
def test_fedavg_denominator(z: float, kept: int, expected: float, denominator: float) -> None:
    assert fedavg_denominator(kept, expected, z) == denominator


def test_a_robust_rule_leaving_the_ball_is_clipped_back() -> None:
    # every row inside the ball, but the coordinate-wise max is not
    rows = np.eye(4, dtype=np.float32)
    got = dp_fedavg(
        rows,
        lambda x: np.max(x, axis=0),
        clip=1.0,
        noise_multiplier=0.0,
        expected_clients=1.0,
        noise=NoiseSource(1),
    )
    assert l2_norm(got.step) == pytest.approx(1.0)  # (1,1,1,1) clipped to 1, times 4, over 4


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(clip=0.0, noise_multiplier=1.0, expected_clients=1.0),
        dict(clip=1.0, noise_multiplier=-1.0, expected_clients=1.0),
        dict(clip=1.0, noise_multiplier=1.0, expected_clients=0.0),
        dict(clip=1.0, noise_multiplier=0.0, expected_clients=-1.0),
        dict(clip=1.0, noise_multiplier=math.nan, expected_clients=1.0),
    ],
    ids=["clip-0", "z-negative", "expected-0", "expected-negative-dp-off", "z-nan"],
)
def test_dp_fedavg_checks_its_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(PrivacyError):
        dp_fedavg(np.zeros((2, 3)), _mean, noise=NoiseSource(1), **kwargs)


def test_combine_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="combine returned"):
        dp_fedavg(
            np.zeros((2, 3)),
            lambda x: np.zeros(4),
            clip=1.0,
            noise_multiplier=0.0,
            expected_clients=1.0,
            noise=NoiseSource(1),
        )


def test_poisson_sampling_includes_each_client_at_rate_q() -> None:
    clients = [f"c{i}" for i in range(20_000)]
    chosen = poisson_sample(clients, 0.1, NoiseSource(seed=8))
    # binomial(20000, 0.1): sd = 42.4; 5 sd
    assert abs(len(chosen) - 2000) < 5 * math.sqrt(20_000 * 0.1 * 0.9)
    picked = set(chosen)
    assert chosen == [c for c in clients if c in picked]  # order kept
    sizes = {len(poisson_sample(clients[:50], 0.5, NoiseSource(seed=s))) for s in range(20)}
    assert len(sizes) > 1  # the sample size itself is random, unlike fixed-size sampling
    with pytest.raises(PrivacyError):
        poisson_sample(clients, 0.0, NoiseSource(seed=1))


def test_seed_is_hidden_and_noise_source_is_not_picklable() -> None:
    secret_seed = 987654321987654321
    source = NoiseSource(secret_seed)
    assert str(secret_seed) not in repr(source) and "seed hidden" in repr(source)
    with pytest.raises(TypeError):
        pickle.dumps(source)
    # unseeded sources draw their seed from the OS: two never agree
    assert not np.array_equal(NoiseSource().gaussian(1.0, (8,)), NoiseSource().gaussian(1.0, (8,)))


def test_adaptive_split_composes_back_to_z() -> None:
    z, sigma_b = 1.0, 5.0
    z_delta = adaptive_sum_noise_multiplier(z, sigma_b)
    assert z_delta > z
    assert (z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    with pytest.raises(PrivacyError, match=r"above 0\.5"):
        adaptive_sum_noise_multiplier(1.0, 0.5)  # 2 * sigma_b must exceed z
    adaptive = AdaptiveClipping(count_noise_std=sigma_b)
    assert adaptive.sum_noise_multiplier(z) == z_delta and adaptive.sum_noise_multiplier(0.0) == 0
    assert default_count_noise_std(100.0) == 5.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(count_noise_std=0.0),
        dict(count_noise_std=1.0, target_quantile=0.0),
        dict(count_noise_std=1.0, target_quantile=1.0),
        dict(count_noise_std=1.0, learning_rate=0.0),
    ],
    ids=["sigma-0", "quantile-0", "quantile-1", "lr-0"],
)
def test_adaptive_clipping_checks_its_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(PrivacyError):
        AdaptiveClipping(**kwargs)


def test_next_clip_is_a_pure_function_of_clip_norms_and_noise() -> None:
    adaptive = AdaptiveClipping(count_noise_std=2.0, target_quantile=0.5, learning_rate=0.2)
    norms = np.array([0.5, 1.5, 2.5, 3.5])
    kw: dict[str, Any] = dict(adaptive=adaptive, expected_clients=4.0, noise_multiplier=1.0)
    a = next_clip(1.0, norms, noise=NoiseSource(5), **kw)
    assert a == next_clip(1.0, norms, noise=NoiseSource(5), **kw)
    noise = float(NoiseSource(5).gaussian(2.0, (1,))[0])
    b_hat = (1 - 0.5 * 4 + noise) / 4.0 + 0.5
    assert a == pytest.approx(math.exp(-0.2 * (b_hat - 0.5)))
    # DP off: the exact fraction below (1 of 4): the clip grows towards the median
    off = next_clip(1.0, norms, noise=NoiseSource(5), **{**kw, "noise_multiplier": 0.0})
    assert off == pytest.approx(math.exp(-0.2 * (0.25 - 0.5)))
    assert next_clip(1.0, [], noise=NoiseSource(5), **{**kw, "noise_multiplier": 0.0}) == 1.0
    # a fixed clip (no adaptive clipping): the same clip, and nothing drawn
    fixed = NoiseSource(5)
    assert next_clip(1.0, norms, noise=fixed, **{**kw, "adaptive": None}) == 1.0
    assert float(fixed.gaussian(2.0, (1,))[0]) == noise


def test_adaptive_clipping_tracks_the_target_quantile() -> None:
    rng = np.random.default_rng(2)
    adaptive = AdaptiveClipping(count_noise_std=2.0, target_quantile=0.5, learning_rate=0.2)
    clip, noise, count_noise = 0.1, NoiseSource(seed=4), NoiseSource(seed=5)
    for _ in range(150):
        rows = np.stack([rng.standard_normal(10) * rng.lognormal(0.0, 0.5) for _ in range(100)])
        clip = dp_fedavg(
            rows,
            _mean,
            clip=clip,
            noise_multiplier=1.0,
            expected_clients=100.0,
            noise=noise,
            adaptive=adaptive,
            clip_noise=count_noise,
        ).next_clip
    # norms are about sqrt(10) * lognormal(0, 0.5): median about 3.1
    assert 2.2 < clip < 4.2


def test_adaptive_with_dp_on_noises_the_sum_with_z_delta_and_needs_count_noise() -> None:
    adaptive = AdaptiveClipping(count_noise_std=1.0)
    kw: dict[str, Any] = dict(clip=1.0, noise_multiplier=1.0, expected_clients=1.0)
    got = dp_fedavg(
        np.empty((0, 100_000)),
        _mean,
        noise=NoiseSource(3),
        adaptive=adaptive,
        clip_noise=NoiseSource(4),
        **kw,
    ).step
    z_delta = adaptive_sum_noise_multiplier(1.0, 1.0)
    assert np.std(got) == pytest.approx(z_delta, rel=0.01) and z_delta > 1.1
    with pytest.raises(ValueError, match="clip_noise"):
        dp_fedavg(np.zeros((1, 3)), _mean, noise=NoiseSource(3), adaptive=adaptive, **kw)


def test_local_dp_update_is_clipped_plus_noise_in_the_same_layout() -> None:
    update = {"w": np.full((300, 100), 10.0, dtype=np.float32), "b": np.zeros(3, np.float16)}
    out = local_dp_update(update, clip=1.0, noise_multiplier=2.0, noise=NoiseSource(seed=3))
    assert out["w"].shape == (300, 100) and out["w"].dtype == np.float32
    assert out["b"].shape == (3,) and out["b"].dtype == np.float16
    clipped_value = 1.0 / math.sqrt(30_000)
    assert np.mean(out["w"]) == pytest.approx(clipped_value, abs=5 * 2.0 / math.sqrt(30_000))
    assert np.std(out["w"]) == pytest.approx(2.0, rel=0.02)


def test_local_epsilon_uses_half_the_multiplier_without_amplification() -> None:
    assert local_epsilon(4.0, 10, 1e-5) == pytest.approx(epsilon(1.0, 2.0, 10, 1e-5))
    assert local_epsilon(4.0, 10, 1e-5) > epsilon(1.0, 4.0, 10, 1e-5)
