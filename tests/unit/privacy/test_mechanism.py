"""DP-FedAvg mechanism: clipping bound, noise scale, sampling, adaptive clipping, local DP."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from qflare.privacy import (
    AdaptiveClipping,
    DPFedAvg,
    NoiseSource,
    PrivacyError,
    adaptive_sum_noise_multiplier,
    clip_l2,
    epsilon,
    local_dp_update,
    local_epsilon,
    noisy_clipped_sum,
    poisson_sample,
)


def test_clipping_bounds_every_contribution() -> None:
    rng = np.random.default_rng(7)
    clip = 0.75
    for scale in (1e-6, 0.1, 1.0, 10.0, 1e6, 1e30):
        for _ in range(50):
            vec = rng.standard_normal(int(rng.integers(1, 300))) * scale
            clipped, norm = clip_l2(vec, clip)
            assert np.linalg.norm(clipped) <= clip
            assert norm == pytest.approx(np.linalg.norm(vec))
            if norm <= clip:
                assert np.array_equal(clipped, vec)  # small updates pass unchanged
            else:
                assert np.allclose(clipped / np.linalg.norm(clipped), vec / norm)  # direction kept


def test_the_noisy_sum_moves_by_at_most_clip_when_one_client_is_added() -> None:
    rng = np.random.default_rng(3)
    others = [rng.standard_normal(50) * s for s in (0.1, 5.0, 100.0)]
    outlier = rng.standard_normal(50) * 1e9
    seed = 11
    without, _ = noisy_clipped_sum(others, 2.0, 1.0, NoiseSource(seed))
    with_one, _ = noisy_clipped_sum(others + [outlier], 2.0, 1.0, NoiseSource(seed))
    assert np.linalg.norm(with_one - without) <= 2.0 + 1e-9


def test_non_finite_updates_are_refused() -> None:
    with pytest.raises(PrivacyError):
        clip_l2(np.array([1.0, np.nan]), 1.0)
    with pytest.raises(PrivacyError):
        clip_l2(np.array([np.inf, 0.0]), 1.0)


@pytest.mark.parametrize("z,clip", [(1.0, 1.0), (0.5, 3.0), (2.5, 0.2)])
def test_empirical_noise_std_matches_z_times_clip(z: float, clip: float) -> None:
    dim = 200_000
    total, _ = noisy_clipped_sum([], clip, z, NoiseSource(seed=1234), dim=dim)
    # std of a sample std of n normals is about sigma / sqrt(2n): 0.16% here; allow 1%
    assert np.std(total) == pytest.approx(z * clip, rel=0.01)
    assert abs(np.mean(total)) < 5 * z * clip / math.sqrt(dim)


def test_dpfedavg_is_clipped_sum_plus_noise_over_expected_count() -> None:
    rng = np.random.default_rng(5)
    updates = [
        {
            "w": rng.standard_normal((4, 3)).astype(np.float32) * s,
            "b": rng.standard_normal(3).astype(np.float32),
        }
        for s in (0.1, 1.0, 30.0)
    ]
    mech = DPFedAvg(clip=1.5, noise_multiplier=0.8, expected_clients=4.0)
    result = mech(updates, NoiseSource(seed=99))
    vecs = [
        np.concatenate([u["b"].astype(np.float64), u["w"].astype(np.float64).ravel()])
        for u in updates
    ]
    clipped = sum(clip_l2(v, 1.5)[0] for v in vecs)
    noise = NoiseSource(seed=99).gaussian(0.8 * 1.5, (15,))
    expected = (clipped + noise) / 4.0
    assert result.mean["b"].dtype == np.float32 and result.mean["w"].shape == (4, 3)
    got = np.concatenate([result.mean["b"].astype(np.float64), result.mean["w"].ravel()])
    assert np.allclose(got, expected, atol=1e-6)
    assert result.sampled == 3 and result.clipped >= 1 and result.sum_noise_std == 0.8 * 1.5


def test_empty_sample_still_releases_noise() -> None:
    mech = DPFedAvg(clip=1.0, noise_multiplier=1.0, expected_clients=10.0)
    result = mech([], NoiseSource(seed=1), template=np.zeros(1000, dtype=np.float32))
    assert result.sampled == 0 and np.std(result.mean) > 0.05


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
    with pytest.raises(PrivacyError):
        adaptive_sum_noise_multiplier(1.0, 0.5)  # 2 * sigma_b must exceed z


def test_adaptive_clipping_tracks_the_target_quantile() -> None:
    rng = np.random.default_rng(2)
    adaptive = AdaptiveClipping(
        clip=0.1, target_quantile=0.5, learning_rate=0.2, count_noise_std=2.0, expected_clients=100
    )
    mech = DPFedAvg(clip=0.1, noise_multiplier=1.0, expected_clients=100, adaptive=adaptive)
    assert mech.sum_noise_multiplier == pytest.approx(adaptive_sum_noise_multiplier(1.0, 2.0))
    noise = NoiseSource(seed=4)
    for _ in range(150):
        updates = [rng.standard_normal(10) * rng.lognormal(0.0, 0.5) for _ in range(100)]
        mech(updates, noise)
    # norms are about sqrt(10) * lognormal(0, 0.5): median about 3.1
    assert 2.2 < mech.clip < 4.2


def test_local_dp_update_is_clipped_plus_noise_in_the_same_layout() -> None:
    update = {"w": np.full((300, 100), 10.0, dtype=np.float32)}
    out = local_dp_update(update, clip=1.0, noise_multiplier=2.0, noise=NoiseSource(seed=3))
    assert out["w"].shape == (300, 100) and out["w"].dtype == np.float32
    clipped_value = 1.0 / math.sqrt(30_000)
    assert np.mean(out["w"]) == pytest.approx(clipped_value, abs=5 * 2.0 / math.sqrt(30_000))
    assert np.std(out["w"]) == pytest.approx(2.0, rel=0.02)


def test_local_epsilon_uses_half_the_multiplier_without_amplification() -> None:
    assert local_epsilon(4.0, 10, 1e-5) == pytest.approx(epsilon(1.0, 2.0, 10, 1e-5))
    assert local_epsilon(4.0, 10, 1e-5) > epsilon(1.0, 4.0, 10, 1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(clip=0.0, noise_multiplier=1.0, expected_clients=1.0),
        dict(clip=1.0, noise_multiplier=-1.0, expected_clients=1.0),
        dict(clip=1.0, noise_multiplier=1.0, expected_clients=0.0),
    ],
)
def test_dpfedavg_checks_its_configuration(kwargs: dict) -> None:
    with pytest.raises(PrivacyError):
        DPFedAvg(**kwargs)


def test_mismatched_layouts_are_refused() -> None:
    mech = DPFedAvg(clip=1.0, noise_multiplier=1.0, expected_clients=2.0)
    with pytest.raises(PrivacyError):
        mech([{"a": np.zeros(3)}, {"a": np.zeros(4)}], NoiseSource(seed=1))
