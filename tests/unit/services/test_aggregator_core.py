"""The aggregator's pure core: selection, close decisions, deterministic DP aggregation."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from qflare.privacy import AdaptiveClipping, next_clip
from qflare.services.aggregator.core import (
    AggregationResult,
    CloseDecision,
    Layout,
    aggregate_round,
    close_decision,
    expected_participants,
    round_noise,
    select_participants,
)

CLIENTS = [f"c{i:02d}" for i in range(40)]


def test_selection_is_seeded_per_job_and_round() -> None:
    a = select_participants(CLIENTS, 0.3, seed=7, job="j1", round_no=1)
    assert a == select_participants(list(reversed(CLIENTS)), 0.3, seed=7, job="j1", round_no=1)
    assert a != select_participants(CLIENTS, 0.3, seed=7, job="j1", round_no=2)
    assert a != select_participants(CLIENTS, 0.3, seed=8, job="j1", round_no=1)
    assert a != select_participants(CLIENTS, 0.3, seed=7, job="j2", round_no=1)
    assert list(a) == sorted(a) and set(a) <= set(CLIENTS)


def test_selection_rate_is_q() -> None:
    sizes = [len(select_participants(CLIENTS, 0.25, 3, "j", r)) for r in range(400)]
    # Binomial(40, 0.25): mean 10, std of the mean over 400 rounds ~0.14.
    assert abs(np.mean(sizes) - 10.0) < 0.6
    assert select_participants(CLIENTS, 1.0, 3, "j", 1) == tuple(CLIENTS)
    with pytest.raises(ValueError, match="q must be"):
        select_participants(CLIENTS, 0.0, 3, "j", 1)


@pytest.mark.parametrize(
    ("received", "now", "ext", "on_short", "expected"),
    [
        (5, 0.0, 0, "extend", CloseDecision.CLOSE),  # everyone in before the deadline
        (3, 0.0, 0, "extend", CloseDecision.WAIT),
        (3, 10.0, 0, "extend", CloseDecision.CLOSE),  # deadline, >= min_updates
        (1, 10.0, 0, "extend", CloseDecision.EXTEND),
        (1, 10.0, 2, "extend", CloseDecision.ABORT),  # extensions used up
        (1, 10.0, 0, "abort", CloseDecision.ABORT),
        (0, 10.0, 2, "extend", CloseDecision.ABORT),
    ],
)
def test_close_decision(
    received: int, now: float, ext: int, on_short: str, expected: CloseDecision
) -> None:
    got = close_decision(
        received=received,
        selected=5,
        min_updates=2,
        now=now,
        deadline=5.0,
        extensions=ext,
        max_extensions=2,
        on_short=on_short,
    )
    assert got == expected


def test_an_empty_sample_closes_at_once_and_releases_noise_only() -> None:
    got = close_decision(
        received=0,
        selected=0,
        min_updates=3,
        now=0.0,
        deadline=5.0,
        extensions=0,
        max_extensions=2,
        on_short="extend",
    )
    assert got == CloseDecision.CLOSE
    base = {"w": np.zeros(4, np.float32)}
    res = aggregate_round(
        job="j",
        round_no=1,
        seed=3,
        base=base,
        updates={},
        kept=[],
        rule="mean",
        f=0,
        clip=1.0,
        noise_multiplier=1.0,
        expected_clients=2.0,
    )
    assert res.kept == () and np.all(res.model["w"] != 0)


def test_layout_round_trip_and_mismatch() -> None:
    model = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), dtype=np.float32)}
    layout = Layout.of(model)
    flat = layout.flatten(model)
    assert flat.tolist() == [1, 1, 1, 1, 0, 1, 2]
    back = layout.unflatten(flat)
    assert all(np.array_equal(back[k], model[k]) and back[k].dtype == np.float32 for k in model)
    with pytest.raises(ValueError, match="do not match"):
        layout.check({"a": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}, "x")
    with pytest.raises(ValueError, match="do not match"):
        layout.check({"a": np.ones((2, 2), np.float64), "b": np.zeros(3, np.float32)}, "x")


def _round(
    kept: list[str], updates: dict, *, z: float = 0.0, rule: str = "mean", f: int = 0, seed: int = 1
):
    base = {"w": np.zeros(4, np.float32)}
    return aggregate_round(
        job="j",
        round_no=3,
        seed=seed,
        base=base,
        updates=updates,
        kept=kept,
        rule=rule,
        f=f,
        clip=10.0,
        noise_multiplier=z,
        expected_clients=len(kept) or 1,
    )


def test_mean_without_noise_is_fedavg_of_kept() -> None:
    updates = {
        "a": {"w": np.array([1, 0, 0, 0], np.float32)},
        "b": {"w": np.array([0, 1, 0, 0], np.float32)},
        "evil": {"w": np.array([9, 9, 9, 9], np.float32)},
    }
    res = _round(["b", "a"], updates)
    assert res.kept == ("a", "b")
    assert np.allclose(res.model["w"], [0.5, 0.5, 0, 0])
    assert res.model["w"].dtype == np.float32


def test_noise_is_deterministic_per_seed_and_scaled() -> None:
    updates = {c: {"w": np.full(4, 0.1, np.float32)} for c in "abcd"}
    one = _round(list("abcd"), updates, z=1.0)
    two = _round(list("dcba"), updates, z=1.0)
    other = _round(list("abcd"), updates, z=1.0, seed=2)
    assert np.array_equal(one.model["w"], two.model["w"])
    assert not np.array_equal(one.model["w"], other.model["w"])
    noiseless = _round(list("abcd"), updates)
    assert not np.allclose(one.model["w"], noiseless.model["w"])


def test_robust_rule_resists_outlier_and_median_is_clipped() -> None:
    rng = np.random.default_rng(0)
    honest = {
        f"h{i}": {"w": (np.ones(4) + 0.01 * rng.standard_normal(4)).astype(np.float32)}
        for i in range(7)
    }
    evil = {f"e{i}": {"w": np.full(4, -50.0, np.float32)} for i in range(2)}
    updates = {**honest, **evil}
    res = _round(sorted(updates), updates, rule="median")
    assert np.allclose(res.model["w"], 1.0, atol=0.05)
    krum = _round(sorted(updates), updates, rule="multikrum", f=2)
    assert np.allclose(krum.model["w"], 1.0, atol=0.05)


def _updates(n: int, seed: int = 0, scale: float = 1.0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        f"c{i}": {
            "w": (scale * rng.standard_normal((3, 2))).astype(np.float32),
            "b": (scale * rng.standard_normal(2)).astype(np.float32),
        }
        for i in range(n)
    }


def _aggregate(updates: dict, kept: list[str], **kw: object) -> AggregationResult:
    args: dict = dict(
        job="j",
        round_no=5,
        seed=9,
        base={"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)},
        updates=updates,
        kept=kept,
        rule="mean",
        f=0,
        clip=1.0,
        noise_multiplier=0.0,
        expected_clients=4.0,
    )
    return aggregate_round(**{**args, **kw})


def _flat(tensors: dict[str, np.ndarray]) -> np.ndarray:
    return Layout.of(tensors).flatten(tensors, dtype=np.float64)


def test_dp_off_the_mean_over_kept_updates_divides_by_the_number_kept() -> None:
    updates = _updates(4, scale=0.1)  # inside the clip ball: the mean is the plain mean
    res = _aggregate(updates, ["c0", "c2"], expected_clients=4.0)
    want = (_flat(updates["c0"]) + _flat(updates["c2"])) / 2
    assert np.allclose(_flat(res.model), want, atol=1e-7)


def test_dp_on_the_fixed_denominator_stays() -> None:
    updates = _updates(4, scale=3.0)  # outside the ball: every update is clipped
    res = _aggregate(updates, ["c0", "c2"], noise_multiplier=0.5, expected_clients=4.0)
    clipped = [_flat(updates[c]) for c in ("c0", "c2")]
    clipped = [v * min(1.0, 1.0 / np.linalg.norm(v)) for v in clipped]
    noise = round_noise(9, "j", 5, 2).gaussian(0.5 * 1.0, (8,))  # the (job, round) noise stream
    assert np.allclose(_flat(res.model), (sum(clipped) + noise) / 4.0, atol=1e-6)


def test_the_denominator_is_expected_participants_floored_at_one() -> None:
    assert expected_participants(0.1, 200) == 20.0
    assert expected_participants(0.01, 20) == 1.0


def test_adaptive_clipping_yields_the_next_clip_from_the_round_alone() -> None:
    updates = _updates(6, seed=3)
    kept = sorted(updates)
    adaptive = AdaptiveClipping(count_noise_std=2.0, target_quantile=0.5, learning_rate=0.2)
    plain = _aggregate(updates, kept, noise_multiplier=1.0)
    assert plain.next_clip == 1.0
    one = _aggregate(updates, kept, noise_multiplier=1.0, adaptive=adaptive)
    again = _aggregate(updates, kept[::-1], noise_multiplier=1.0, adaptive=adaptive)
    assert one.next_clip == again.next_clip and np.array_equal(one.model["w"], again.model["w"])
    norms = [float(np.linalg.norm(_flat(updates[c]))) for c in kept]
    want = next_clip(
        1.0,
        norms,
        adaptive=adaptive,
        expected_clients=4.0,
        noise_multiplier=1.0,
        noise=round_noise(9, "j", 5, 4),  # the (job, round) stream of the count
    )
    assert one.next_clip == pytest.approx(want, rel=1e-12) and one.next_clip != 1.0
    # the update sum's noise is z_delta * C, not z * C: another model than without adaptive
    assert not np.array_equal(one.model["w"], plain.model["w"])
    # DP off: the model is the same as without adaptive clipping, the clip still moves
    off = _aggregate(updates, kept, adaptive=adaptive)
    assert np.array_equal(off.model["w"], _aggregate(updates, kept).model["w"])
    below = sum(n <= 1.0 for n in norms) / len(norms)
    assert off.next_clip == pytest.approx(np.exp(-0.2 * (below - 0.5)))


def test_an_update_of_another_layout_is_an_error() -> None:
    updates = _updates(2)
    updates["c1"] = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match="update of c1"):
        _aggregate(updates, ["c0", "c1"])


def test_missing_update_is_an_error() -> None:
    with pytest.raises(ValueError, match="no stored update"):
        _round(["ghost"], {})


def test_refused_clients_close_the_round_once_it_has_its_minimum() -> None:
    from qflare.services.aggregator.core import close_decision as cd

    kw = dict(
        selected=10,
        min_updates=7,
        now=0.0,
        deadline=5.0,
        extensions=0,
        max_extensions=1,
        on_short="extend",
    )
    assert cd(received=8, refused=2, **kw) == CloseDecision.CLOSE
    assert cd(received=8, refused=1, **kw) == CloseDecision.WAIT  # one still silent
    assert cd(received=6, refused=4, **kw) == CloseDecision.WAIT  # below min_updates: wait
    assert cd(received=0, refused=10, **kw) == CloseDecision.WAIT


def test_cap_removals_removes_only_the_k_highest_scored() -> None:
    from qflare.services.aggregator.core import cap_removals

    flagged = [("a", 1.0), ("b", 9.0), ("c", float("nan")), ("d", 5.0)]
    assert cap_removals(["x"], flagged, None) == (["x"], ["a", "b", "c", "d"])
    assert cap_removals(["x"], flagged, 2) == (["a", "d", "x"], ["b", "c"])  # NaN counts as worst
    assert cap_removals(["x"], flagged, 0) == (["a", "b", "c", "d", "x"], [])
    assert cap_removals(["x"], [("a", 1.0)], 3) == (["x"], ["a"])


@pytest.mark.parametrize(
    ("rule", "detection", "bound", "expected"),
    [
        ("mean", False, None, ("clipped_sum", 0.1, 1.2)),
        ("mean", True, 0, ("clipped_sum", 0.1, 1.2)),  # detection may remove nobody
        ("mean", True, None, ("noise_only", 0.1, 1.2)),
        ("median", False, None, ("noise_only", 0.1, 1.2)),
        ("median", True, 2, ("noise_only", 0.1, 1.2)),  # the rule itself is not covered
        ("mean", True, 2, ("filter_bounded", 1.0, 1.2 / 5)),
    ],
)
def test_privacy_charge(rule: str, detection: bool, bound: int | None, expected: tuple) -> None:
    from qflare.privacy.policy import privacy_charge

    got = privacy_charge(
        rule=rule, detection=detection, sample_rate=0.1, noise_multiplier=1.2, dp_filter_bound=bound
    )
    assert (got.coverage, got.q) == expected[:2] and got.z == pytest.approx(expected[2])


def _pinned_round(
    rule: str, f: int, z: float, clip: float, expected: float, lr: float, n: int, seed: int
) -> tuple[str, tuple[str, ...], str]:
    """One round over a fixed three-tensor model; the last client is left out of ``kept``.
    Odd seeds draw Gaussian updates of three scales (some inside the clip ball, some far
    outside); even seeds draw sparse positive updates, whose coordinate-wise median leaves
    the ball (so the combined output is clipped too)."""
    rng = np.random.default_rng(seed)
    base = {
        "w": rng.standard_normal((7, 5)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
        "a.bias": rng.standard_normal(3).astype(np.float32),
    }
    updates = {}
    for i in range(n):
        if seed % 2:
            scale = (0.01, 0.1, 50.0)[i % 3]
            updates[f"c{i:02d}"] = {
                k: (scale * rng.standard_normal(v.shape)).astype(np.float32)
                for k, v in base.items()
            }
        else:
            updates[f"c{i:02d}"] = {
                k: (10.0 * (rng.random(v.shape) < 0.6)).astype(np.float32) for k, v in base.items()
            }
    res = aggregate_round(
        job="pin",
        round_no=4,
        seed=seed,
        base=base,
        updates=updates,
        kept=sorted(updates)[: n - 1],
        rule=rule,
        f=f,
        clip=clip,
        noise_multiplier=z,
        expected_clients=expected,
        server_lr=lr,
    )
    h = hashlib.sha256()
    for name in sorted(res.model):
        h.update(name.encode() + res.model[name].dtype.str.encode())
        h.update(np.ascontiguousarray(res.model[name]).tobytes())
    return h.hexdigest(), res.kept, res.update_norm.hex()


# Pinned before the mechanism moved into qflare.privacy (bit-identical models since).
PINNED = [
    pytest.param(
        ("mean", 0, 1.1, 0.5, 7.5, 1.0, 9, 11),
        "3ff2f7791773a1da1f34a97a124e4b8fa14266dd518e9810f3d20cae4212f8b6",
        8,
        "0x1.039a1734b9341p-1",
        id="mean-dp",
    ),
    pytest.param(
        ("mean", 0, 1.3, 0.4, 5.0, 1.0, 9, 12),
        "411bd0995bc224a9ff2735da7f6879ef09515b0d1059a528719e6e184b07429f",
        8,
        # was 0x1.8bf6218755276p-1 (same model digest): the step's norm, a metric, was
        # np.linalg.norm (BLAS); it is the pairwise norm on the GRID chunks now, as
        # aggregate_blocks computes it block by block
        "0x1.8bf6218755275p-1",
        id="mean-dp-sparse",
    ),
    pytest.param(
        ("median", 2, 0.7, 0.3, 8.0, 0.5, 9, 13),
        "ca98c9a17bd47b1c38682069e0f37527a68a0a980293860e56fbe7673a8af14e",
        8,
        "0x1.6a237df9d9bf5p-4",
        id="median-dp",
    ),
    pytest.param(
        ("median", 2, 0.7, 0.3, 8.0, 0.5, 9, 14),
        "4442e040dea1db5b446de6a1562993eb353896a7a53d3d55186e54d1f6cd5fa4",
        8,
        # was 0x1.4fa2ce24535b7p-3 (same model digest): the step's norm, a metric, was
        # np.linalg.norm (BLAS); it is the pairwise norm on the GRID chunks now, as
        # aggregate_blocks computes it block by block
        "0x1.4fa2ce24535b6p-3",
        id="median-dp-combined-clipped",
    ),
    pytest.param(
        ("multikrum", 2, 1.5, 1.0, 10.0, 1.0, 12, 15),
        "1f2ef663cd2ae3b8a0a78f63b9520df7afb936236b6a12206236ef4be7018421",
        11,
        # was 0x1.213fc187b3d39p+0 (same model digest): the step's norm, a metric, was
        # np.linalg.norm (BLAS); it is the pairwise norm on the GRID chunks now, as
        # aggregate_blocks computes it block by block
        "0x1.213fc187b3d3ap+0",
        id="multikrum-dp",
    ),
    pytest.param(
        ("nnm+trimmed_mean", 2, 0.9, 0.2, 6.0, 1.0, 9, 17),
        "32f88eff74e6797ebb4e0e9823f5ba508d4e1e359c5c9be5189eea9bc6467045",
        8,
        "0x1.9f3d8c33a52b4p-3",
        id="nnm-trimmed-dp",
    ),
    pytest.param(
        ("mean", 0, 0.0, 0.5, 8.0, 1.0, 9, 19),
        "fe54e9bf7da3838fbf54964ce48428970372d56e2700582196c3d5a708cec3a4",
        8,
        "0x1.04af5e4b0051ap-3",
        id="mean-dp-off-full",
    ),
    pytest.param(
        ("median", 2, 0.0, 0.3, 8.0, 1.0, 9, 20),
        "7d748d1bc2c3d85e964d7833179c44fab20e2d0914b343c3a0194a317dd8e9cf",
        8,
        # was 0x1.3333333333334p-2 (same model digest): the rule's output used to be clipped
        # with np.linalg.norm, a BLAS dot product whose bits depend on the thread count;
        # it is clipped with the rows' float64 pairwise norm now
        "0x1.3333333333332p-2",
        id="median-dp-off-combined-clipped",
    ),
    pytest.param(
        ("mean", 0, 2.0, 0.5, 4.0, 1.0, 1, 21),
        "86605cb16d8d36c1c573deb877cae6a57bd6a5a3744de7ea88ff9d32790e26f2",
        0,
        "0x1.a5748070ea5c0p+0",
        id="nobody-kept-noise-only",
    ),
]


#: Rules whose result goes through a float32 matrix product (Multi-Krum's Gram matrix and its
#: average of the selected rows, torch's GEMM): its bits depend on the CPU's GEMM kernel (and
#: on MKL, on the operands' memory alignment), so on another machine the pinned digest moves
#: in the last bits (the machine of 2026-12-06: another digest, the norm 1e-8 apart). They are
#: pinned to the kept clients, the step's norm to 1e-6, and the same bits on every run.
GEMM_RULES = ("multikrum",)


@pytest.mark.parametrize(("args", "digest", "kept", "norm"), PINNED)
def test_aggregate_round_is_pinned_bit_for_bit(
    args: tuple[str, int, float, float, float, float, int, int], digest: str, kept: int, norm: str
) -> None:
    """The same inputs give the same model, bit for bit, as before the DP mechanism moved
    into qflare.privacy (and on every run: norms are float64 pairwise sums, not BLAS)."""
    got_digest, got_kept, got_norm = _pinned_round(*args)
    assert got_kept == tuple(f"c{i:02d}" for i in range(kept))
    if args[0] in GEMM_RULES:
        assert float.fromhex(got_norm) == pytest.approx(float.fromhex(norm), rel=1e-6)
        assert _pinned_round(*args) == (got_digest, got_kept, got_norm)  # same on every run
        return
    assert (got_digest, got_norm) == (digest, norm)
