"""The detector's pure core: verdicts over a round, quarantine, detection off."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qflare.robust import Reputation
from qflare.services.detector.core import RoundRows, _gather_rows, decide, decide_rows


def _round(
    seed: int, byzantine: tuple[str, ...] = ("c7", "c8", "c9")
) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(200).astype(np.float32)
    out = {}
    for i in range(10):
        cid = f"c{i}"
        honest = direction + 0.3 * rng.standard_normal(200).astype(np.float32)
        w = -8.0 * direction if cid in byzantine else honest
        out[cid] = {
            "w": w[:150].reshape(10, 15).astype(np.float32),
            "b": w[150:].astype(np.float32),
        }
    return out


def test_flags_exactly_the_byzantine_and_is_order_free() -> None:
    rep = Reputation()
    updates = _round(1)
    v = decide(1, updates, f=3, detection=True, reputation=rep)
    assert {x.client for x in v.flagged} == {"c7", "c8", "c9"}
    assert v.kept == tuple(f"c{i}" for i in range(7))
    assert all(x.score > 0 and x.reasons for x in v.flagged)
    shuffled = dict(reversed(list(updates.items())))
    again = decide(1, shuffled, f=3, detection=True, reputation=Reputation())
    assert again.kept == v.kept and again.flagged == v.flagged


def test_repeat_offenders_get_quarantined() -> None:
    rep = Reputation(threshold=2.5, decay=1.0)
    decide(1, _round(1), f=3, detection=True, reputation=rep)
    decide(2, _round(2), f=3, detection=True, reputation=rep)
    v3 = decide(3, _round(3), f=3, detection=True, reputation=rep)
    assert set(v3.newly_quarantined) == {"c7", "c8", "c9"}
    # Round 4: c9 behaves, but stays out while quarantined.
    v4 = decide(4, _round(4, byzantine=("c7", "c8")), f=3, detection=True, reputation=rep)
    c9 = next(x for x in v4.flagged if x.client == "c9")
    assert "quarantined" in c9.reasons and "c9" not in v4.kept


def test_detection_off_keeps_everyone() -> None:
    rep = Reputation()
    v = decide(1, _round(1), f=3, detection=False, reputation=rep)
    assert v.kept == tuple(sorted(_round(1))) and v.flagged == () and rep.clients == {}


def test_rows_hold_tensors_in_name_order_as_float32() -> None:
    rows = RoundRows(2)
    rows.add(("c1", b"d"), {"b": np.array([3.0]), "a": np.array([[1.0, 2.0]])})
    clients, x = rows.matrix([("c1", b"d")])
    assert clients == ["c1"] and x.tolist() == [[1.0, 2.0, 3.0]] and x.dtype == np.float32


@pytest.mark.parametrize("capacity", [1, 3, 10])
def test_rows_in_any_arrival_order_give_the_sorted_matrix(capacity: int) -> None:
    updates = _round(5)
    expected = np.stack(
        [np.concatenate([updates[c]["b"], updates[c]["w"].ravel()]) for c in sorted(updates)]
    )
    for arrival in (
        sorted(updates),
        sorted(updates, reverse=True),
        list(np.random.default_rng(0).permutation(sorted(updates))),
    ):
        rows = RoundRows(capacity)  # small capacities grow while rows arrive
        for c in arrival:
            rows.add((c, c.encode()), updates[c])
        rows.add((arrival[0], arrival[0].encode()), updates[arrival[1]])  # a redelivery: ignored
        assert len(rows) == 10
        refs = [(c, c.encode()) for c in arrival]
        clients, x = rows.matrix(refs)
        assert clients == sorted(updates) and np.array_equal(x, expected)
        clients, again = rows.matrix(refs)  # asking again after the reorder
        assert np.array_equal(again, expected)


def test_a_subset_of_the_rows_is_a_copy_in_client_order() -> None:
    updates = _round(6)
    rows = RoundRows(10)
    for c in sorted(updates, reverse=True):
        rows.add((c, b""), updates[c])
    clients, x = rows.matrix([("c4", b""), ("c1", b"")])
    assert clients == ["c1", "c4"]
    assert np.array_equal(x[1], np.concatenate([updates["c4"]["b"], updates["c4"]["w"].ravel()]))
    with pytest.raises(KeyError):
        rows.matrix([("c1", b"other digest")])


def test_an_update_of_another_layout_is_refused() -> None:
    rows = RoundRows(4)
    rows.add(("c0", b""), {"w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="c1"):
        rows.add(("c1", b""), {"w": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="c2"):
        rows.add(("c2", b""), {"v": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="c3"):  # same size, another shape
        rows.add(("c3", b""), {"w": np.zeros((3, 1), np.float32)})
    with pytest.raises(ValueError, match="c4"):  # same shape, another dtype
        rows.add(("c4", b""), {"w": np.zeros(3, np.float64)})
    assert len(rows) == 1
    with pytest.raises(ValueError):
        RoundRows(0)


def test_gather_rows_applies_every_permutation_in_place() -> None:
    base = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    for perm in itertools.permutations(range(5)):
        x = base.copy()
        _gather_rows(x, list(perm))
        assert np.array_equal(x, base[list(perm)])


def test_decide_rows_is_decide_over_the_same_matrix() -> None:
    updates = _round(2)
    a = decide(2, updates, f=3, detection=True, reputation=Reputation())
    rows = RoundRows(10)
    for c in updates:
        rows.add((c, b""), updates[c])
    clients, x = rows.matrix([(c, b"") for c in updates])
    b = decide_rows(2, clients, x, f=3, reputation=Reputation())
    assert a == b and {f.client for f in a.flagged} == {"c7", "c8", "c9"}
