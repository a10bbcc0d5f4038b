"""The detector's pure core: verdicts over a round, quarantine, detection off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qflare.messages.tensors import Layout, RoundRows
from qflare.robust import Reputation
from qflare.runtime.spill import SpilledRows, release
from qflare.services.detector.core import decide, decide_rows, decide_source


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


def test_decide_rows_is_decide_over_the_same_matrix() -> None:
    updates = _round(2)
    a = decide(2, updates, f=3, detection=True, reputation=Reputation())
    rows = RoundRows(10)
    for c in updates:
        rows.add((c, b""), updates[c])
    clients, x = rows.matrix([(c, b"") for c in updates])
    b = decide_rows(2, clients, x, f=3, reputation=Reputation())
    assert a == b and {f.client for f in a.flagged} == {"c7", "c8", "c9"}


def test_clients_refused_for_malformed_updates_count_against_f() -> None:
    # f = 3 and all three attackers were refused by ingest (round.closed.malformed = 3):
    # what is left is honest, so an unusual honest client is not flagged in their place
    updates = {c: u for c, u in _round(4, byzantine=()).items() if c not in ("c7", "c8", "c9")}
    updates["c6"] = {k: 6.0 * v for k, v in updates["c6"].items()}
    flagged = decide(1, updates, f=3, detection=True, reputation=Reputation()).flagged
    assert [x.client for x in flagged] == ["c6"]
    v = decide(1, updates, f=3, detection=True, reputation=Reputation(), malformed=3)
    assert v.flagged == () and len(v.kept) == 7
    # one of three refused: the two attackers left are still caught
    updates = _round(4, byzantine=("c8", "c9"))
    v = decide(1, updates, f=3, detection=True, reputation=Reputation(), malformed=1)
    assert {x.client for x in v.flagged} == {"c8", "c9"}


def _job_round(
    round_no: int, shapes: dict[str, tuple[int, ...]], *, nan: bool = False
) -> dict[str, dict[str, np.ndarray]]:
    """Twelve clients on non-IID data (each keeps its own offset from the round's
    direction, round after round), c09 flips its sign, c10 and c11 send one copy between
    them; with ``nan`` c08's update is not finite."""
    d = sum(int(np.prod(s)) for s in shapes.values())
    direction = np.random.default_rng([round_no, 1]).standard_normal(d)
    out: dict[str, dict[str, np.ndarray]] = {}
    copy = 2.5 * direction + np.random.default_rng([round_no, 2]).standard_normal(d)
    for i in range(12):
        cid = f"c{i:02d}"
        own = np.random.default_rng([i, 3]).standard_normal(d)  # the client's skew
        noise = np.random.default_rng([round_no, i, 4]).standard_normal(d)
        w = direction + (1.5 if i == 3 else 0.4) * own + 0.3 * noise
        if cid == "c09":
            w = -4.0 * direction
        elif cid in ("c10", "c11"):
            w = copy
        elif cid == "c08" and nan:
            w = w.copy()
            w[d // 2] = np.nan
        flat = w.astype(np.float32)
        tensors, start = {}, 0
        for name in sorted(shapes):
            size = int(np.prod(shapes[name]))
            tensors[name] = flat[start : start + size].reshape(shapes[name])
            start += size
        out[cid] = tensors
    return out


@pytest.mark.parametrize(
    ("shapes", "block"),
    [
        ({"a": (37, 20), "b": (497,)}, 100),  # d = 1237 > the sketch: a column subset
        ({"a": (37, 20), "b": (497,)}, 512),
        ({"a": (37, 20), "b": (497,)}, 4096),  # one block wider than d
        ({"a": (10, 20), "b": (100,)}, 7),  # d = 300: the sketch is every column
    ],
    ids=["d1237-b100", "d1237-b512", "d1237-b4096", "d300-b7"],
)
def test_a_spilled_round_read_in_blocks_gets_the_in_memory_verdict(
    tmp_path: Path, shapes: dict[str, tuple[int, ...]], block: int
) -> None:
    """decide_source over a SpilledRows' block source gives decide_rows' verdict over the
    same rows in memory, round after round: kept, flagged, reasons, quarantines and note
    equal, scores within 1e-5, and the reputation state (history, steadiness, records)
    afterwards equal."""
    in_memory, spilled = Reputation(), Reputation()
    layout = Layout.of(_job_round(1, shapes)["c00"])
    assert (layout.size > in_memory.sketch) == (layout.size == 1237)
    seen: set[str] = set()
    caught = 0
    for round_no in range(1, 9):
        updates = _job_round(round_no, shapes, nan=round_no == 3)
        malformed = 1 if round_no == 5 else 0
        clients = sorted(updates)
        refs = [(c, b"d") for c in clients]
        rows, file_rows = RoundRows(len(clients)), SpilledRows(tmp_path, len(clients))
        for ref in reversed(refs):  # arrival order does not matter
            rows.add(ref, updates[ref[0]])
            file_rows.add(ref, updates[ref[0]])
        try:
            with pytest.raises(TypeError):
                file_rows.matrix(refs)
            ids, x = rows.matrix(refs)
            want = decide_rows(round_no, ids, x, f=3, reputation=in_memory, malformed=malformed)
            ids_s, src = file_rows.source(refs)
            assert ids_s == ids and src.shape == x.shape
            got = decide_source(
                round_no, ids_s, src, f=3, reputation=spilled, malformed=malformed, block=block
            )
        finally:
            release(file_rows)
        assert got.kept == want.kept
        assert [(c.client, c.reasons) for c in got.flagged] == [
            (c.client, c.reasons) for c in want.flagged
        ]
        np.testing.assert_allclose(
            [c.score for c in got.flagged], [c.score for c in want.flagged], rtol=1e-5
        )
        assert got.newly_quarantined == want.newly_quarantined and got.note == want.note
        assert in_memory.to_dict() == spilled.to_dict()
        for c in want.flagged:
            seen.update(c.reasons)
        caught += "c09" not in want.kept
        assert "c10" not in want.kept and "c11" not in want.kept  # the copies, every round
    # the sign flip is let through only where f flags went to copies and a non-finite row;
    # the rounds went through direction, copies, non-finite rows, history and quarantine
    assert caught == 6
    assert {"cosine", "duplicate", "non_finite", "inconsistent", "quarantined"} <= seen, seen
