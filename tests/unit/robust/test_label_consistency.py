"""Label consistency (qflare.robust.detection.label_consistency) on synthetic output layers,
and its running mean and flag in the reputation (qflare.robust.Reputation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qflare.robust import Reputation, detect
from qflare.robust.detection import _loo_median, label_consistency

C, H = 10, 32


def _layer(
    rng: np.random.Generator, protos: np.ndarray, counts: np.ndarray, flip: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One client's output-layer update under one SGD step of cross-entropy at uniform
    predictions: dW[c] = sum over its images of (1[label = c] - 1/C) h, db[c] likewise;
    its images of class k have features protos[k] + noise; a flipper labels class k as
    C - 1 - k."""
    weight = np.zeros((C, H))
    bias = np.zeros(C)
    for k in np.flatnonzero(counts):
        h = protos[k] + 0.3 * rng.standard_normal((int(counts[k]), H))
        label = C - 1 - k if flip else k
        weight[label] += h.sum(axis=0)
        bias[label] += len(h)
        weight -= h.sum(axis=0) / C
        bias -= len(h) / C
    return weight, bias


def _round(
    seed: int, n: int = 20, flippers: tuple[int, ...] = (), one_class: tuple[int, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """n clients with Dirichlet(0.3) label skew; ``one_class`` clients hold one class."""
    rng = np.random.default_rng(seed)
    protos = np.abs(rng.standard_normal((C, H))) + 0.5
    ws, bs = [], []
    for i in range(n):
        if i in one_class:
            counts = np.zeros(C)
            counts[i % C] = 60
        else:
            counts = np.round(60 * rng.dirichlet(np.full(C, 0.3)))
        w, b = _layer(rng, protos, counts, flip=i in flippers)
        ws.append(w)
        bs.append(b)
    return np.stack(ws).astype(np.float32), np.stack(bs).astype(np.float32)


def test_the_leave_one_out_median_is_the_median_of_the_others() -> None:
    rng = np.random.default_rng(0)
    for m in (1, 2, 3, 6, 7):
        vals = rng.standard_normal((9, 5))
        vals[1, 2] = vals[3, 2]  # a tie
        member = np.zeros(9, dtype=bool)
        member[rng.choice(9, size=m, replace=False)] = True
        out, ok = _loo_median(vals, member)
        for i in range(9):
            others = member.copy()
            others[i] = False
            assert ok[i] == bool(others.any())
            if others.any():
                np.testing.assert_allclose(out[i], np.median(vals[others], axis=0), rtol=1e-15)


def test_flippers_score_low_and_honest_clients_with_one_class_do_not() -> None:
    flippers, one_class = (2, 5, 11, 17), (0, 8)
    for seed in range(5):
        w, b = _round(seed, flippers=flippers, one_class=one_class)
        s = label_consistency(w, b, f=6)
        honest = np.array([i not in flippers for i in range(20)])
        assert np.isfinite(s).all()
        assert s[~honest].max() < -0.15 < 0 < s[honest].min(), (seed, np.round(s, 2))
        assert s[list(one_class)].min() > 0.15


def test_nothing_to_score_is_nan_and_non_finite_rows_stay_out() -> None:
    w, b = _round(1, n=8, flippers=(3,))
    w[5, 0, 0] = np.nan
    b[6] = 0.0  # pushes nothing up
    s = label_consistency(w, b, f=2)
    assert np.isnan(s[5]) and np.isnan(s[6])
    assert np.isfinite(np.delete(s, [5, 6])).all() and s[3] < 0
    # the NaN row did not enter anyone's consensus
    w2, b2 = np.delete(w, 5, axis=0), np.delete(b, 5, axis=0)
    np.testing.assert_allclose(np.delete(s, 5), label_consistency(w2, b2, f=2), equal_nan=True)
    assert label_consistency(np.zeros((0, C, H)), np.zeros((0, C)), f=0).shape == (0,)


@pytest.mark.parametrize(
    ("weight", "bias"),
    [((4, C, H), (4, C + 1)), ((4, C * H), (4, C)), ((4, C, H), (3, C))],
    ids=["classes", "flat-weight", "rows"],
)
def test_shapes_that_are_not_an_output_layer_are_refused(
    weight: tuple[int, ...], bias: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match=r"weight \[n, C, H\] and bias \[n, C\]"):
        label_consistency(np.zeros(weight), np.zeros(bias), f=1)


def _review(rep: Reputation, round_no: int, labels: dict[str, float]) -> tuple[str, ...]:
    """One round of ten ordinary updates reviewed with ``labels`` and observed; the clients
    flagged ``label_consistency``."""
    rng = np.random.default_rng(round_no)
    ids = [f"c{i}" for i in range(10)]
    x = (rng.standard_normal(40) + 0.3 * rng.standard_normal((10, 40))).astype(np.float32)
    out = rep.review(round_no, ids, x, detect(x, 3, ids=ids), labels)
    rep.observe(round_no, out.flagged)
    return tuple(c for c in out.flagged if "label_consistency" in out.reasons[c])


def test_the_running_mean_flags_a_client_one_bad_round_does_not() -> None:
    rep = Reputation()
    good = {f"c{i}": 0.4 for i in range(10)}
    assert _review(rep, 1, {**good, "c1": -0.3}) == ("c1",)  # its mean is its one round
    assert _review(rep, 2, {**good, "c1": 0.5}) == ()  # (-0.3 + 0.5) / 2
    for r in range(3, 8):
        assert _review(rep, r, {**good, "c2": -0.8}) == (("c2",) if r > 3 else ())
    assert rep.label_mean("c2") == pytest.approx((0.4 * 2 - 0.8 * 5) / 7)


def test_an_honest_client_with_bad_early_rounds_is_back_in_after_the_window() -> None:
    rep = Reputation(label_window=4)
    good = {f"c{i}": 0.4 for i in range(10)}
    flagged = [_review(rep, r, {**good, "c4": -0.8}) for r in range(1, 4)]
    assert flagged == [("c4",)] * 3
    after = [_review(rep, r, good) for r in range(4, 30)]
    # flagged while its window holds two or more of its bad rounds (mean -0.5, -0.2), then
    # never again; quarantined on its fourth flag (round 4), and the quarantine, which
    # rested on its labels, ends with them (round 6) instead of running to round 9
    assert [bool(f) for f in after[:3]] == [True, True, False] and not any(after[3:])
    assert rep.is_quarantined("c4", 5) and not rep.is_quarantined("c4", 6)
    assert rep.quarantined(29) == set()


def test_a_quarantine_on_labels_ends_only_when_nothing_else_is_held() -> None:
    """The release is for a quarantine that began while the labels were flagged, once the
    window has cleared and no record of unexcused flags remains; a client quarantined on
    other evidence that is merely not flagged stays quarantined."""
    good = {f"c{i}": 0.4 for i in range(10)}
    rep = Reputation(label_window=4)
    for r in range(1, 4):
        _review(rep, r, {**good, "c4": -0.8})
    rep.grave["c4"] = (2.0, 3)  # e.g. two rounds flagged on direction besides
    for r in range(4, 7):
        _review(rep, r, good)
    assert rep.is_quarantined("c4", 6)  # window clear from round 6, the record is not
    # quarantined without a label flag: not released by a clear window
    other = Reputation()
    for r in range(1, 5):
        other.observe(r, ["c5"])
    assert other.is_quarantined("c5", 4)
    for r in range(5, 8):
        assert _review(other, r, good) == ()
        assert other.is_quarantined("c5", r)
    assert other.label_flagged == {}


def test_the_windows_survive_a_restart() -> None:
    rep = Reputation(label_window=3)
    scores = {f"c{i}": 0.1 * i - 0.3 for i in range(10)}
    for r in range(1, 5):
        _review(rep, r, scores)
    data = rep.to_dict()
    assert data["labels"]["c0"] == pytest.approx([-0.3] * 3) and data["label_window"] == 3
    assert data["label_flagged"] == {"c0": 4, "c1": 4}
    again = Reputation.from_dict(data)
    assert again.to_dict() == data
    assert _review(again, 5, scores) == _review(rep, 5, scores) == ("c0", "c1")
    assert again.to_dict() == rep.to_dict()
    # a state saved before label consistency existed has no windows
    old = {k: v for k, v in data.items() if k not in ("labels", "label_window", "label_threshold")}
    assert Reputation.from_dict(old).labels == {}
    # nor, before the release on labels, their last flags
    older = {k: v for k, v in data.items() if k != "label_flagged"}
    assert Reputation.from_dict(older).label_flagged == {}
    with pytest.raises(TypeError, match="round must be an int"):
        Reputation.from_dict({**data, "label_flagged": {"c0": "4"}})
    for section in ("label_flagged", "labels", "grave"):
        with pytest.raises(ValueError, match="not a mapping"):
            Reputation.from_dict({**data, section: [["c0", 4]]})
    with pytest.raises(ValueError, match="label score"):
        Reputation.from_dict({**data, "labels": {"c0": [float("nan")]}})


def test_excluded_clients_are_scored_but_set_no_consensus() -> None:
    w, b = _round(3, flippers=(2, 5, 11))
    rng = np.random.default_rng(9)
    noise_w = rng.standard_normal((6, C, H)).astype(np.float32)
    noise_b = rng.standard_normal((6, C)).astype(np.float32)
    w_all, b_all = np.concatenate([w, noise_w]), np.concatenate([b, noise_b])
    exclude = np.arange(26) >= 20
    s = label_consistency(w_all, b_all, f=6, exclude=exclude)
    np.testing.assert_array_equal(s[:20], label_consistency(w, b, f=6))
    assert np.isfinite(s[20:]).all()
    with pytest.raises(ValueError, match="exclude must be 26 flags"):
        label_consistency(w_all, b_all, f=6, exclude=exclude[:5])


def test_suspects_are_the_quarantined_clients() -> None:
    """Reputation.suspects (left out of the label consensus by the detector core): the
    quarantined among the clients named, not a low label window nor an unsteady client;
    read from the persisted state, so a restored reputation names the same."""
    ids = [f"c{i}" for i in range(10)]
    rep = Reputation()
    rep.labels = {c: [0.4] for c in ids}
    rep.labels["c1"] = [0.4, -0.9]  # mean -0.25 < -0.15: not a suspect for that
    rep.steadiness = {c: 0.97 + 0.001 * i for i, c in enumerate(ids)}
    rep.steadiness["c2"] = 0.6  # unsteady: not a suspect for that
    for r in range(1, 5):
        rep.observe(r, ["c3"])  # quarantined from round 4 to 9
    assert rep.suspects(5, ids) == {"c3"}
    again = Reputation.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert again.suspects(5, ids) == {"c3"}
    assert rep.suspects(5, ["c1", "c2"]) == set()
    assert rep.suspects(10, ids) == set()


def test_what_the_classes_share_does_not_move_a_clients_score() -> None:
    """The direction the classes share (that of the median of a client's class consensus)
    is projected out of every row: however much of it a client's rows carry (a client
    holding mostly one class pushes that row up with the class's whole mean, one holding
    several with a contrast against its other classes), its score is the same. Subtracting
    the median instead, as before, moved it (fashion-mnist, whose class means are alike)."""
    w, b = _round(11, one_class=(0,))
    w, b = w.astype(np.float64), b.astype(np.float64)
    top = np.abs(b).max(axis=1, keepdims=True)
    up = b > 0.1 * top  # the rows each client pushes up (LABEL_FLOOR)
    phi = w / np.where(up, b, 1.0)[:, :, None]
    others = np.arange(1, len(w))
    cons = [
        np.median(phi[others[up[others, k]], k], axis=0) for k in range(C) if up[others, k].any()
    ]
    shared = np.median(np.stack(cons), axis=0)
    shared /= np.linalg.norm(shared)
    before = label_consistency(w, b, f=0)
    for scale in (-3.0, 0.5, 4.0):
        moved = w.copy()
        moved[0] += scale * np.where(up[0], b[0], 0.0)[:, None] * shared  # phi[0] += scale * u
        after = label_consistency(moved, b, f=0)
        assert after[0] == pytest.approx(before[0], abs=1e-9)


def _paired_classes_round(seed: int) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """Twenty clients, six flipping, where the flippers push up most rows of the paired
    classes 1 and 8 (each flipper's images of 8 become its label 1, of 1 its label 8): as
    on fashion-mnist at Dirichlet 0.1 (tune seed 4). Two honest clients hold each of the
    two classes; four flippers hold images of both, two of only one, and each flipper a
    third class whose rows are mostly honest clients'."""
    rng = np.random.default_rng(seed)
    protos = np.abs(rng.standard_normal((C, H))) + 0.5
    counts = np.zeros((20, C))
    counts[0, 1], counts[1, [1, 3]] = 60, (40, 20)
    counts[2, 8], counts[3, [8, 5]] = 60, (40, 20)
    rest = [0, 2, 3, 4, 5, 6, 7, 9]
    for i in range(4, 14):  # honest clients each holding two of the other classes
        counts[i, rng.choice(rest, size=2, replace=False)] = (40, 20)
    # images of 8 (labelled 1) or of 1 (labelled 8), some of the other, and a third class
    coalition = [(8, 1, 2), (8, 1, 3), (8, None, 4), (1, 8, 0), (1, None, 6), (1, 8, 7)]
    for i, (held, also, other) in enumerate(coalition):
        counts[14 + i, [held, other]] = (50, 20)
        if also is not None:
            counts[14 + i, also] = 15
    ws, bs = zip(*(_layer(rng, protos, counts[i], flip=i >= 14) for i in range(20)), strict=True)
    return np.stack(ws), np.stack(bs), [0, 1, 2, 3], list(range(14, 20))


def test_a_coalition_holding_most_rows_of_two_classes_does_not_set_their_consensus() -> None:
    """Where flippers push up most rows of a class, the class's median is theirs and the
    honest holders look flipped (so they were scored, fashion-mnist tune seed 4, until
    the coalition was found first); the flippers still disagree with the honest majority
    as a group, and the consensus is taken without them."""
    from qflare.robust.detection import _label_coalition

    for seed in range(5):
        w, b, holders, flippers = _paired_classes_round(seed)
        use = np.ones(20, dtype=bool)
        found = set(np.flatnonzero(_label_coalition(w, b, use, 0.1, 6)))
        # those holding images of both classes at least; the others then fall to the
        # second pass
        assert {14, 15, 17, 19} <= found <= set(flippers), (seed, found)
        s = label_consistency(w, b, f=6)
        assert s[flippers].max() < -0.15 < 0.15 < s[holders].min(), (seed, np.round(s, 2))
        # the per-class median alone (the coalition not looked for, no second pass)
        # names the honest holders of the two classes
        alone = label_consistency(w, b, f=0)
        assert alone[holders].max() < 0, (seed, np.round(alone, 2))
        # at most f, and none where f is 0
        assert set(np.flatnonzero(_label_coalition(w, b, use, 0.1, 2))) <= found
        assert _label_coalition(w, b, use, 0.1, 2).sum() == 2
        assert not _label_coalition(w, b, use, 0.1, 0).any()


def test_no_coalition_is_found_among_honest_clients() -> None:
    from qflare.robust.detection import _label_coalition

    for seed in range(5):
        w, b = _round(seed, one_class=(0, 8))
        assert not _label_coalition(w, b, np.ones(20, dtype=bool), 0.1, 6).any(), seed
    # nothing to compare: no client, none in use, nothing pushed up
    assert _label_coalition(
        np.zeros((0, C, H)), np.zeros((0, C)), np.zeros(0, bool), 0.1, 2
    ).shape == (0,)
    assert not _label_coalition(w, b, np.zeros(20, dtype=bool), 0.1, 6).any()
    assert not _label_coalition(w, np.zeros_like(b), np.ones(20, dtype=bool), 0.1, 6).any()


def test_one_client_at_odds_with_the_rest_is_no_coalition() -> None:
    """With every flipper but one out of use (flagged by the round's other scores), the
    one left disagrees with the rest alone: no coalition. Without the rule that a
    coalition's members agree among themselves (at least two of them), the lone flipper
    was named, and on seed 1 two honest holders of the contested classes were (digits tune
    seed 9: an honest client holding a class with two flippers, named alone)."""
    from qflare.robust.detection import _label_coalition

    for seed in range(5):
        w, b, _, flippers = _paired_classes_round(seed)
        for kept in flippers:
            use = np.ones(20, dtype=bool)
            use[[c for c in flippers if c != kept]] = False
            assert not _label_coalition(w, b, use, 0.1, 6).any(), (seed, kept)


def test_the_coalition_follows_its_clients_not_their_order() -> None:
    from qflare.robust.detection import _label_coalition

    w, b, _, flippers = _paired_classes_round(2)
    found = _label_coalition(w, b, np.ones(20, dtype=bool), 0.1, 6)
    order = np.random.default_rng(5).permutation(20)
    again = _label_coalition(w[order], b[order], np.ones(20, dtype=bool), 0.1, 6)
    np.testing.assert_array_equal(again, found[order])
    # a client left out of use (flagged by the round's other scores) is in no coalition
    use = np.ones(20, dtype=bool)
    use[flippers[0]] = False
    assert not _label_coalition(w, b, use, 0.1, 6)[flippers[0]]


def test_a_row_whose_nearest_class_looks_like_its_own_weighs_little() -> None:
    """Classes 2 and 4 look alike (pullover and coat on fashion-mnist); client 0's coats
    lean further towards pullovers. Its row of 4 is then about as near the consensus of 2
    as its own, and the margin between them is noise (it scored -0.29 on seed 1, as honest
    fashion-mnist clients holding such classes hover about -0.15): a row's margin is
    weighed by how unlike its own class's consensus and its rival's are. Flippers, whose
    rows point at a class unlike their own, keep their scores."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        protos = np.abs(rng.standard_normal((C, H))) + 0.5
        protos[4] = protos[2] + 0.5 * rng.standard_normal(H)
        ws, bs = [], []
        for i in range(20):
            counts = np.round(60 * rng.dirichlet(np.full(C, 0.3)))
            mine = protos
            if i == 0:
                counts = np.zeros(C)
                counts[[4, 0]] = (60, 20)
                mine = protos.copy()
                mine[4] = protos[4] + 0.8 * (protos[2] - protos[4])
            w, b = _layer(rng, mine, counts, flip=i >= 15)
            ws.append(w)
            bs.append(b)
        s = label_consistency(np.stack(ws), np.stack(bs), f=6)
        assert s[0] > 0, (seed, np.round(s, 2))
        assert s[15:].max() < -0.15 < 0 < s[1:15].min(), (seed, np.round(s, 2))


ROUND = Path(__file__).parent / "data" / "fashion_alpha05_seed2_round15.npz"


def test_the_majoritys_margin_is_the_zero_where_it_is_below_zero() -> None:
    """A recorded round (fashion-mnist, 20 clients, alpha 0.5, no attack, tune seed 2,
    round 15: the output layers the detector scored, and the client the round's other
    scores flagged): late in training the rows carry the clients' confusions more than
    their classes' means, and the median client scored -0.069, six honest clients below
    the threshold of -0.15 (one of them out from round 13 on its window, 45% of rounds).
    Scores are then measured from the median of the clients that set the consensus."""
    with np.load(ROUND, allow_pickle=False) as rec:
        w, b, exclude, f = rec["weight"], rec["bias"], rec["exclude"], int(rec["f"])
    s = label_consistency(w, b, f, exclude=exclude)
    assert np.isfinite(s).all()
    assert np.median(s[~exclude]) == pytest.approx(0.0, abs=1e-12)
    assert (s < -0.15).sum() == 3, np.round(s, 2)
