"""The detector's pure core: verdicts over a round, quarantine, detection off."""

from __future__ import annotations

import numpy as np

from qflare.messages.tensors import RoundRows
from qflare.robust import Reputation
from qflare.services.detector.core import decide, decide_rows


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
