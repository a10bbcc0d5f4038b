"""Evidence across rounds: steadiness (Reputation.review), the pardon's ceiling, and the cap
of at most f flags (limit_flags)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qflare.robust import Reputation, Verdict, detect
from qflare.robust.attacks import get_attack
from qflare.robust.detection import OK, limit_flags
from qflare.robust.reputation import noise_like_clients, tail_weights, unsteady_clients

D = 400
IDS = [f"c{i:02d}" for i in range(20)]


def _unit(rng: np.random.Generator, d: int = D) -> np.ndarray:
    v = rng.normal(size=d)
    return v / np.linalg.norm(v)


def _noisy_coalition_rounds(seed: int, rounds: int) -> list[np.ndarray]:
    """14 non-IID honest clients (the consensus plus a skew of their own, kept across
    rounds) and 6 attackers whose offset from the consensus is as large but drawn afresh
    every round (a noisy coalition): one round alone does not tell them apart."""
    rng = np.random.default_rng(seed)
    mu = _unit(rng)
    skews = [_unit(rng) for _ in range(14)]
    out = []
    for _ in range(rounds):
        x = np.empty((20, D))
        for i in range(14):
            x[i] = mu + 0.8 * skews[i] + 0.15 * _unit(rng)
        for i in range(14, 20):
            x[i] = mu + 0.8 * _unit(rng)
        out.append(x.astype(np.float32))
    return out


def test_a_noisy_coalition_is_inconsistent_with_its_history() -> None:
    rep = Reputation()
    caught = []
    for r, x in enumerate(_noisy_coalition_rounds(0, 8), start=1):
        v = detect(x, 6, ids=IDS)
        assert not set(v.flagged) & set(IDS[14:])  # no single-round score finds them
        w = rep.review(r, IDS, x, v)
        assert not set(w.flagged) & set(IDS[:14])  # no honest client flagged
        caught.append({c for c in w.flagged if "inconsistent" in w.reasons[c]})
    # the steadiness starts after min_history rounds of history (round 3)
    assert caught[:2] == [set(), set()]
    assert all(c == set(IDS[14:]) for c in caught[2:])


def test_iid_noise_is_not_inconsistent() -> None:
    """When every update is the consensus plus fresh noise (IID data), every steadiness is
    low and none stands out: the threshold is relative to the round."""
    rng = np.random.default_rng(1)
    mu = _unit(rng)
    rep = Reputation()
    for r in range(1, 9):
        x = np.stack([mu + 0.8 * _unit(rng) for _ in range(20)]).astype(np.float32)
        w = rep.review(r, IDS, x, detect(x, 6, ids=IDS))
        assert not any("inconsistent" in w.reasons.get(c, ()) for c in IDS)


def test_unsteady_clients_threshold() -> None:
    honest = {f"h{i}": 0.97 + 0.001 * i for i in range(14)}
    assert unsteady_clients({**honest, "a": 0.8, "b": 0.9}, 0.1) == {"a"}
    assert unsteady_clients({"a": 0.1, "b": 0.9}, 0.1) == set()  # too few to compare


def _live_and_restored(rounds: list[np.ndarray]) -> tuple[Reputation, Reputation]:
    """One reputation that never stopped and one saved and restored before every round,
    after asserting that both decided every round alike."""
    live = Reputation()
    verdicts = [live.review(r, IDS, x, detect(x, 6, ids=IDS)) for r, x in enumerate(rounds, 1)]
    restored = Reputation()
    for r, x in enumerate(rounds, 1):
        restored = Reputation.from_dict(json.loads(json.dumps(restored.to_dict())))
        w = restored.review(r, IDS, x, detect(x, 6, ids=IDS))
        assert w.flagged == verdicts[r - 1].flagged
        assert w.scores == verdicts[r - 1].scores
    return live, restored


def test_steadiness_survives_a_restart() -> None:
    """Decisions after a save/restore equal those of the reputation that never stopped."""
    live, restored = _live_and_restored(_noisy_coalition_rounds(2, 8))
    assert restored.steadiness == live.steadiness


def _verdict(reasons: dict[str, tuple[str, ...]], z: dict[str, float], f: int) -> Verdict:
    names = [f"c{i}" for i in range(10)]
    return Verdict(
        OK,
        tuple(c for c in names if c not in reasons),
        tuple(c for c in names if c in reasons),
        reasons,
        {c: {"krum_z": z.get(c, 0.0)} for c in names},
        "",
        len(names),
        f,
    )


def test_limit_flags_keeps_at_most_f() -> None:
    reasons = {
        "c0": ("duplicate",),
        "c1": ("duplicate",),
        "c2": ("krum",),
        "c3": ("krum", "distance"),
        "c4": ("inconsistent",),
        "c5": ("krum",),
    }
    v = limit_flags(_verdict(reasons, {"c2": 9.0, "c5": 4.0}, f=4))
    # copies always; then evidence across rounds; then the most reasons
    assert set(v.flagged) == {"c0", "c1", "c4", "c3"}
    assert set(v.kept) == {f"c{i}" for i in range(10)} - set(v.flagged)
    assert "beyond f=4" in v.message
    # copies beyond f stay flagged: they are facts, not scores
    many = {f"c{i}": ("duplicate",) for i in range(6)}
    assert set(limit_flags(_verdict(many, {}, f=4)).flagged) == set(many)
    # within f nothing changes
    few = _verdict({"c2": ("krum",)}, {}, f=4)
    assert limit_flags(few) is few


#: rounds of 16 clients with one consistently honest outlier (the pardon tests)
D_OUTLIER = 300


def _consensus_and_skew(seed: int, d: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """A generator, the consensus direction and a unit skew orthogonal to it."""
    rng = np.random.default_rng(seed)
    mu = _unit(rng, d)
    skew = rng.normal(size=d)
    skew -= (skew @ mu) * mu
    return rng, mu, skew / np.linalg.norm(skew)


def test_a_recent_direction_flag_withholds_the_pardon_for_a_while() -> None:
    """A client caught on direction is not let back in on its history in the next rounds
    (a coalition drifting from 'against the consensus' to 'merely far'); once that record
    has decayed below ``pardon_after``, a consistently honest outlier is back in."""
    from dataclasses import replace

    rng, mu, skew = _consensus_and_skew(0, D_OUTLIER)
    d = D_OUTLIER
    ids = IDS[:16]
    rep = Reputation(min_history=2, decay=0.8, pardon_after=1.0)
    back = []
    for r in range(1, 13):
        x = mu + 0.9 * rng.normal(size=(16, d)) / np.sqrt(d)
        x[14] = 1.35 * mu + 1.0 * skew + 0.1 * rng.normal(size=d) / np.sqrt(d)
        x = x.astype(np.float32)
        v = detect(x, 3, ids=ids)
        assert "c14" in v.flagged
        if r in (3, 4):  # two rounds in which it was (also) flagged on direction
            v = replace(v, reasons={**v.reasons, "c14": (*v.reasons["c14"], "cosine")})
        w = rep.review(r, ids, x, v)
        back.append("c14" in w.kept)
    # rounds 1-2: no history; 3-4: the direction flags; 5-6: record 1.44, 1.15 >= 1.0;
    # from 7 on (0.92, ...) back in
    assert back == [False] * 6 + [True] * 6


def test_a_pardon_ends_a_quarantine_and_a_clean_round_does_not() -> None:
    """A consistently honest outlier quarantined on earlier flags is let out of the
    quarantine by the first pardon (it would otherwise stay out for ``quarantine_rounds``
    more rounds, drifting further from a model trained without it); its score keeps only
    the flags a history does not excuse. A quarantined client that is merely not flagged,
    or flagged on direction, stays quarantined."""
    from dataclasses import replace

    rng, mu, skew = _consensus_and_skew(3, D_OUTLIER)
    d = D_OUTLIER
    ids = IDS[:16]
    rep = Reputation(min_history=2, decay=0.8, pardon_after=1.0, quarantine_rounds=5)
    # c13 and c14 are quarantined from the start on earlier offences; c13 behaves in every
    # round, c14 is an honest outlier (far, in a direction of its own, every round)
    for c in ("c13", "c14"):
        rep.observe(0, [c])
        rep.clients[c].quarantined_until = 20
    quarantined, kept = [], []
    for r in range(1, 9):
        x = mu + 0.9 * rng.normal(size=(16, d)) / np.sqrt(d)
        x[14] = 1.35 * mu + 1.0 * skew + 0.1 * rng.normal(size=d) / np.sqrt(d)
        x[15] = 1.35 * mu - 1.0 * skew + 0.1 * rng.normal(size=d) / np.sqrt(d)
        x = x.astype(np.float32)
        v = detect(x, 3, ids=ids)
        assert {"c14", "c15"} <= set(v.flagged)
        # c15 is flagged on direction in every round: never pardoned
        v = replace(v, reasons={**v.reasons, "c15": (*v.reasons["c15"], "cosine")})
        w = rep.review(r, ids, x, v)
        rep.observe(r, w.flagged)
        quarantined.append({c for c in ("c13", "c14", "c15") if rep.is_quarantined(c, r)})
        # kept in the round: not flagged, and not quarantined (the detector core's outcome)
        kept.append("c14" in w.kept and not rep.is_quarantined("c14", r))
    # c14: no history in rounds 1-2; round 3's pardon ends its quarantine
    assert kept == [False] * 2 + [True] * 6
    assert [("c14" in q) for q in quarantined] == [True] * 2 + [False] * 6
    assert rep.score("c14", 8) <= rep.grave_score("c14", 8) + 1e-12
    assert all("c13" in q and "c15" in q for q in quarantined[3:])


def test_direction_flags_before_a_history_do_not_withhold_the_pardon() -> None:
    """An honest outlier flagged on direction in its first rounds, before it has a history
    (as in round 1 of a run, when the model is random), is let back in as soon as its
    history speaks for it; the same flags once it has a history withhold the pardon
    (``test_a_recent_direction_flag_withholds_the_pardon_for_a_while``). Flags that are
    not of direction (copies) count from the first round."""
    from dataclasses import replace

    rng, mu, dense = _consensus_and_skew(0, D_OUTLIER)
    # data-like skews: large on a few coordinates (an honest client's classes), not noise
    skew = np.where(np.arange(D_OUTLIER) % 10 == 0, dense, 0.0)
    other = np.where(np.arange(D_OUTLIER) % 10 == 5, dense, 0.0)
    skew, other = skew / np.linalg.norm(skew), other / np.linalg.norm(other)
    d = D_OUTLIER
    ids = IDS[:16]
    rep = Reputation(min_history=2, decay=0.8, pardon_after=1.0, quarantine_rounds=5)
    kept, out_13 = [], []
    for r in range(1, 9):
        x = mu + 0.9 * rng.normal(size=(16, d)) / np.sqrt(d)
        x[14] = 1.35 * mu + 1.0 * skew + 0.1 * rng.normal(size=d) / np.sqrt(d)
        x[13] = 1.35 * mu + 1.0 * other + 0.1 * rng.normal(size=d) / np.sqrt(d)
        x = x.astype(np.float32)
        v = detect(x, 3, ids=ids)
        assert {"c13", "c14"} <= set(v.flagged)
        if r in (1, 2, 3):  # c14 on direction; its history holds from round 3 on
            v = replace(v, reasons={**v.reasons, "c14": (*v.reasons["c14"], "cosine")})
        if r in (1, 2):  # c13 as copies
            v = replace(v, reasons={**v.reasons, "c13": (*v.reasons["c13"], "duplicate")})
        w = rep.review(r, ids, x, v)
        rep.observe(r, w.flagged)
        kept.append("c14" in w.kept and not rep.is_quarantined("c14", r))
        out_13.append("c13" in w.flagged)
    # c14: rounds 1-2 do not count, round 3's does (record 1.0, then 0.8 < 1 in round 4)
    assert kept == [False] * 3 + [True] * 5
    assert rep.grave_score("c14", 3) == 1.0
    # c13: the copies of rounds 1-2 leave a record of 1.8 (1.44, 1.15 in rounds 3-4)
    assert out_13 == [True] * 4 + [False] * 4


# --- tails: residuals like noise, not data (Reputation's "Tails") ---------------------------


def _sparse_unit(rng: np.random.Generator) -> np.ndarray:
    """A unit vector on a random 10% of the coordinates (what a few classes drive)."""
    v = np.zeros(D)
    on = rng.choice(D, size=D // 10, replace=False)
    v[on] = rng.normal(size=len(on))
    return v / np.linalg.norm(v)


def _data_like_rounds(seed: int, rounds: int, *, fresh: tuple[int, ...] = ()) -> list[np.ndarray]:
    """14 honest clients whose residual is data-like: a skew of their own on a random 10% of
    the coordinates (the few its classes drive), kept across rounds, plus a little noise;
    the clients in ``fresh`` draw that skew afresh every round (an honest client whose
    direction wanders). Clients 14-19 are the library's noisy ALIE coalition, forged from
    the honest rows (the mean shifted by a multiple of the honest spread, plus independent
    noise scaled by it)."""
    rng = np.random.default_rng(seed)
    mu = _unit(rng)
    skews = [_sparse_unit(rng) for _ in range(14)]
    out = []
    for _ in range(rounds):
        h = np.stack(
            [
                mu + 0.8 * (_sparse_unit(rng) if i in fresh else skews[i]) + 0.1 * _unit(rng)
                for i in range(14)
            ]
        )
        bad = get_attack("noisy_alie").forge(h, 6, rng)
        out.append(np.concatenate([h, bad]).astype(np.float32))
    return out


def test_tail_weights_tell_noise_from_data() -> None:
    rng = np.random.default_rng(5)
    gaussian = rng.normal(size=(20, 2000))
    t = tail_weights(gaussian, np.ones(20, dtype=bool))
    assert np.all(np.abs(t - 1.0) < 0.15)  # noise: about 1 after the k-row correction
    (x,) = _data_like_rounds(1, 1)
    t = tail_weights(x.astype(np.float64), np.ones(20, dtype=bool))
    assert t[:14].min() > 1.5  # data: heavy tails
    assert t[14:].max() < 0.87  # the coalition: lighter than noise
    # a non-finite row is not scored and does not count in the spread
    y = x.astype(np.float64).copy()
    y[3, 7] = np.nan
    finite = np.isfinite(y).all(axis=1)
    u = tail_weights(y, finite)
    assert np.isnan(u[3]) and np.isfinite(np.delete(u, 3)).all()
    # too few rows, or too few columns that vary: nothing to tell
    assert np.isnan(tail_weights(x[:2], np.ones(2, dtype=bool))).all()
    flat = np.ones((20, 40))
    flat[:, :10] = rng.normal(size=(20, 10))
    assert np.isnan(tail_weights(flat, np.ones(20, dtype=bool))).all()


def test_noise_like_clients_threshold() -> None:
    honest = {f"h{i}": 1.2 + 0.05 * i for i in range(14)}
    assert noise_like_clients({**honest, "a": 0.8, "b": 0.9}, 0.87, 0.15) == {"a"}
    # below the bar but not below the round's median by the margin: a round of noise
    assert noise_like_clients({f"n{i}": 0.85 + 0.001 * i for i in range(20)}, 0.87, 0.15) == set()
    assert noise_like_clients({"a": 0.5, "b": 1.5}, 0.87, 0.15) == set()  # too few


def test_a_noisy_coalition_is_noise_like_from_its_first_round() -> None:
    rep = Reputation()
    for r, x in enumerate(_data_like_rounds(2, 6), start=1):
        w = rep.review(r, IDS, x, detect(x, 6, ids=IDS))
        noisy = {c for c in w.flagged if "noise_like" in w.reasons[c]}
        assert noisy == set(IDS[14:]), r
        assert not set(w.flagged) & set(IDS[:14])
        assert all("tails" in w.scores[c] and "tails_mean" in w.scores[c] for c in IDS)


def _wanderers_flagged(fresh: tuple[int, ...], **options: float) -> set[str]:
    """The honest clients ever flagged ``inconsistent`` over 8 rounds of 14 honest clients
    of which those in ``fresh`` draw a new skew every round."""
    rep = Reputation(**options)  # type: ignore[arg-type]
    seen: set[str] = set()
    ids = IDS[:14]  # the honest clients alone
    for r, x in enumerate(_data_like_rounds(3, 8, fresh=fresh), start=1):
        w = rep.review(r, ids, x[:14], detect(x[:14], 3, ids=ids))
        seen |= {c for c in w.flagged if "inconsistent" in w.reasons[c]}
    return seen


def test_a_data_like_client_whose_direction_wanders_is_not_held_unsteady() -> None:
    """Honest clients c03 and c07 draw a new skew every round: their steadiness falls
    below the others', but their residuals are data (heavy tails), so unsteadiness is not
    held against them; with no tails excused (``unsteady_tails`` 100) they are flagged
    ``inconsistent``."""
    assert _wanderers_flagged((3, 7), unsteady_tails=100.0) == {"c03", "c07"}
    assert _wanderers_flagged((3, 7)) == set()


def test_a_lone_unsteady_client_is_not_a_coalition() -> None:
    """One client unsteady in a round, and nobody noise-like beside it, is not flagged
    ``inconsistent``: the coalitions that steadiness is for add their noise as a group
    (fashion-mnist, Dirichlet 0.1, no attack: honest clients far in every round, alone in
    being unsteady, were out in 85% of rounds, tune seed 5)."""
    assert _wanderers_flagged((3,), unsteady_tails=100.0) == set()


def test_tails_survive_a_restart_and_bad_state_is_refused() -> None:
    live, restored = _live_and_restored(_data_like_rounds(4, 5))
    assert restored.tails == live.tails
    state = live.to_dict()
    state["history"]["c00"]["tails"] = "heavy"
    with pytest.raises(TypeError, match="tails"):
        Reputation.from_dict(state)
    state["history"]["c00"]["tails"] = float("nan")
    with pytest.raises(ValueError, match="tails"):
        Reputation.from_dict(state)
    for bad in ({"tails_bar": -1.0}, {"tails_margin": float("inf")}, {"unsteady_tails": -0.1}):
        with pytest.raises(ValueError):
            Reputation(**bad)  # type: ignore[arg-type]


def test_a_far_client_whose_residual_is_data_needs_only_the_floor_to_be_pardoned() -> None:
    """An honest outlier far from the others in every round whose residual is data (heavy
    tails) but keeps only part of its direction (fashion-mnist at Dirichlet 0.1: agreement
    0.5-0.76 where the round's median was 0.8) is pardoned at ``consistency_floor``
    instead of the round's relative bar."""
    rng = np.random.default_rng(21)
    mu = _unit(rng)
    skews = [_sparse_unit(rng) for _ in range(14)]
    ids = IDS[:14]
    rep = Reputation()
    kept, agree, bars = [], [], []
    for r in range(1, 9):
        x = np.stack([mu + 0.8 * skews[i] + 0.1 * _unit(rng) for i in range(14)])
        x[13] = 1.35 * mu + 1.1 * (0.8 * skews[13] + 0.6 * _sparse_unit(rng))  # far, half its own
        x = x.astype(np.float32)
        v = detect(x, 3, ids=ids)
        assert v.reasons.get("c13") and set(v.reasons["c13"]) <= {"krum", "distance", "norm"}
        w = rep.review(r, ids, x, v)
        kept.append("c13" in w.kept)
        agree.append(w.scores["c13"]["consistency"])
        others = [w.scores[c]["consistency"] for c in ids[:13]]
        bars.append(rep.consistency_bar(others))
    assert rep.tails["c13"] >= rep.unsteady_tails
    late = range(3, 8)  # rounds with a history before them
    assert all(rep.consistency_floor <= agree[i] < bars[i] for i in late)  # only the floor
    assert all(kept[i] for i in late)
