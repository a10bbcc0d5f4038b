"""Detection verdicts, reputation across rounds, attacks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qflare.robust import (
    INSUFFICIENT,
    OK,
    Reputation,
    detect,
    flip_labels,
    get_attack,
    get_rule,
    list_attacks,
)

N, F, D = 20, 6, 10_000


def round_with(attack: str, seed: int, **kw):
    rng = np.random.default_rng(seed)
    mu = 0.1 * rng.normal(size=D)  # common direction: cosine to mu about 0.7
    honest = (mu + 0.1 * rng.normal(size=(N - F, D))).astype(np.float32)
    byz = get_attack(attack, **kw)(honest, F, rng=seed)
    return np.concatenate([honest, byz])


@pytest.mark.parametrize("attack", ["sign_flip", "gaussian", "inf", "large", "ipm"])
def test_crude_attacks_are_caught(attack: str) -> None:
    tp = fp = 0
    for seed in range(3):
        v = detect(round_with(attack, seed), F)
        assert v.status == OK
        flagged = {int(c) for c in v.flagged}
        tp += len(flagged & set(range(N - F, N)))
        fp += len(flagged - set(range(N - F, N)))
    assert tp / (3 * F) >= 0.9, f"recall {tp / (3 * F):.2f}"
    assert tp / max(1, tp + fp) >= 0.9, f"precision {tp / max(1, tp + fp):.2f}"


def test_honest_round_mostly_kept() -> None:
    rng = np.random.default_rng(11)
    mu = 0.1 * rng.normal(size=D)
    x = (mu + 0.1 * rng.normal(size=(N, D))).astype(np.float32)
    v = detect(x, F)
    assert len(v.flagged) <= 1 and len(v.kept) >= N - 1


def test_verdict_content_and_ids() -> None:
    x = round_with("sign_flip", 0)
    ids = [f"client-{i}" for i in range(N)]
    v = detect(torch.from_numpy(x), F, ids=ids)
    assert set(v.kept) | set(v.flagged) == set(ids) and not set(v.kept) & set(v.flagged)
    bad = v.reasons["client-19"]
    assert "krum" in bad and "cosine" in bad
    assert set(v.scores["client-0"]) >= {"krum", "krum_z", "distance", "cosine", "norm", "norm_z"}
    assert v.scores["client-19"]["cosine"] < 0 < v.scores["client-0"]["cosine"]
    json.dumps(v.to_dict())
    with pytest.raises(ValueError, match="ids must be 20 distinct names"):
        detect(x, F, ids=ids[:-1])


def non_iid_honest(
    seed: int, n: int = N, d: int = 2_000, classes: int = 10, alpha: float = 0.5
) -> np.ndarray:
    """Honest updates shaped like non-IID clients: each mixes per-class directions by its
    own Dirichlet(alpha) class weights, plus its own SGD noise."""
    rng = np.random.default_rng(seed)
    per_class = rng.normal(size=(classes, d))
    mix = rng.dirichlet(np.full(classes, alpha), size=n)
    return (mix @ per_class + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


def test_identical_copies_are_a_coalition_even_inside_the_honest_cloud() -> None:
    # Late in training: a small common direction, large per-client spread, and six copies
    # of minus the mean, whose norm is below the honest ones (the case that used to pull
    # the geometric median towards the copies and pass every distance/cosine test).
    rng = np.random.default_rng(3)
    mu = 0.02 * rng.normal(size=D)
    honest = (mu + 0.1 * rng.normal(size=(N - F, D))).astype(np.float32)
    byz = np.repeat(-honest.mean(0, keepdims=True), F, axis=0)
    v = detect(np.concatenate([honest, byz]), F)
    assert set(v.flagged) == {str(i) for i in range(N - F, N)}
    assert all("duplicate" in v.reasons[str(i)] for i in range(N - F, N))
    assert v.scores["0"]["duplicate"] == 0.0 and v.scores[str(N - 1)]["duplicate"] == 1.0
    assert "6 in duplicate groups" in v.message
    # Non-IID honest clients: with the copies in the reference the old detector's centre
    # and MAD shifted and an honest client went out with them; out of it, only the copies.
    for seed in (0, 1):
        honest = non_iid_honest(seed)[: N - F]
        byz = np.repeat(-honest.mean(0, keepdims=True), F, axis=0)
        v = detect(np.concatenate([honest, byz]), F)
        assert set(v.flagged) == {str(i) for i in range(N - F, N)}, v.flagged


def test_near_copies_are_duplicates_but_independent_noise_is_not() -> None:
    honest = non_iid_honest(5)[: N - F]
    spread = float(np.median(np.linalg.norm(honest - honest.mean(0), axis=1)))
    rng = np.random.default_rng(6)
    base = honest.mean(0) + 0.5 * (honest[0] - honest.mean(0))  # inside the cloud
    unit = rng.normal(size=(F, honest.shape[1]))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    near = (base + 0.01 * spread * unit).astype(np.float32)  # 1% of the spread apart
    v = detect(np.concatenate([honest, near]), F)
    assert {c for c in v.flagged if "duplicate" in v.reasons[c]} == {
        str(i) for i in range(N - F, N)
    }
    apart = (base + 1.0 * spread * unit).astype(np.float32)  # as far apart as honest
    v = detect(np.concatenate([honest, apart]), F)
    assert not any("duplicate" in r for r in v.reasons.values())


def test_honest_non_iid_rounds_are_not_flagged() -> None:
    flagged = 0
    for seed in range(5):
        v = detect(non_iid_honest(seed), F)
        assert not any("duplicate" in r for r in v.reasons.values())
        flagged += len(v.flagged)
    assert flagged <= 3, f"{flagged} of {5 * N} honest client-rounds flagged"


def test_duplicate_groups_by_hand() -> None:
    from qflare.robust.detection import duplicate_groups

    # Points on a line: 0, 0, 10, 20, 30, 40, 50 -> median pairwise distance 20;
    # 0 and 0 are one group of two (a minority of 7), the rest are apart.
    pts = np.array([0.0, 0.0, 10.0, 20.0, 30.0, 40.0, 50.0])
    d2 = (pts[:, None] - pts[None, :]) ** 2
    assert duplicate_groups(d2, 0.1).tolist() == [True, True] + [False] * 5
    # 1.5 apart is within 0.1 x 20 = 2: a chain 50, 51.5 joins the group of its own.
    pts2 = np.array([0.0, 0.0, 10.0, 20.0, 30.0, 48.5, 50.0])
    d2 = (pts2[:, None] - pts2[None, :]) ** 2
    assert duplicate_groups(d2, 0.1).tolist() == [True, True, False, False, False, True, True]
    # Four identical of seven are the majority: the round's consensus, not a coalition.
    pts3 = np.array([0.0, 0.0, 0.0, 0.0, 10.0, 20.0, 30.0])
    d2 = (pts3[:, None] - pts3[None, :]) ** 2
    assert not duplicate_groups(d2, 0.1).any()


def test_a_group_of_copies_larger_than_f_keeps_its_earliest_member() -> None:
    from qflare.robust.detection import duplicate_groups

    # Points on a line: three copies at 0 (of nine points: a minority), the rest apart.
    pts = np.array([0.0, 0.0, 0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    d2 = (pts[:, None] - pts[None, :]) ** 2
    everyone = [True] * 3 + [False] * 6
    # three copies and at most two Byzantine clients: one of the three is honest, the one
    # that arrived first (row 1 here); the other two copied it
    arrival = [5.0, 1.0, 7.0, 0.0, 2.0, 3.0, 4.0, 6.0, 8.0]
    assert (
        duplicate_groups(d2, 0.1, f=2, arrival=arrival).tolist()
        == [True, False, True] + [False] * 6
    )
    # as many copies as f could all be Byzantine; no arrival order: nothing tells the
    # original, every copy is flagged
    assert duplicate_groups(d2, 0.1, f=3, arrival=arrival).tolist() == everyone
    assert duplicate_groups(d2, 0.1, f=2).tolist() == everyone
    with pytest.raises(ValueError, match="arrival"):
        duplicate_groups(d2, 0.1, f=2, arrival=[0.0, 1.0])
    with pytest.raises(ValueError, match="arrival"):
        duplicate_groups(d2, 0.1, f=2, arrival=[float("nan"), *arrival[1:]])


def test_mimic_keeps_the_copied_client_when_the_stream_order_is_known() -> None:
    # Mimic: the f Byzantine clients send one honest client's update. With the rows'
    # order in the update stream the original is kept, only its copies go; without it the
    # original goes with them.
    honest = non_iid_honest(7)[: N - F]
    x = np.concatenate([honest, np.repeat(honest[3:4], F, axis=0)])
    copies = {str(i) for i in range(N - F, N)}
    arrival = [float(i) for i in range(N)]  # the copies were sent after the honest ones
    v = detect(x, F, arrival=arrival)
    assert copies <= set(v.flagged) and "3" not in v.flagged
    assert all("duplicate" in v.reasons[c] for c in copies)
    assert "3" in detect(x, F).flagged
    # a copy that came first would be the one kept: the order is the evidence
    early = [float(i) for i in range(N)]
    early[N - 1] = -1.0
    v = detect(x, F, arrival=early)
    assert "3" in v.flagged and str(N - 1) not in v.flagged


def test_low_side_cosine_scale_is_not_set_by_the_low_group() -> None:
    from qflare.robust.detection import low_side_z, robust_z

    # Cosines to the centre as measured with label flipping: 14 honest in 0.42-0.66, six
    # flippers at 0.12-0.22. Left in, the six lower the median (0.485) and widen the MAD
    # (0.156): none reaches -3.5. One reweighting step without the rows below -1.5 gives
    # median 0.525, MAD 0.1 (the floor): the four lowest pass -3.5.
    honest = np.array(
        [0.42, 0.45, 0.47, 0.48, 0.50, 0.50, 0.52, 0.53, 0.55, 0.56, 0.58, 0.60, 0.62, 0.66]
    )
    low = np.array([0.12, 0.14, 0.15, 0.17, 0.20, 0.22])
    v = np.concatenate([honest, low])
    everyone = np.ones(20, dtype=bool)
    assert robust_z(v, 0.1).min() > -3.5
    z = low_side_z(v, everyone, 1.5, 0.1)
    np.testing.assert_allclose(z[14:], (low - 0.525) / 0.1, atol=1e-9)
    assert (z[14:] < -3.5).sum() == 4 and (z[:14] > -1.1).all()
    # Without a low group nothing is trimmed: the same z as the plain robust one.
    np.testing.assert_allclose(low_side_z(honest, everyone[:14], 1.5, 0.1), robust_z(honest, 0.1))


def label_flip_like(seed: int, d: int = 2_000) -> np.ndarray:
    """14 honest non-IID updates and 6 that share a direction of their own: each mixes
    per-class directions by its Dirichlet(0.5) class weights, but the six use other class
    directions (as training on 9 - y does) and half the honest common part."""
    rng = np.random.default_rng(seed)
    common = 0.25 * rng.normal(size=d)
    honest_cls, flipped_cls = rng.normal(size=(10, d)), rng.normal(size=(10, d))
    mix = rng.dirichlet(np.full(10, 0.5), size=N)
    noise = 0.5 * rng.normal(size=(N, d))
    honest = common + mix[: N - F] @ honest_cls + noise[: N - F]
    flipped = 0.5 * common + mix[N - F :] @ flipped_cls + noise[N - F :]
    return np.concatenate([honest, flipped]).astype(np.float32)


def test_compact_minority_with_its_own_direction_is_flagged_by_its_neighbourhood() -> None:
    from qflare.robust.detection import Thresholds

    caught = caught_without = 0
    for seed in range(1, 6):
        x = label_flip_like(seed)
        v = detect(x, F)
        assert set(v.flagged) == {str(i) for i in range(N - F, N)}, (seed, v.flagged)
        assert all("neighbourhood" in v.reasons[str(i)] for i in range(N - F, N))
        caught += F
        # The per-client scores alone: the six's cosines (0.2-0.35) sit below the honest
        # ones (0.45 and up) but not 3.5 robust deviations below.
        off = detect(x, F, thresholds=Thresholds(neighbourhood_z=1e9))
        caught_without += len(set(off.flagged) & {str(i) for i in range(N - F, N)})
    assert caught_without <= 2 < caught


def test_honest_non_iid_spread_is_not_a_neighbourhood() -> None:
    for seed in range(10):
        v = detect(non_iid_honest(seed), F)
        assert not any("neighbourhood" in r for r in v.reasons.values()), (seed, v.reasons)
    # Fewer than 2f + 1 honest rows told f = 6 (e.g. ingest refused the rest): the scale
    # keeps two thirds of the rows, and a lone low neighbourhood is no coalition.
    for seed in range(10):
        v = detect(non_iid_honest(seed, n=14), F)
        assert not any("neighbourhood" in r for r in v.reasons.values()), (seed, v.reasons)


def test_neighbourhood_mean_and_upper_z_by_hand() -> None:
    from qflare.robust.detection import neighbourhood_mean, upper_z

    # Rows 0-2 are one direction, 3-4 another; each row's nearest neighbours are its own kind.
    sim = np.array(
        [
            [1.0, 0.9, 0.8, 0.1, 0.0],
            [0.9, 1.0, 0.7, 0.0, 0.1],
            [0.8, 0.7, 1.0, 0.2, 0.0],
            [0.1, 0.0, 0.2, 1.0, 0.9],
            [0.0, 0.1, 0.0, 0.9, 1.0],
        ]
    )
    v = np.array([0.6, 0.5, 0.4, 0.0, 0.1])
    everyone = np.ones(5, dtype=bool)
    np.testing.assert_allclose(
        neighbourhood_mean(v, sim, everyone, 1), [0.55, 0.55, 0.5, 0.05, 0.05]
    )
    np.testing.assert_allclose(
        neighbourhood_mean(v, sim, everyone, 2),
        [0.5, 0.5, 0.5, (0.0 + 0.1 + 0.4) / 3, (0.1 + 0.0 + 0.5) / 3],
    )
    # Neighbours come from the reference rows only (row 1 left out: row 0 takes row 2).
    ref = np.array([True, False, True, True, True])
    np.testing.assert_allclose(neighbourhood_mean(v, sim, ref, 1)[0], 0.5)
    # k larger than the reference allows: capped; k = 0: the values themselves.
    np.testing.assert_allclose(neighbourhood_mean(v, sim, everyone, 0), v)
    np.testing.assert_allclose(neighbourhood_mean(v, sim, everyone, 10), np.full(5, v.mean()))
    # upper_z: the two lowest dropped, median/MAD of 0.6, 0.5, 0.4 = 0.5 and 0.1 x 1.4826.
    z = upper_z(v, everyone, 2, 0.01)
    np.testing.assert_allclose(z, (v - 0.5) / 0.14826)
    assert upper_z(v, everyone, 2, 0.5)[3] == pytest.approx(-1.0)  # the floor


def test_majority_of_zero_updates_is_not_a_coalition() -> None:
    x = np.zeros((N, 50), dtype=np.float32)
    x[:8] = np.random.default_rng(1).normal(size=(8, 50))
    v = detect(x, F)
    assert not any("duplicate" in r for r in v.reasons.values())


def test_too_few_updates_is_a_verdict_not_an_error() -> None:
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    x[2] = np.nan
    v = detect(x, 2)
    assert v.status == INSUFFICIENT
    assert v.flagged == ("2",) and v.kept == ("0", "1", "3")
    assert "3 finite updates, detection needs at least 5 for f=2" in v.message
    assert detect(x[:1], 0).status == INSUFFICIENT


def test_reputation_quarantines_repeat_offenders_only() -> None:
    rep = Reputation(decay=0.8, penalty=1.0, threshold=2.5, quarantine_rounds=5)
    # "a" is flagged every round: 1, 1.8, 2.44, 2.952 -> quarantined at round 4 until 9
    # "b" every fifth round: 1, 1 + 0.8**5, ... stays below 2.5
    got = {r: rep.observe(r, ["a"] + (["b"] if r % 5 == 1 else [])) for r in range(1, 12)}
    assert got[4] == ["a"] and all(got[r] == [] for r in (1, 2, 3, 5, 6, 7, 8, 9))
    assert rep.is_quarantined("a", 9) and not rep.is_quarantined("b", 9)
    fresh = Reputation(decay=0.8, penalty=1.0, threshold=2.5)
    for r in (1, 2, 3):
        fresh.observe(r, ["a"])
    assert fresh.score("a", 3) == pytest.approx(2.44)
    assert fresh.score("a", 5) == pytest.approx(2.44 * 0.64)
    assert fresh.score("never", 5) == 0.0
    assert rep.quarantined(9) == {"a"}
    state = json.loads(json.dumps(rep.to_dict()))
    back = Reputation.from_dict(state)
    assert back.to_dict() == rep.to_dict()
    with pytest.raises(ValueError, match="older than its last recorded round 11"):
        rep.observe(3, ["a"])
    with pytest.raises(ValueError, match="lacks 'decay'"):
        Reputation.from_dict({"clients": {}})
    with pytest.raises(ValueError, match="decay must be in"):
        Reputation(decay=1.5)


sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))


def test_attacks_shapes_kinds_and_byzfl() -> None:
    import peers

    bz = peers.load_byzfl()
    h = np.random.default_rng(2).normal(size=(9, 25)).astype(np.float32)
    for name in list_attacks():
        if name == "label_flip":
            continue
        kw = {"rule": "trimmed_mean(f=3)"} if name.startswith("optimal") else {}
        out = get_attack(name, **kw)(h, 3, rng=0)
        assert out.shape == (3, 25) and out.dtype == np.float32
        assert isinstance(get_attack(name, **kw)(torch.from_numpy(h), 3, rng=0), torch.Tensor)
    np.testing.assert_allclose(
        get_attack("sign_flip")(h, 1)[0], bz.SignFlipping()(h.copy()), rtol=1e-5
    )
    np.testing.assert_allclose(
        get_attack("ipm", tau=0.5)(h, 1)[0], bz.InnerProductManipulation(0.5)(h.copy()), rtol=1e-5
    )
    np.testing.assert_allclose(
        get_attack("alie")(h, 1)[0], bz.ALittleIsEnough(1.5)(h.copy()), rtol=1e-5
    )
    np.testing.assert_array_equal(get_attack("mimic", idx=4)(h, 2), np.stack([h[4], h[4]]))
    peer = bz.Optimal_InnerProductManipulation(agg=bz.TrMean(3), pre_agg_list=[], f=3)
    np.testing.assert_allclose(
        get_attack("optimal_ipm", rule="trimmed_mean(f=3)")(h, 3)[0], peer(h.copy()), rtol=1e-4
    )
    np.testing.assert_array_equal(
        get_attack("gaussian")(h, 2, rng=5), get_attack("gaussian")(h, 2, rng=5)
    )
    assert np.all(np.isinf(get_attack("inf")(h, 2)))
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        get_attack("nope")
    with pytest.raises(TypeError, match="attack ipm"):
        get_attack("ipm", scale=3)


def test_optimal_search_beats_the_default_scale() -> None:
    h = np.random.default_rng(4).normal(loc=1.0, size=(14, 30)).astype(np.float32)
    rule = get_rule("trimmed_mean(f=4)")
    mean = h.mean(0)

    def damage(byz):
        return float(np.linalg.norm(rule(np.concatenate([h, byz])) - mean))

    assert damage(get_attack("optimal_alie", rule=rule)(h, 4)) >= damage(get_attack("alie")(h, 4))
    assert damage(get_attack("optimal_ipm", rule=rule)(h, 4)) >= damage(get_attack("ipm")(h, 4))


@pytest.mark.parametrize("name", ["minmax", "minsum"])
def test_min_max_min_sum_sit_on_their_bound(name: str) -> None:
    h = np.random.default_rng(6).normal(size=(10, 40)).astype(np.float64)
    z = get_attack(name)(h, 1)[0]
    d_h = ((h[:, None, :] - h[None, :, :]) ** 2).sum(-1)
    d_z = ((h - z) ** 2).sum(-1)
    if name == "minmax":  # max distance to honest equals the largest honest distance
        assert d_z.max() == pytest.approx(d_h.max(), rel=1e-6)
    else:  # sum of squared distances equals the largest honest sum
        assert d_z.sum() == pytest.approx(d_h.sum(1).max(), rel=1e-6)
    assert not np.allclose(z, h.mean(0))


def test_label_flip() -> None:
    np.testing.assert_array_equal(flip_labels(np.array([0, 1, 9]), 10), [9, 8, 0])
    assert torch.equal(
        get_attack("label_flip", num_classes=3)(torch.tensor([0, 2])), torch.tensor([2, 0])
    )
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        flip_labels(np.array([10]), 10)
    with pytest.raises(TypeError, match="labels must be integers"):
        flip_labels(np.array([0.5]), 10)
