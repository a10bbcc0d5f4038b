"""Adaptive clipping in production (docs/privacy.md, "Adaptive clipping"): the job's settings,
checked once; the round machine carrying each round's clip into its request, announcement
and aggregation; the core moving the clip towards the target quantile; the store keeping a
round's clip and the clip its aggregation gave the next round."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from qflare.errors import ConfigError
from qflare.messages.jobs import JobSpec
from qflare.messages.tensors import Layout
from qflare.privacy import adaptive_sum_noise_multiplier, epsilon
from qflare.privacy.policy import (
    adaptive_clipping,
    adaptive_of,
    charge_of,
    expected_participants,
    sum_noise_multiplier,
)
from qflare.runtime.config import load_settings
from qflare.services.aggregator.core import (
    Aggregate,
    Announce,
    Granted,
    RequestPrivacy,
    RoundState,
    Verdict,
    aggregate,
    begin,
    round_noise,
    step,
)
from qflare.services.aggregator.store import AggregatorStore
from qflare.sim.config import SimConfig, SimConfigError, validate

CLIENTS = tuple(f"c{i:03d}" for i in range(100))


def spec(**kw: Any) -> JobSpec:
    base: dict[str, Any] = dict(
        job_id="j",
        rounds=100,
        participants=CLIENTS,
        rule="mean",
        detection=False,
        noise_multiplier=1.0,
        clip=0.05,
        adaptive_clip=True,
        seed=11,
    )
    return JobSpec.model_validate({**base, **kw})


def updates_with_norms(norms: np.ndarray, dim: int = 4, seed: int = 0) -> dict[str, Any]:
    """One update per client, in random directions, with exactly these L2 norms."""
    rng = np.random.default_rng(seed)
    out = {}
    for c, norm in zip(CLIENTS, norms, strict=False):
        v = rng.standard_normal(dim)
        out[c] = {"w": (norm * v / np.linalg.norm(v)).astype(np.float32)}
    return out


BASE = {"w": np.zeros(4, np.float32)}


def run_rounds(s: JobSpec, updates: dict[str, Any], rounds: int) -> list[float]:
    """The clips of ``rounds`` rounds of ``s`` over the same updates, each round at the
    clip the previous one gave."""
    clips = [s.clip]
    kept = tuple(sorted(updates))
    for n in range(1, rounds + 1):
        result = aggregate(s, Aggregate(n, n - 1, kept, (), (), clips[-1]), BASE, updates)
        clips.append(result.next_clip)
    return clips


# -- the core -------------------------------------------------------------------------------


@pytest.mark.parametrize("quantile", [0.5, 0.8])
@pytest.mark.parametrize("start", [0.05, 5.0])
def test_the_clip_moves_to_the_target_quantile_of_the_norms(quantile: float, start: float) -> None:
    norms = np.random.default_rng(1).lognormal(mean=0.0, sigma=0.5, size=len(CLIENTS))
    s = spec(clip=start, clip_target_quantile=quantile)
    clips = run_rounds(s, updates_with_norms(norms), 120)
    # geometric steps of at most exp(0.2 * 0.5) per round: from far away it moves every round
    # in one direction, then settles where the (noised) unclipped fraction meets the target
    first = clips[1:11]
    assert all((b > a) if start < 1 else (b < a) for a, b in zip(clips, first, strict=False))
    settled = np.array(clips[80:])
    unclipped = np.mean([np.mean(norms <= c) for c in settled])
    assert unclipped == pytest.approx(quantile, abs=0.08)
    assert np.median(settled) == pytest.approx(np.quantile(norms, quantile), rel=0.25)


def test_dp_off_the_clip_follows_the_exact_fraction() -> None:
    norms = np.linspace(0.15, 9.95, len(CLIENTS))  # none near the clip 1.0
    s = spec(noise_multiplier=0.0, clip=1.0)
    clips = run_rounds(s, updates_with_norms(norms), 3)
    below = np.mean(norms <= 1.0)
    assert clips[1] == pytest.approx(math.exp(-0.2 * (below - 0.5)), rel=1e-12)


def test_the_same_inputs_give_the_same_model_and_clip_bit_for_bit() -> None:
    s = spec()
    updates = updates_with_norms(np.linspace(0.01, 0.2, len(CLIENTS)), seed=3)
    kept = tuple(sorted(updates))
    one = aggregate(s, Aggregate(7, 6, kept, (), (), 0.08), BASE, updates)
    again = aggregate(s, Aggregate(7, 6, kept[::-1], (), (), 0.08), BASE, dict(updates))
    assert np.array_equal(one.model["w"], again.model["w"]) and one.next_clip == again.next_clip
    # another round of the same job draws other noise (the (job, round) streams)
    other = aggregate(s, Aggregate(8, 6, kept, (), (), 0.08), BASE, updates)
    assert not np.array_equal(one.model["w"], other.model["w"])
    assert other.next_clip != one.next_clip


def test_the_update_sum_takes_z_delta_and_the_round_is_charged_z() -> None:
    s = spec()
    sigma_b = expected_participants(1.0, 100) / 20  # the paper's default: 5
    z_delta = adaptive_sum_noise_multiplier(1.0, sigma_b)
    assert sum_noise_multiplier(s) == z_delta > 1.0
    adaptive = adaptive_of(s)
    assert adaptive is not None and adaptive.count_noise_std == sigma_b
    assert (charge_of(s).q, charge_of(s).z) == (1.0, 1.0)
    updates = updates_with_norms(np.full(len(CLIENTS), 0.01))  # all inside clip 0.05
    kept = tuple(sorted(updates))
    result = aggregate(s, Aggregate(3, 2, kept, (), (), 0.05), BASE, updates)
    total = np.sum([Layout.of(u).flatten(u, dtype=np.float64) for u in updates.values()], axis=0)
    noise = round_noise(s.seed, "j", 3, 2).gaussian(z_delta * 0.05, (4,))
    assert np.allclose(result.model["w"], (total + noise) / 100.0, rtol=1e-6, atol=1e-9)


# -- the round machine --------------------------------------------------------------------


def test_a_rounds_clip_is_in_its_request_announcement_and_aggregation() -> None:
    s = spec(participants=CLIENTS[:40], clip=1.0)
    r, effects = begin(s, 4, 3, 0.0, clip=0.37)
    charge = charge_of(s)
    assert r.clip == 0.37
    assert effects == (RequestPrivacy(charge.q, charge.z, 0.37, charge.coverage),)
    r, effects = step(s, r, Granted(1.0), 0.0)
    (announce,) = [e for e in effects if isinstance(e, Announce)]
    assert announce.clip == 0.37
    from qflare.services.aggregator.core import Accepted, Tick

    for i, c in enumerate(r.participants):
        r, _ = step(s, r, Accepted(c, bytes([i]) * 32, i, 1, 3), 0.0)
    r, _ = step(s, r, Tick(), 0.0)
    assert r.state == RoundState.CLOSED
    r, effects = step(s, r, Verdict(r.participants), 0.0)
    (command,) = [e for e in effects if isinstance(e, Aggregate)]
    assert command.clip == 0.37
    # round 1, or a job with a fixed clip: the job's clip
    assert begin(s, 1, 0, 0.0)[0].clip == 1.0


@pytest.mark.parametrize("clip", [0.0, -1.0, math.nan, math.inf])
def test_a_round_cannot_begin_at_a_clip_that_is_not_positive(clip: float) -> None:
    with pytest.raises(ValueError, match="clip norm"):
        begin(spec(), 2, 1, 0.0, clip=clip)


# -- the job's settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("clip_target_quantile", 0.0),
        ("clip_target_quantile", 1.0),
        ("clip_target_quantile", 1.5),
        ("clip_learning_rate", 0.0),
        ("clip_learning_rate", -0.2),
        ("clip_learning_rate", math.inf),
        ("clip_count_noise_std", 0.0),
        ("clip_count_noise_std", math.nan),
        ("adaptive_clip", "yes"),
    ],
)
def test_bad_adaptive_settings_are_refused_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        spec(**{key: value})
    assert info.value.errors()[0]["loc"] == (key,)


def test_a_count_noise_too_small_for_z_is_refused() -> None:
    # 10 expected clients: the default sigma_b 0.5, and 2 * 0.5 <= z = 1
    with pytest.raises(ValidationError, match=r"clip_count_noise_std = 0\.5 \(the default"):
        spec(participants=CLIENTS[:10])
    with pytest.raises(ValidationError, match="set clip_count_noise_std above 1"):
        spec(noise_multiplier=2.0, clip_count_noise_std=0.9)
    # given explicitly it may be what makes the job possible; DP off needs no count noise
    assert spec(participants=CLIENTS[:10], clip_count_noise_std=0.6).clip_count_noise_std == 0.6
    assert adaptive_of(spec(participants=CLIENTS[:10], noise_multiplier=0.0)) is not None
    # a fixed clip takes none of it
    assert adaptive_of(spec(participants=CLIENTS[:10], adaptive_clip=False)) is None
    assert adaptive_clipping(spec(adaptive_clip=False), 100) is None


def test_a_config_file_names_the_job_and_key(tmp_path: Path) -> None:
    (tmp_path / "m.safetensors").write_bytes(b"")
    job = (
        '[[jobs]]\njob_id = "j1"\nrounds = 2\nparticipants = ["a", "b", "c"]\n'
        'initial_model = "m.safetensors"\nadaptive_clip = true\n'
    )
    (tmp_path / "q.toml").write_text(job)
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "q.toml", env={})
    assert "q.toml: [[jobs]] #1 (job_id 'j1') clip_count_noise_std = 0.15 (" in str(info.value)
    (tmp_path / "q.toml").write_text(job + "clip_target_quantile = 2\n")
    with pytest.raises(ConfigError, match=r"clip_target_quantile = 2: must be less than 1"):
        load_settings(tmp_path / "q.toml", env={})
    (tmp_path / "q.toml").write_text(job + "clip_count_noise_std = 1.0\n")
    settings = load_settings(tmp_path / "q.toml", env={})
    assert adaptive_of(settings.job("j1")) is not None


def test_the_simulator_takes_the_same_settings_as_flags() -> None:
    with pytest.raises(SimConfigError, match="--clip-learning-rate"):
        SimConfig(adaptive_clip=True, clip_learning_rate=0)
    config = SimConfig(adaptive_clip=True, noise_multiplier=1.0, clients=8, byzantine=0)
    with pytest.raises(SimConfigError, match=r"--adaptive-clip: --clip-count-noise-std = 0\.4"):
        validate(config.with_(attack="none"))
    validate(config.with_(attack="none", clip_count_noise_std=0.6))


# -- the store ----------------------------------------------------------------------------


async def test_the_store_keeps_a_rounds_clip_and_the_next(tmp_path: Path) -> None:
    s = spec(participants=CLIENTS[:3], noise_multiplier=0.0)
    model = {"w": np.zeros(2, np.float32)}
    store = await AggregatorStore.open(tmp_path)
    try:
        await store.add_job(s, model, b"\0" * 32)
        assert await store.request_round("j", 1, 0, clip=0.25)
        assert not await store.request_round("j", 1, 0, clip=9.0)  # exists: keeps its clip
        r = await store.load_round("j", 1)
        assert r is not None and r.clip == 0.25
        assert await store.transition("j", 1, RoundState.REQUESTED, RoundState.CLOSED)
        assert await store.next_clip("j", 1) is None  # not published yet
        await store.publish_model("j", 1, 1, model, b"\1" * 32, 0.0, {}, next_clip=0.3125)
    finally:
        await store.close()
    store = await AggregatorStore.open(tmp_path)  # a restarted aggregator reads them back
    try:
        assert await store.next_clip("j", 1) == 0.3125
        row = await store.get_round("j", 1)
        assert row is not None and (row.clip, row.next_clip) == (0.25, 0.3125)
    finally:
        await store.close()


def test_the_charge_is_the_same_epsilon_with_or_without_adaptive_clipping() -> None:
    fixed, adaptive = charge_of(spec(adaptive_clip=False)), charge_of(spec())
    assert fixed == adaptive
    assert epsilon(adaptive.q, adaptive.z, 10, 1e-5) == epsilon(fixed.q, fixed.z, 10, 1e-5)


def test_qflare_simulate_flags_set_the_job_settings() -> None:
    import argparse

    from qflare.commands import simulate

    parser = argparse.ArgumentParser()
    simulate.register(parser.add_subparsers())
    flags = [
        "simulate",
        "--adaptive-clip",
        "--clip-target-quantile",
        "0.7",
        "--clip-learning-rate",
        "0.1",
        "--clip-count-noise-std",
        "2",
    ]
    config = simulate.config_from_args(parser.parse_args(flags))
    assert (config.adaptive_clip, config.clip_target_quantile) == (True, 0.7)
    assert (config.clip_learning_rate, config.clip_count_noise_std) == (0.1, 2.0)
    plain = simulate.config_from_args(parser.parse_args(["simulate"]))
    assert not plain.adaptive_clip and plain.clip_count_noise_std is None
